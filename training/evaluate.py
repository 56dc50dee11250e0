"""Measure models on held-out data: a training run (held-out tracks + the public test half, with calibration), or
any exported model on any split.

    python -m training.evaluate --run runs/gtsrb/latest --data-root DIR       # a run: calibrate, export, measure
    python -m training.evaluate --model models/gtsrb.pt --data-root DIR --split test   # any model, any split
    python -m training.evaluate --model NEW.pt --against OLD.pt --data-root DIR     # two models, image by image
    python -m training.evaluate --data-root DIR --split test --download       # fetch the official test split

A run is measured on its final weights (``last.pth``; the EMA when it has one), never on an epoch picked by the
validation tracks. The softmax temperature is fitted on the run's held-out tracks and baked into the exported
``model.pt``; the public test half is measured once, afterwards, and only read (the promotion gate compares it,
``training/promote.py``). ``evaluation.json`` in the run folder holds every number.
"""

import argparse
import logging
from pathlib import Path

import torch

from training import data as gdata
from training import export, metrics
from training.model import create_model

log = logging.getLogger("evaluate")
TEST_SPLIT = "test"  # torchvision's name; ../shared/data holds its public half (its README)


def public_test(root: str | None) -> dict | None:
    """The test split under ``root`` as tensors, or None where it is not there."""
    if not root or not (Path(root) / "gtsrb" / "GT-final_test.csv").is_file():
        return None
    return gdata.load_tensors(gdata.gtsrb(str(root), TEST_SPLIT), desc="decode test")


