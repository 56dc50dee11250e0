"""The FastAPI peer of the benchmark, written the way a course would: one uvicorn process, the same
TorchScript model, PIL decode + resize in every request, no batching.

    uvicorn bench.fastapi_peer:app --port 8000
"""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.14's TorchScript deprecation notice
model = torch.jit.load(str(ROOT / "models" / "gtsrb.pt"), map_location="cpu").eval()
names = json.loads((ROOT / "handler" / "index_to_name.json").read_text())
app = FastAPI()


@app.get("/ping")
def ping():
    return {"status": "Healthy"}


@app.api_route("/predictions/gtsrb", methods=["POST", "PUT"])
async def predict(request: Request):
    img = Image.open(io.BytesIO(await request.body())).convert("RGB").resize((32, 32))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = probs.topk(5)
    return {names[str(i)]: p for p, i in zip(top.values.tolist(), top.indices.tolist())}
