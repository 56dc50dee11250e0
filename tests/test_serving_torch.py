"""Two torches run the shipped model: the tests and training use requirements/torch.txt (this process), while
`make serve` (.venv-serve) and the container serve with the CPU-only torch of requirements/image.in. The same
script, the handler's own preprocessing and layout, runs the model in each; their logits must agree."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import MODEL, ROOT, SAMPLES
from tools.torchserve_ctl import SERVE_PYTHON

# argv: model, noise.npy, output .pt. The 43 shipped signs through presets.EvalPreset, then uint8 noise, run as
# the handler runs them (one torch thread, channels-last, inference mode).
LOGITS = """
import sys, warnings
from pathlib import Path
import numpy as np, torch
from PIL import Image
sys.path.insert(0, "handler")
from presets import EvalPreset, to_network_layout
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)
model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
preset = EvalPreset(size=int(model.image_size))
signs = torch.stack([preset(Image.open(p).convert("RGB")) for p in sorted(Path("samples").glob("*.png"))])
x = torch.cat([signs, torch.from_numpy(np.load(sys.argv[2]))])
with torch.inference_mode():
    logits = model(to_network_layout(x))
torch.save({"torch": str(torch.__version__), "cuda": torch.version.cuda, "inputs": x, "logits": logits}, sys.argv[3])
"""


def logits_under(python, noise, out) -> dict:
    subprocess.run([str(python), "-c", LOGITS, str(MODEL), str(noise), str(out)], cwd=ROOT, check=True, timeout=300)
    return torch.load(out)


def test_shipped_model_gives_the_same_logits_under_the_serving_torch(tmp_path):
    if not SERVE_PYTHON.exists():
        pytest.fail(f"{SERVE_PYTHON} is missing: `make serve` (or `make install`) creates the serving environment")
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8))
    training = logits_under(sys.executable, noise, tmp_path / "training.pt")
    serving = logits_under(SERVE_PYTHON, noise, tmp_path / "serving.pt")
    pinned = re.search(r"^torch==(\S+)", (ROOT / "requirements" / "image.in").read_text(), re.M).group(1)
    assert serving["torch"] == pinned and serving["cuda"] is None  # the container's CPU-only build
    assert training["torch"] != serving["torch"]  # else this test proves nothing
    assert len(training["inputs"]) == len(list(SAMPLES.glob("*.png"))) + 16
    assert torch.equal(training["inputs"], serving["inputs"])  # the same pixels reach both models
    diff = (training["logits"] - serving["logits"]).abs().max().item()
    print(f"max |logit difference| {diff:.2e}: torch {training['torch']} vs {serving['torch']}")
    assert diff <= 1e-5
    assert torch.equal(training["logits"].argmax(1), serving["logits"].argmax(1))