def measure(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    s = metrics.summarize(logits, labels, gdata.CLASS_NAMES)
    return {
        "n": s["n"],
        "top1": round(s["top1"], 6),
        "macro_f1": round(s["macro_f1"], 6),
        "ece": round(metrics.calibration_error(logits, labels), 6),
        "nll": round(s["loss"], 6),
        "worst": [{k: r[k] for k in ("class", "name", "support", "accuracy")} for r in metrics.worst_classes(s, 5)],
    }


def evaluate_run(
    run_dir: Path, data: dict | None = None, data_root: str | None = None, public_root: str | None = None,
    checkpoint: str = "last.pth", weights: str = "ema",
) -> dict:  # fmt: skip
    """Fit the temperature on the run's held-out tracks, export ``model.pt`` with it, measure, write
    ``evaluation.json``. ``data``: the training split as ``load_tensors`` returns it (else read from data_root).
    ``weights``: "ema" exports the run's weight EMA where it kept one, "raw" the trained weights themselves."""
    run_dir = Path(run_dir)
    ckpt = torch.load(run_dir / checkpoint, map_location="cpu", weights_only=False)
    args = ckpt["args"]
    if data is None:
        data = gdata.load_tensors(gdata.gtsrb(str(data_root), "train"), desc="decode train")
    val_idx = torch.arange(0)
    if args.get("val_fraction", 0) > 0:
        _, val_idx = gdata.track_split(data["labels"], data["tracks"], args["val_fraction"], args["seed"])
    test = public_test(public_root or data_root)

    use_ema = weights == "ema" and bool(ckpt.get("ema"))
    model = create_model(
        args["num_classes"], args["resolution"], arch=args["arch"], input_norm=args.get("input_norm", "dataset")
    )
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    model.eval()
    result = {"checkpoint": checkpoint, "epoch": ckpt["epoch"], "weights": "ema" if use_ema else "raw"}
    held = None
    if len(val_idx):
        val_x, val_y = data["images"][val_idx], data["labels"][val_idx]
        held = metrics.predict(model, val_x)
        model.temperature.fill_(metrics.fit_temperature(held, val_y))
        n_tracks = len(set(zip(val_y.tolist(), data["tracks"][val_idx].tolist())))
        result["held_out_tracks"] = {
            **measure(held / model.temperature, val_y), "ece_uncalibrated": round(metrics.calibration_error(held, val_y), 6),
            "tracks": n_tracks, "val_fraction": args["val_fraction"], "seed": args["seed"],
        }  # fmt: skip
    elif args.get("calibration_temperature"):
        # No held-out tracks (val_fraction 0): the recipe's temperature, fitted on the held-out tracks of a run of
        # the same recipe that held them out (training/README.md names it).
        model.temperature.fill_(args["calibration_temperature"])
    result["temperature"] = round(model.temperature.item(), 4)
    result["temperature_source"] = (
        "fitted on the held-out tracks" if held is not None
        else "the recipe's calibration_temperature" if args.get("calibration_temperature") else "none (1.0)"
    )  # fmt: skip
    model_path = export.save(model, run_dir / "model.pt")
    scripted = export.load(model_path)
    if test is not None:
        logits = metrics.predict(scripted, test["images"])
        uncalibrated = logits * model.temperature
        result["public_test"] = {
            **measure(logits, test["labels"]), "ece_uncalibrated": round(metrics.calibration_error(uncalibrated, test["labels"]), 6),
            "data_fingerprint": gdata.fingerprint(test["paths"]),
        }  # fmt: skip
    if ckpt.get("ema"):  # one run gives both: the other weights of the same run, same data (a diagnostic)
        other = create_model(
            args["num_classes"], args["resolution"], arch=args["arch"], input_norm=args.get("input_norm", "dataset")
        )
        other.load_state_dict(ckpt["model"] if use_ema else ckpt["ema"])
        key = "raw_weights" if use_ema else "ema_weights"
        result[key] = {}
        if held is not None:
            result[key]["held_out_top1"] = round(measure(metrics.predict(other, val_x), val_y)["top1"], 6)
        if test is not None:
            result[key]["public_test_top1"] = round(
                measure(metrics.predict(other, test["images"]), test["labels"])["top1"], 6
            )
    metrics.write_json(result, run_dir / "evaluation.json")
    log.info("evaluation of %s: %s", run_dir, summary_line(result))
    return result


def summary_line(ev: dict) -> str:
    parts = [f"T={ev['temperature']}"]
    for key, name in (("held_out_tracks", "held-out tracks"), ("public_test", "public test half")):
        if ev.get(key):
            parts.append(f"{name}: top-1 {ev[key]['top1']:.2%} ECE {ev[key]['ece']:.2%} (n={ev[key]['n']})")
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a training run folder: calibrate, export model.pt, measure")
    p.add_argument("--checkpoint", default="last.pth", help="with --run: which checkpoint of the run")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="with --run: the EMA (if kept) or raw")
    p.add_argument("--model", default="models/gtsrb.pt")
    p.add_argument("--data-root", help="GTSRB root (torchvision layout); default $GTSRB_ROOT")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--against", help="a second model: compare the two on the same images (exact McNemar test)")
    p.add_argument("--download", action="store_true")
    p.add_argument("--worst", type=int, default=5)
    p.add_argument("--report", type=Path, help="write metrics.json and confusion.png here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = gdata.resolve_root(args.data_root)
    if root is None:
        p.error("pass --data-root or set GTSRB_ROOT")
    if args.run:
        print(summary_line(evaluate_run(args.run, data_root=root, checkpoint=args.checkpoint, weights=args.weights)))
        return
    d = gdata.load_tensors(gdata.gtsrb(root, args.split, download=args.download), desc=f"decode {args.split}")
    logits = metrics.predict(export.load(args.model), d["images"])
    if args.against:
        other = metrics.predict(export.load(args.against), d["images"]).argmax(1)
        c = metrics.paired(logits.argmax(1), other, d["labels"])
        (lo_a, hi_a), (lo_b, hi_b) = c["top1_ci95"]
        print(f"{args.split} (n={c['n']}): {args.model} {c['top1'][0]:.2%} [{lo_a:.2%}, {hi_a:.2%}] vs "
              f"{args.against} {c['top1'][1]:.2%} [{lo_b:.2%}, {hi_b:.2%}] (95% Wilson)\n"
              f"  right only by {args.model}: {c['a_only']}, only by {args.against}: {c['b_only']}; "
              f"exact McNemar p = {c['p']:.3g}")  # fmt: skip
        return
    s = metrics.summarize(logits, d["labels"], gdata.CLASS_NAMES)
    s["ece"] = metrics.calibration_error(logits, d["labels"])
    print(
        f"{args.model} on {root} [{args.split}]: " + metrics.format_summary(s, args.worst) + f"\n  ECE {s['ece']:.2%}"
    )
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        metrics.write_json({k: v for k, v in s.items()}, args.report / "metrics.json")
        metrics.plot_confusion(s, args.report / "confusion.png", f"{args.split}: top-1 {s['top1']:.2%}")


if __name__ == "__main__":
    main()
