"""Measure an exported model on any GTSRB root and split.

    python -m training.evaluate --model models/gtsrb.pt --data-root DIR --split test
    python -m training.evaluate --data-root DIR --split test --download   # fetch the official test split

Prints top-1, macro-F1 and the worst classes; --report DIR writes metrics.json and confusion.png.
"""

import argparse
import logging
from pathlib import Path

from training import data as gdata
from training import export, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/gtsrb.pt")
    p.add_argument("--data-root", help="GTSRB root (torchvision layout); default $GTSRB_ROOT")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--download", action="store_true")
    p.add_argument("--worst", type=int, default=5)
    p.add_argument("--report", type=Path, help="write metrics.json and confusion.png here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = gdata.resolve_root(args.data_root)
    if root is None:
        p.error("pass --data-root or set GTSRB_ROOT")
    d = gdata.load_tensors(gdata.gtsrb(root, args.split, download=args.download), desc=f"decode {args.split}")
    s = metrics.summarize(metrics.predict(export.load(args.model), d["images"]), d["labels"], gdata.CLASS_NAMES)
    print(f"{args.model} on {root} [{args.split}]: " + metrics.format_summary(s, args.worst))
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        metrics.write_json({k: v for k, v in s.items()}, args.report / "metrics.json")
        metrics.plot_confusion(s, args.report / "confusion.png", f"{args.split}: top-1 {s['top1']:.2%}")


if __name__ == "__main__":
    main()
