"""The in-process limit: how many images/s the model (and the decode + resize) can do in this process,
with no server around it; the servers are compared with the ceiling derived from it."""

import io
import time
from pathlib import Path

import torch
from PIL import Image

from bench.servers import MODEL
from handler.presets import EvalPreset, to_network_layout


def _rate(fn, items_per_call: int, seconds: float) -> float:
    t0 = time.perf_counter()
    for _ in range(3):  # TorchScript's profiling executor optimises after the first calls
        fn()
        if time.perf_counter() - t0 > seconds:  # a very slow setting: do not spend 3x the budget warming up
            break
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += items_per_call
        if (dt := time.perf_counter() - t0) >= seconds:
            return n / dt


def measure_limit(images: list[Path], batch: int, threads: int, seconds: float) -> dict:
    """images/s of models/gtsrb.pt at batch 1 and ``batch``, at ``threads`` and 2 torch threads
    ("b{batch}_t{threads}"), and of PIL decode + EvalPreset ("decode"), ``seconds`` each, on batches in the
    layout the handler feeds the model (``presets.to_network_layout``)."""
    from training.export import load

    model = load(MODEL)
    preset = EvalPreset(size=int(model.image_size))
    bodies = [p.read_bytes() for p in images]
    tensors = [preset(Image.open(p)) for p in images[:batch]]
    x1, xb = to_network_layout(tensors[0].unsqueeze(0)), to_network_layout(torch.stack((tensors * batch)[:batch]))
    saved = torch.get_num_threads()
    out = {"threads": threads, "batch": batch, "seconds": seconds}
    it = iter(range(1 << 62))

    def decode():
        preset(Image.open(io.BytesIO(bodies[next(it) % len(bodies)])))

    try:
        with torch.inference_mode():
            for t in sorted({threads, 2}):
                torch.set_num_threads(t)
                out[f"b1_t{t}"] = _rate(lambda: model(x1), 1, seconds)
                out[f"b{batch}_t{t}"] = _rate(lambda: model(xb), batch, seconds)
            torch.set_num_threads(threads)
            out["decode"] = _rate(decode, 1, seconds)
    finally:
        torch.set_num_threads(saved)
    return out
