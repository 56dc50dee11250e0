"""Would int8 post-training quantization pay? Speed and agreement of an FX-quantized copy of the shipped network.

    python -m bench.quantize_check [--checkpoint runs/gtsrb/latest/best.pth] [--data-root ../shared/data]

Static post-training quantization (torch.ao FX graph mode, x86 backend, the default per-channel qconfig) of the
timm network inside the checkpoint, calibrated on 512 training images; the wrapper (normalisation, upsampling)
stays float; traced and frozen to TorchScript like training/export.py. Prints batch-1 and batch-8 latency
(1 thread) of the shipped models/gtsrb.pt and the int8 copy, and top-1 agreement and accuracy on 6,000 other
training images. These images were seen in training, so the accuracy is optimistic; a held-out-track model
would be the fair judge, but the check already fails here (BENCHMARKS.md, "Latency").
"""

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from bench.inputs import DATA_ROOT
from training.data import gtsrb, load_tensors
from training.export import load, load_checkpoint


def quantize(checkpoint: Path, calibration: torch.Tensor) -> torch.jit.ScriptModule:
    model = load_checkpoint(checkpoint)
    example = torch.randn(8, 3, model.resolution, model.resolution)
    model.net = prepare_fx(copy.deepcopy(model.net).eval(), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for i in range(0, len(calibration), 64):
            model(calibration[i : i + 64])
        model.net = torch.jit.trace(convert_fx(model.net), example)
        return torch.jit.freeze(torch.jit.script(model), preserved_attrs=["image_size", "resolution"])


def ms_per_call(model, x: torch.Tensor, repeats: int = 5) -> float:
    n = 60 // len(x) + 5
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            model(x)
        runs.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/gtsrb/latest/best.pth"))
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "x86"
    data = load_tensors(gtsrb(str(args.data_root), "train"))
    images, labels = data["images"], data["labels"]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    shipped = load(Path("models/gtsrb.pt"))
    int8 = quantize(args.checkpoint, images[order[:512]])
    with torch.inference_mode():
        for b in (1, 8):
            x = images[:b]
            for m in (shipped, int8):
                ms_per_call(m, x, repeats=1)
            print(f"batch {b}: fp32 {ms_per_call(shipped, x):.2f} ms, int8 {ms_per_call(int8, x):.2f} ms")
        held = order[512:6512]
        agree = right_fp = right_q = 0
        for i in range(0, len(held), 256):
            x, y = images[held[i : i + 256]], labels[held[i : i + 256]]
            a, b = shipped(x).argmax(1), int8(x).argmax(1)
            agree += (a == b).sum().item()
            right_fp += (a == y).sum().item()
            right_q += (b == y).sum().item()
    n = len(held)
    print(
        f"{n} training images: top-1 agreement {agree / n:.2%}; accuracy fp32 {right_fp / n:.2%}, int8 {right_q / n:.2%}"
    )


if __name__ == "__main__":
    main()
