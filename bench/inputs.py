"""The request bodies: real GTSRB training signs, spread over the classes, upscaled to 64x64 PNGs."""

import os
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("GTSRB_ROOT") or ROOT.parent / "shared" / "data")  # the --data-root default


def make_images(data_root: Path, out: Path, count: int, size: int = 64) -> list[Path]:
    """``count`` real training signs, spread over the classes, upscaled to ``size`` px PNGs in ``out``."""
    train = data_root / "gtsrb" / "GTSRB" / "Training"
    if not train.is_dir():
        sys.exit(f"GTSRB training split not found at {train} (set --data-root or $GTSRB_ROOT)")
    folders = sorted(d for d in train.iterdir() if d.is_dir())
    per_class = -(-count // len(folders))
    picks = []
    for d in folders:
        files = sorted(d.glob("*.ppm"))
        picks += files[:: max(1, len(files) // per_class)][:per_class]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, src in enumerate(picks[:count]):
        dst = out / f"{n:04d}.png"
        Image.open(src).convert("RGB").resize((size, size), Image.BICUBIC).save(dst)
        paths.append(dst)
    return paths
