"""The promotion gate: a candidate replaces the shipped model only when it beats it on the public test half.

    python -m training.promote runs/gtsrb/latest                       # the gate; exit 1 when refused
    python -m training.promote runs/gtsrb/latest --register gtsrb      # ... and register the promoted version
    python -m training.promote runs/gtsrb/latest --override "why"      # replace anyway; the reason is recorded
    python -m training.promote --record-shipped --data-root DIR        # measure the shipped model, record it

Champion/challenger, as in a model registry: the shipped model (``models/gtsrb.pt``) is the champion, its
lineage (``models/gtsrb_lineage.json``) records its public-half top-1. A candidate is a training run folder
with ``model.pt`` and ``evaluation.json`` (``training/evaluate.py``: held-out tracks, public test half,
calibration). It is promoted when its public-half top-1 is strictly higher than the champion's recorded one;
otherwise the shipped files are left untouched and the command fails. A candidate that was never measured on
the public half (the data was not there) is refused too: we never ship what we could not measure. ``--override``
promotes anyway and writes the reason, and the numbers it overrode, into the lineage.
"""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("promote")
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "gtsrb.pt"


class Refused(Exception):
    pass


def lineage_path(model: Path) -> Path:
    return model.with_name(model.stem + "_lineage.json")


def champion_top1(model: Path) -> float | None:
    """The shipped model's recorded public-half top-1, or None (nothing shipped, or never measured there)."""
    path = lineage_path(model)
    if not path.is_file():
        return None
    return ((json.loads(path.read_text()).get("evaluation") or {}).get("public_test") or {}).get("top1")


def decide(candidate: dict, champion: float | None, shipped_exists: bool) -> tuple[bool, str]:
    """(promote?, why) from the candidate's evaluation and the champion's recorded public-half top-1."""
    mine = (candidate.get("public_test") or {}).get("top1")
    if mine is None:
        return False, "the candidate was not measured on the public test half (is the test split under the data root?)"
    if not shipped_exists:
        return True, f"nothing shipped yet; candidate public-half top-1 {mine:.4%}"
    if champion is None:
        return False, "the shipped model has no recorded public-half top-1 to compare with: record it first"
    if mine > champion:
        return True, f"candidate {mine:.4%} > shipped {champion:.4%} on the public test half"
    return False, f"candidate {mine:.4%} does not beat shipped {champion:.4%} on the public test half"


def teacher_digests(run_dir: Path) -> list[str]:
    """The weights digests of the teachers the run learnt from (export.weights_digest), from its config."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return []
    import yaml

    from training import export

    cfg = yaml.safe_load(config.read_text())
    return cfg["_run"].get("teacher_weights_sha256") or [export.weights_digest(t) for t in cfg.get("teacher") or []]


def promote(run_dir: Path, dest: Path = SHIPPED, override: str | None = None, register: str = "") -> dict:
    """Gate the run's model against ``dest``; on promotion copy model, reference and lineage there. Returns the
    lineage written; raises Refused (nothing written) when the gate says no and there is no override."""
    run_dir, dest = Path(run_dir), Path(dest)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    champion = champion_top1(dest)
    ok, why = decide(evaluation, champion, dest.is_file())
    log.info("promotion gate: %s", why)
    if not ok and not override:
        raise Refused(why)
    lineage = json.loads((run_dir / "lineage.json").read_text())
    lineage["evaluation"] = evaluation
    lineage.setdefault("teacher_weights_sha256", teacher_digests(run_dir))
    lineage["promotion"] = {
        "decision": "promoted" if ok else "override", "gate": why, "override": override or None,
        "replaced_public_top1": champion,
        "replaced_version": json.loads(lineage_path(dest).read_text()).get("registered_version")
        if lineage_path(dest).is_file() else None,
    }  # fmt: skip
    register = register or lineage.get("registered_model", "")
    if register:  # the registry learns the numbers, and its "champion" alias follows the shipped file
        from training import tracking  # MLflow only where a version is registered

        lineage["registered_model"] = register
        lineage["registered_version"] = tracking.promote_version(
            register, lineage["mlflow_run_id"], run_dir / "model.pt", lineage
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "model.pt", dest)
    shutil.copyfile(run_dir / "reference.json", dest.with_name(dest.stem + "_reference.json"))
    lineage_path(dest).write_text(json.dumps(lineage, indent=2) + "\n")
    return lineage


def record_shipped(dest: Path, data_root: str) -> dict:
    """Measure the shipped model on the public test half and record the number in its lineage (the champion's
    baseline, for a model shipped before the gate existed). Returns the measurement."""
    from training import evaluate, export, metrics

    test = evaluate.public_test(data_root)
    if test is None:
        raise SystemExit(f"no public test half under {data_root}")
    logits = metrics.predict(export.load(dest), test["images"])
    measured = {
        **evaluate.measure(logits, test["labels"]),
        "data_fingerprint": evaluate.gdata.fingerprint(test["paths"]),
    }
    lineage = json.loads(lineage_path(dest).read_text())
    lineage.setdefault("evaluation", {})["public_test"] = measured
    lineage_path(dest).write_text(json.dumps(lineage, indent=2) + "\n")
    return measured


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="the candidate's run folder (model.pt, evaluation.json, ...)")
    p.add_argument("--dest", type=Path, default=SHIPPED, help="the shipped model file (default models/gtsrb.pt)")
    p.add_argument("--override", metavar="REASON", help="promote even when the gate refuses; REASON is recorded")
    p.add_argument("--register", default="", help="register the promoted model as a version of this MLflow model")
    p.add_argument("--record-shipped", action="store_true", help="measure --dest on the public half, record it")
    p.add_argument("--data-root", help="with --record-shipped: the GTSRB root holding the test split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.record_shipped:
        m = record_shipped(args.dest, args.data_root)
        print(f"{args.dest}: public test half top-1 {m['top1']:.4%}, ECE {m['ece']:.2%} (n={m['n']}), recorded")
        return 0
    if args.run is None:
        p.error("the candidate's run folder is required")
    try:
        lineage = promote(args.run, args.dest, args.override, args.register)
    except Refused as e:
        print(f"REFUSED: {e}; {args.dest} is unchanged (--override REASON replaces it anyway)", file=sys.stderr)
        return 1
    print(f"{lineage['promotion']['decision'].upper()}: {lineage['promotion']['gate']} -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
