"""GTSRB data: the torchvision dataset, a split by physical sign (track), and an offline synthetic set.

    python -m training.data --synthetic data/synthetic   # render the synthetic set (GTSRB layout)
    python -m training.data --root ../shared/data --stats  # recompute MEAN/STD for handler/presets.py

GTSRB: J. Stallkamp, M. Schlipsing, J. Salmen, C. Igel, "Man vs. computer: Benchmarking machine
learning algorithms for traffic sign recognition", Neural Networks 32 (2012).
"""

import argparse
import hashlib
import json
import logging
import math
import os
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torchvision.datasets import GTSRB
from tqdm import tqdm

from handler.presets import IMAGE_SIZE, EvalPreset

log = logging.getLogger(__name__)
CLASS_NAMES_FILE = Path(__file__).resolve().parent.parent / "handler" / "index_to_name.json"
# Class names in ClassId order, from the file the archive carries: the one definition.
CLASS_NAMES = [name for _, name in sorted(json.loads(CLASS_NAMES_FILE.read_text()).items(), key=lambda kv: int(kv[0]))]
NUM_CLASSES = len(CLASS_NAMES)


# ---------------------------------------------------------------------------- real data


def resolve_root(root: str | None) -> str | None:
    """--data-root, else $GTSRB_ROOT, else None."""
    return root or os.environ.get("GTSRB_ROOT") or None


def gtsrb(root: str, split: str, download: bool = False) -> GTSRB:
    return GTSRB(root=root, split=split, download=download, transform=EvalPreset())


def track_of(path: str) -> int:
    """File names are TTTTT_FFFFF.ppm (track, frame); test images have no track (-1)."""
    stem = Path(path).stem
    return int(stem.split("_")[0]) if "_" in stem else -1


def load_tensors(ds: GTSRB, desc: str = "load") -> dict:
    """Decode a whole split once into memory: {images uint8 [N,3,S,S], labels, tracks}."""
    loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=min(4, os.cpu_count() or 1))
    images, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        images.append(x)
        labels.append(y)
    samples = ds._samples  # torchvision keeps (path, class) pairs here
    return {
        "images": torch.cat(images),
        "labels": torch.cat(labels),
        "tracks": torch.tensor([track_of(p) for p, _ in samples]),
        "paths": [p for p, _ in samples],
    }


def fingerprint(paths: list[str]) -> str:
    """Cheap content fingerprint of a split: relative names and sizes of every file."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{Path(p).parent.name}/{Path(p).name}:{os.path.getsize(p)};".encode())
    return h.hexdigest()[:16]


def track_split(labels: torch.Tensor, tracks: torch.Tensor, val_fraction: float, seed: int):
    """Indices (train, val): a whole track (one physical sign, ~30 frames) goes to one side only.

    Tracks are numbered per class, so a track is the pair (class, track). Every class keeps at least
    one track on each side.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for c, t in set(zip(labels.tolist(), tracks.tolist())):
        by_class.setdefault(c, []).append(t)
    val_keys = set()
    for c, ts in sorted(by_class.items()):
        ts.sort()
        rng.shuffle(ts)
        n_val = min(len(ts) - 1, max(1, round(len(ts) * val_fraction)))
        val_keys.update((c, t) for t in ts[:n_val])
    is_val = torch.tensor([(c, t) in val_keys for c, t in zip(labels.tolist(), tracks.tolist())])
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


# ---------------------------------------------------------------------------- synthetic data
# A stand-in with GTSRB's layout for machines without the data (tests, offline demos): 43 sign
# designs from shape, colours and glyph, photographed with random pose, light, blur and noise.

RED, BLUE, WHITE, BLACK, YELLOW, GREY = (
    (200, 30, 40),
    (30, 70, 180),
    (235, 235, 235),
    (20, 20, 20),
    (240, 190, 20),
    (140, 140, 140),
)
_SPEEDS = {0: "20", 1: "30", 2: "50", 3: "60", 4: "70", 5: "80", 7: "100", 8: "120"}
_TRIANGLE_GLYPHS = "!<>SZ^~IRAPKBE*W"  # classes 18..31 and 11: one glyph each


