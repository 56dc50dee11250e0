"""Input-drift report: recent served inputs against the training distribution, as markdown and a figure.

    python -m tools.drift_report                                   # logs/gtsrb_inputs.jsonl* vs models/gtsrb_reference.json
    python -m tools.drift_report --build-reference --data-root DIR # (re)build the reference from the training split

The handler logs light statistics of each served image (presets.image_stats: brightness, contrast,
colour means, saturation, sharpness; its size; the top-1 class and probability), never the image.
The verdict is tools/drift_check.py's: a chi-square test per signal (the predicted-class mix, each statistic
in the training deciles) with Holm's correction, so a window of in-distribution traffic is flagged at most
1% of the time whatever its size. PSI is shown beside as a descriptive size of the shift. Malformed log
lines are skipped and counted. Writes a markdown report and a figure; exits 1 when drift is found.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from handler.presets import STAT_NAMES
from tools.drift_check import ALPHA, CLASS_SIGNAL, MIN_EFFECT, MIN_SAMPLES, check, decile_counts, read_log, summary

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "models" / "gtsrb_reference.json"


def compare(reference: dict, stats, classes, alpha: float = ALPHA) -> dict:
    """drift_check.check on a reference built from presets.image_stats (same statistics, same order)."""
    assert tuple(reference["stats"]) == STAT_NAMES, "the reference was built with other image statistics"
    return check(reference, np.asarray(stats, dtype=float), list(classes), alpha)


def write_report(result: dict, reference: dict, stats: np.ndarray, classes: list[int], bad: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    n = max(1, result["n"])
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (i, name) in zip(axes.flat, enumerate(STAT_NAMES)):
        edges = reference["stats"][name]
        ax.bar(range(len(edges) + 1), decile_counts(stats[:, i], edges) / n, label="served")
        ax.axhline(1 / (len(edges) + 1), color="k", ls="--", label="training")
        r = result["signals"][name]
        ax.set(title=f"{name}  p {r['p_adj']:.2g}  PSI {r['psi']:.3f}", xlabel="training decile", ylim=(0, 1))
    ax = axes.flat[-1]
    prior = reference["class_prior"]
    ax.bar(range(len(prior)), np.bincount(np.asarray(classes, dtype=int), minlength=len(prior)) / n, label="served")
    ax.step(range(len(prior)), prior, where="mid", color="k", label="training prior")
    r = result["signals"][CLASS_SIGNAL]
    ax.set(title=f"predicted class  p {r['p_adj']:.2g}  PSI {r['psi']:.3f}", xlabel="class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=90)
    plt.close(fig)
    if not result["tested"]:
        verdict = f"not tested (fewer than {MIN_SAMPLES} requests)"
    else:
        verdict = f"**DRIFT** in: {', '.join(result['drifted'])}" if result["drifted"] else "no drift"
    lines = [
        "# Input drift report",
        "",
        f"{result['n']} served requests against {reference['n']} training images: {verdict}.",
        f"{bad} malformed input-log lines skipped.",
        "",
        "| signal | chi-square | df | p (Holm) | effect (w) | PSI | |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {r['chi2']:.1f} | {r['df']} | {r['p_adj']:.2g} | {r['effect']:.3f} | {r['psi']:.3f} | {'drift' if k in result['drifted'] else ''} |"
        for k, r in result["signals"].items()
    ]
    lines += [
        "",
        f"Drift: a Holm-adjusted p-value at most {result['alpha']:g} (the chance that a window of training-like",
        f"traffic is flagged at all) and an effect size (Cohen's w) of at least {MIN_EFFECT:g}. PSI only describes",
        "how large a shift is (on small samples it is mostly noise).",
        "",
        "![drift](drift.png)",
        "",
    ]
    (out / "drift_report.md").write_text("\n".join(lines))
    return out / "drift_report.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--log", default=str(ROOT / "logs" / "gtsrb_inputs.jsonl*"), help="glob of the handler's input logs")
    p.add_argument("--last", type=int, default=5000, help="compare the most recent N requests")
    p.add_argument("--alpha", type=float, default=ALPHA, help="family-wise false-alarm rate (default: %(default)s)")
    p.add_argument("--output", type=Path, default=ROOT / "reports" / "drift")
    p.add_argument("--build-reference", action="store_true")
    p.add_argument("--data-root", help="GTSRB root for --build-reference (default $GTSRB_ROOT)")
    args = p.parse_args()
    if args.build_reference:
        from training import data as gdata
        from training.reference import build_reference

        d = gdata.load_tensors(gdata.gtsrb(gdata.resolve_root(args.data_root), "train"))
        args.reference.write_text(json.dumps(build_reference(d["images"], d["labels"], gdata.NUM_CLASSES)) + "\n")
        print(f"reference of {len(d['labels'])} training images -> {args.reference}")
        return
    reference = json.loads(args.reference.read_text())
    log = read_log(args.log, args.last, len(STAT_NAMES))
    result = compare(reference, log["stats"], log["classes"], args.alpha)
    if not result["tested"]:
        print(summary(result, log["bad_lines"]) + f" ({args.log})")
        return
    report = write_report(result, reference, log["stats"], log["classes"], log["bad_lines"], args.output)
    print(report.read_text())
    sys.exit(1 if result["drifted"] else 0)


if __name__ == "__main__":
    main()
