"""Export a trained checkpoint to the TorchScript file that TorchServe serves.

    python -m training.export --checkpoint runs/gtsrb/latest/last.pth --output models/gtsrb.pt
    python -m training.export --checkpoint runs/teacher/latest/last.pth --output models/gtsrb_teacher.pth --slim

The exported module takes uint8 [N, 3, 32, 32] and returns logits; it needs torch only (no timm).
"""

import argparse
import contextlib
import copy
import hashlib
import warnings
from pathlib import Path

import torch

from training.model import ARCH, GTSRBClassifier, create_model


@contextlib.contextmanager
def _quiet_jit():
    """torch 2.14 announces TorchScript's deprecation on every trace/script/save/load: nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def to_torchscript(model: GTSRBClassifier) -> torch.jit.ScriptModule:
    """Trace (eval mode, CPU) and freeze: BatchNorm folded into the convolutions, weights as constants."""
    model = copy.deepcopy(model).cpu().eval()
    example = torch.randn(2, 3, model.resolution, model.resolution)
    with torch.no_grad(), _quiet_jit():
        # The timm network is traced; the small wrapper is scripted so that it keeps its input contract
        # (image_size, resolution) as attributes the handler can read.
        model.net = torch.jit.trace(model.net, example)
        scripted = torch.jit.script(model)
        return torch.jit.freeze(scripted, preserved_attrs=["image_size", "resolution"])


def save(model: GTSRBClassifier, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = to_torchscript(model)
    with _quiet_jit():
        torch.jit.save(scripted, str(path))
    return path


def load(path: str | Path) -> torch.jit.ScriptModule:
    with _quiet_jit():
        return torch.jit.load(str(path), map_location="cpu").eval()


def load_checkpoint(path: str | Path) -> GTSRBClassifier:
    """Rebuild the model of a training checkpoint (its EMA weights when it has them)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    args = ckpt["args"]
    model = create_model(
        args["num_classes"],
        args["resolution"],
        arch=args.get("arch", ARCH),
        input_norm=args.get("input_norm", "dataset"),
    )
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return model.eval()


def _weights(path: str | Path) -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("ema") or ckpt["model"], ckpt["args"]


def weights_digest(path: str | Path) -> str:
    """sha256 of the weights a checkpoint exports (names, shapes, bytes): equal for a checkpoint and its slim copy."""
    h = hashlib.sha256()
    for k, v in sorted(_weights(path)[0].items()):
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_slim(checkpoint: str | Path, output: str | Path) -> Path:
    """The weights and args of a checkpoint, without optimiser state: what a teacher needs (a third of the size)."""
    weights, args = _weights(checkpoint)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "ema": None, "args": args}, output)
    return Path(output)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--slim", action="store_true", help="write a weights-only checkpoint (.pth), not TorchScript")
    args = p.parse_args()
    print(save_slim(args.checkpoint, args.output) if args.slim else save(load_checkpoint(args.checkpoint), args.output))


if __name__ == "__main__":
    main()
