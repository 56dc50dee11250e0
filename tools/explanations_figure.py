"""Draw docs/explanations.png: real signs and the saliency maps a running server returns for them.

    make docs     # serves the shipped model and calls draw(); or, with `make serve` running:
    python -m tools.explanations_figure [--url http://127.0.0.1:8080]

Each sign is a shipped real sign (samples/), sent as it is to /explanations/gtsrb; the figure shows the 32x32
image the model sees (presets.EvalPreset), the map, and the map over the image.
"""

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))  # the archive's own modules, as the handler imports them
from presets import EvalPreset  # noqa: E402

CLASSES = (14, 1, 25, 12, 38, 33)  # stop, 30 km/h, road work, priority road, keep right, turn right ahead
OUT = ROOT / "docs" / "explanations.png"


def draw(url: str, out: Path = OUT) -> Path:
    """The figure of CLASSES' shipped signs as the server at ``url`` explains them, written to ``out``."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(CLASSES), figsize=(1.9 * len(CLASSES), 6.2))
    for col, cls in enumerate(CLASSES):
        (path,) = (ROOT / "samples").glob(f"{cls:02d}-*.png")
        r = requests.post(f"{url}/explanations/gtsrb", data=path.read_bytes(), timeout=60,
                          headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        r.raise_for_status()
        answer = r.json()
        seen = EvalPreset()(Image.open(path)).permute(1, 2, 0).numpy()
        saliency = np.array(answer["saliency"])
        axes[0, col].imshow(seen)
        axes[0, col].set_title(f"{answer['class']}\n{answer['probability']:.2f}", fontsize=8)
        axes[1, col].imshow(saliency, cmap="inferno", vmin=0, vmax=1)
        axes[2, col].imshow(seen)
        axes[2, col].imshow(saliency, cmap="inferno", vmin=0, vmax=1, alpha=0.6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(("model input (32x32)", "saliency", "overlay")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("POST /explanations/gtsrb: integrated gradients of the top-1 class", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})  # no matplotlib version: the same answers, the same file
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    print(draw(args.url, args.out))


if __name__ == "__main__":
    main()
