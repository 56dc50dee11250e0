"""Input-drift report: recent served inputs against the training distribution.

    python -m tools.drift_report                                   # logs/gtsrb_inputs.jsonl* vs models/gtsrb_reference.json
    python -m tools.drift_report --build-reference --data-root DIR # (re)build the reference from the training split

The handler logs light statistics of each served image (presets.image_stats: brightness, contrast,
colour means, saturation, sharpness; its size; the top-1 class and probability), never the image.
Each statistic and the predicted-class distribution are compared with the training reference by the
population stability index (PSI: < 0.1 stable, 0.1-0.2 moderate, > 0.2 drift). Writes a markdown report
and a figure; exits 1 when drift is found.
"""

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import torch

from handler.presets import STAT_NAMES
from training.reference import build_reference

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = ROOT / "models" / "gtsrb_reference.json"
MIN_SAMPLES = 100
EPS = 1e-4


def psi(expected: list[float], actual: list[float]) -> float:
    return sum((a - e) * math.log((a + EPS) / (e + EPS)) for e, a in zip(expected, actual))


def fractions(values: torch.Tensor, edges: list[float]) -> list[float]:
    idx = torch.bucketize(values.contiguous(), torch.tensor(edges))
    return (torch.bincount(idx, minlength=len(edges) + 1).float() / max(1, len(values))).tolist()


def compare(reference: dict, stats: torch.Tensor, classes: list[int], threshold: float = 0.2) -> dict:
    """PSI of each statistic and of the predicted classes; drift when any is over threshold."""
    rows = {}
    for i, name in enumerate(STAT_NAMES):
        edges = reference["stats"][name]
        rows[name] = psi([1 / (len(edges) + 1)] * (len(edges) + 1), fractions(stats[:, i], edges))
    prior = reference["class_prior"]
    counts = torch.bincount(torch.tensor(classes, dtype=torch.long), minlength=len(prior)).float()
    rows["predicted class"] = psi(prior, (counts / max(1, len(classes))).tolist())
    return {"n": len(classes), "psi": rows, "drifted": sorted(k for k, v in rows.items() if v > threshold)}


def read_log(pattern: str, last: int) -> tuple[torch.Tensor, list[int], list[float]]:
    records = []
    for path in sorted(glob.glob(pattern), key=lambda p: Path(p).stat().st_mtime):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    records = records[-last:]
    stats = torch.tensor([r["stats"] for r in records], dtype=torch.float32).reshape(-1, len(STAT_NAMES))
    return stats, [r["class"] for r in records], [r["p"] for r in records]


def write_report(result: dict, reference: dict, stats: torch.Tensor, classes: list[int], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (i, name) in zip(axes.flat, enumerate(STAT_NAMES)):
        edges = reference["stats"][name]
        ax.bar(range(len(edges) + 1), fractions(stats[:, i], edges), label="served")
        ax.axhline(1 / (len(edges) + 1), color="k", ls="--", label="training")
        ax.set(title=f"{name}  PSI {result['psi'][name]:.3f}", xlabel="training decile", ylim=(0, 1))
    ax = axes.flat[-1]
    prior = reference["class_prior"]
    counts = torch.bincount(torch.tensor(classes, dtype=torch.long), minlength=len(prior)).float()
    ax.bar(range(len(prior)), (counts / max(1, len(classes))).tolist(), label="served")
    ax.step(range(len(prior)), prior, where="mid", color="k", label="training prior")
    ax.set(title=f"predicted class  PSI {result['psi']['predicted class']:.3f}", xlabel="class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=90)
    plt.close(fig)
    verdict = f"**DRIFT** in: {', '.join(result['drifted'])}" if result["drifted"] else "no drift"
    lines = [
        "# Input drift report",
        "",
        f"{result['n']} served requests against {reference['n']} training images: {verdict}.",
        "",
        "| signal | PSI | |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {'drift' if k in result['drifted'] else ''} |" for k, v in result["psi"].items()]
    lines += ["", "PSI < 0.1 stable, 0.1-0.2 moderate, > 0.2 drift.", "", "![drift](drift.png)", ""]
    (out / "drift_report.md").write_text("\n".join(lines))
    return out / "drift_report.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--log", default=str(ROOT / "logs" / "gtsrb_inputs.jsonl*"), help="glob of the handler's input logs")
    p.add_argument("--last", type=int, default=5000, help="compare the most recent N requests")
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--output", type=Path, default=ROOT / "reports" / "drift")
    p.add_argument("--build-reference", action="store_true")
    p.add_argument("--data-root", help="GTSRB root for --build-reference (default $GTSRB_ROOT)")
    args = p.parse_args()
    if args.build_reference:
        from training import data as gdata

        d = gdata.load_tensors(gdata.gtsrb(gdata.resolve_root(args.data_root), "train"))
        args.reference.write_text(json.dumps(build_reference(d["images"], d["labels"], gdata.NUM_CLASSES)) + "\n")
        print(f"reference of {len(d['labels'])} training images -> {args.reference}")
        return
    reference = json.loads(args.reference.read_text())
    stats, classes, _ = read_log(args.log, args.last)
    if len(classes) < MIN_SAMPLES:
        print(f"only {len(classes)} served requests logged ({args.log}); need {MIN_SAMPLES} for a drift report")
        return
    result = compare(reference, stats, classes, args.threshold)
    report = write_report(result, reference, stats, classes, args.output)
    print(report.read_text())
    sys.exit(1 if result["drifted"] else 0)


if __name__ == "__main__":
    main()