def _design(cls: int) -> tuple[str, tuple, tuple, str]:
    """(shape, rim colour, fill colour, glyph) of a class; every class differs in at least one."""
    if cls in _SPEEDS:
        return "circle", RED, WHITE, _SPEEDS[cls]
    if cls in (6, 32, 41, 42):
        return "circle", GREY, WHITE, {6: "80/", 32: "/", 41: "=/", 42: "T/"}[cls]
    if cls in (9, 10, 15, 16, 17):
        return "circle", RED, (RED if cls == 17 else WHITE), {9: "==", 10: "T=", 15: "", 16: "T", 17: "-"}[cls]
    if cls == 11 or 18 <= cls <= 31:
        return "triangle", RED, WHITE, _TRIANGLE_GLYPHS[0 if cls == 11 else cls - 17]
    if cls == 12:
        return "diamond", WHITE, YELLOW, ""
    if cls == 13:
        return "yield", RED, WHITE, ""
    if cls == 14:
        return "octagon", WHITE, RED, "STOP"
    arrows = {33: ">", 34: "<", 35: "^", 36: "^>", 37: "<^", 38: "\\", 39: "/", 40: "@"}
    return "circle", WHITE, BLUE, arrows[cls]


def render_sign(cls: int, rng: random.Random, size: int = 64) -> Image.Image:
    bg = tuple(rng.randint(30, 200) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    shape, rim, fill, glyph = _design(cls)
    c, r = size / 2, size * 0.42
    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=rim)
        d.ellipse([c - r * 0.78, c - r * 0.78, c + r * 0.78, c + r * 0.78], fill=fill)
    else:
        sides, rot = {"triangle": (3, -90), "yield": (3, 90), "diamond": (4, 0), "octagon": (8, 22.5)}[shape]
        for scale, colour in ((1.0, rim), (0.72, fill)):
            pts = [
                (
                    c + r * scale * math.cos(math.radians(rot + 360 * k / sides)),
                    c + r * scale * math.sin(math.radians(rot + 360 * k / sides)),
                )
                for k in range(sides)
            ]
            d.polygon(pts, fill=colour)
    if glyph:
        font = ImageFont.load_default(size=max(8, int(size * (0.5 if len(glyph) < 3 else 0.3))))
        ink = WHITE if fill in (BLUE, RED) else BLACK
        d.text((c, c + (size * 0.06 if shape == "triangle" else 0)), glyph, fill=ink, font=font, anchor="mm")
    # Camera: pose, light, blur, noise.
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, fillcolor=bg)
    s = rng.uniform(0.75, 1.0) * size
    ox, oy = rng.uniform(0, size - s), rng.uniform(0, size - s)
    img = img.crop((ox, oy, ox + s, oy + s)).resize((size, size), Image.BILINEAR)
    img = img.point(lambda v, g=rng.uniform(0.35, 1.3): max(0, min(255, int(v * g))))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    noise = Image.effect_noise((size, size), rng.uniform(2, 20)).convert("RGB")
    return Image.blend(img, noise, 0.12).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


def make_synthetic(
    root: str | Path, tracks_per_class: int = 3, frames: int = 5, test_per_class: int = 4, seed: int = 0
) -> Path:
    """Render a synthetic GTSRB in torchvision's layout under root; returns root."""
    root = Path(root)
    rng = random.Random(seed)
    train = root / "gtsrb" / "GTSRB" / "Training"
    test = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True, exist_ok=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    n_test = 0
    for cls in range(NUM_CLASSES):
        folder = train / f"{cls:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        csv = [rows[0]]
        for t in range(tracks_per_class):
            for f in range(frames):
                name = f"{t:05d}_{f:05d}.ppm"
                render_sign(cls, rng).save(folder / name)
                csv.append(f"{name};{IMAGE_SIZE};{IMAGE_SIZE};0;0;{IMAGE_SIZE};{IMAGE_SIZE};{cls}")
        (folder / f"GT-{cls:05d}.csv").write_text("\n".join(csv) + "\n")
        for _ in range(test_per_class):
            name = f"{n_test:05d}.ppm"
            render_sign(cls, rng).save(test / name)
            rows.append(f"{name};{IMAGE_SIZE};{IMAGE_SIZE};0;0;{IMAGE_SIZE};{IMAGE_SIZE};{cls}")
            n_test += 1
    (root / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float() / 255
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", metavar="DIR", help="render the synthetic set into DIR")
    p.add_argument("--root", help="GTSRB root (default: $GTSRB_ROOT)")
    p.add_argument("--stats", action="store_true", help="print per-channel mean/std of the train split")
    args = p.parse_args()
    if args.synthetic:
        print(make_synthetic(args.synthetic))
    if args.stats:
        data = load_tensors(gtsrb(resolve_root(args.root), "train"))
        mean, std = channel_stats(data["images"])
        print(f"MEAN = {tuple(round(m, 4) for m in mean)}\nSTD = {tuple(round(s, 4) for s in std)}")


if __name__ == "__main__":
    main()
