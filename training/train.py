"""Train mobilenetv3_small_100 on GTSRB and export the TorchScript model.

    python -m training.train -c training/configs/teacher.yaml                    # the distillation teacher
    python -m training.train -c training/configs/gtsrb.yaml                      # the shipped recipe (student)
    python -m training.train -c training/configs/gtsrb.yaml --val-fraction 0.15  # hold out 15% of tracks
    python -m training.train --synthetic --epochs 2 --output runs/smoke          # no GTSRB at hand
    python -m training.train -c runs/gtsrb/config.yaml --resume runs/gtsrb/last.pth

Command-line flags override the YAML config; the resolved config is written next to the outputs.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm.utils
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from handler.presets import IMAGE_SIZE, to_network_layout
from training import data as gdata
from training import evaluate, export, metrics, promote, tracking
from training.augment import TrainAugment
from training.model import ARCH, TEACHER_ARCH, create_model
from training.reference import build_reference

log = logging.getLogger("train")
CONFIGS = Path(__file__).resolve().parent / "configs"
RECIPE = CONFIGS / "gtsrb.yaml"


# ---------------------------------------------------------------------------- arguments


def get_args_parser() -> argparse.ArgumentParser:
    """The flags. Their defaults are the shipped recipe, ``configs/gtsrb.yaml`` (the one definition)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML overrides on top of configs/gtsrb.yaml (e.g. configs/teacher.yaml)")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", help="GTSRB root (torchvision layout); default $GTSRB_ROOT")
    g.add_argument("--download", action="store_true", help="download GTSRB into --data-root (needs internet)")
    g.add_argument("--synthetic", action="store_true", help="train on the rendered synthetic set (offline demo/tests)")
    g.add_argument("--val-fraction", type=float, help="fraction of tracks held out; 0 = train on all")
    g.add_argument("--balance", type=float, help="sample classes with weight count^-balance (0 = natural)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=[ARCH, TEACHER_ARCH, "mobilenetv3_large_075", "mobilenetv3_large_100"])
    g.add_argument("--resolution", type=int, help="working resolution of the net (input upsampled)")
    g.add_argument("--pretrained", action="store_true", help="start from timm's ImageNet weights (needs internet)")
    g.add_argument("--pretrained-file", help="start from local timm weights (.pth/.safetensors)")
    g.add_argument("--input-norm", choices=["dataset", "image"], help="dataset mean/std, or each frame's own")
    g.add_argument("--drop-rate", type=float)
    g.add_argument("--drop-path-rate", type=float)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--ema-decay", type=float, help="0 disables the weight EMA")
    g.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    g = p.add_argument_group("distillation (the teacher sees the same augmented batch as the student)")
    g.add_argument(
        "--teacher", nargs="*", help="teacher checkpoint(s) (.pth); several = a committee; none = labels only"
    )
    g.add_argument("--distill-alpha", type=float, help="weight of the distillation loss (1-alpha: labels)")
    g.add_argument("--distill-temperature", type=float)
    g = p.add_argument_group("augmentation (per sample; no horizontal flip)")
    for flag in AUGMENT_FLAGS:
        g.add_argument(flag, type=float)
    g = p.add_argument_group("run")
    g.add_argument("--output", help="experiment folder: each run gets <output>/<time>-xxxx/, <output>/latest -> it")
    g.add_argument("--export", default="", help="promote the model here through the gate (make train: models/gtsrb.pt)")
    g.add_argument("--register", default="", help="register the model as a new version of this MLflow model name")
    g.add_argument("--public-root", help="GTSRB root holding the public test half (default: the data root)")
    g.add_argument("--promote-override", metavar="REASON", help="--export even when the promotion gate refuses")
    g.add_argument(
        "--calibration-temperature", type=float,
        help="softmax temperature baked in when no tracks are held out (0 = fit it on the held-out tracks)",
    )  # fmt: skip
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    g.add_argument("--resume", help="checkpoint to continue from")
    return p


AUGMENT_FLAGS = ("--degrees", "--translate", "--scale-min", "--scale-max", "--shear", "--color-jitter", "--blur-p",
                 "--erase-p")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """configs/gtsrb.yaml, then the -c file on top, then the command line."""
    p = get_args_parser()
    pre, _ = p.parse_known_args(argv)
    known = {a.dest for a in p._actions}
    for path in dict.fromkeys([RECIPE, *([Path(pre.config)] if pre.config else [])]):
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        if unknown := set(cfg) - known:
            p.error(f"unknown keys in {path}: {sorted(unknown)}")
        p.set_defaults(**cfg)
    return p.parse_args(argv)


def make_augment(args) -> TrainAugment:
    return TrainAugment(
        degrees=args.degrees, translate=args.translate, scale=(args.scale_min, args.scale_max), shear=args.shear,
        color_jitter=args.color_jitter, blur_p=args.blur_p, erase_p=args.erase_p,
    )  # fmt: skip


# ---------------------------------------------------------------------------- data


def load_data(args) -> dict:
    if args.synthetic:
        root = Path(tempfile.mkdtemp(prefix="gtsrb-synthetic-"))
        gdata.make_synthetic(root)
        source = "synthetic (rendered signs, NOT real GTSRB)"
    else:
        root = gdata.resolve_root(args.data_root)
        if root is None:
            sys.exit(
                "no GTSRB root: pass --data-root DIR (with --download to fetch it) or set GTSRB_ROOT, or use --synthetic"
            )
        source = f"GTSRB train split at {root}"
    ds = gdata.gtsrb(str(root), "train", download=args.download)
    log.info(f"data: {source}: {len(ds)} images")
    d = gdata.load_tensors(ds, desc="decode")
    d["source"], d["fingerprint"], d["root"] = source, gdata.fingerprint(d["paths"]), str(root)
    return d


class BatchSampler:
    """Shuffled batches of the preloaded uint8 frames, indexed in one step.

    A DataLoader over a TensorDataset collates 256 single-image tensors per batch; slicing the one tensor
    with a permutation costs a fraction of that (training/README.md, "Where an epoch goes").
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, args) -> None:
        self.images, self.labels, self.batch_size = images, labels, args.batch_size
        self.g = torch.Generator().manual_seed(args.seed)
        self.weights = None
        if args.balance > 0:
            counts = torch.bincount(labels, minlength=gdata.NUM_CLASSES).float()
            self.weights = counts[labels] ** -args.balance

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size  # drop_last

    def __iter__(self):
        n = len(self.labels)
        if self.weights is None:
            order = torch.randperm(n, generator=self.g)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.g)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


def make_loader(d: dict, idx: torch.Tensor, args) -> BatchSampler:
    """Batches of decoded uint8 images; augmentation happens per batch on the device (TrainAugment)."""
    return BatchSampler(d["images"][idx], d["labels"][idx], args)


# ---------------------------------------------------------------------------- loop


def distillation_loss(logits, teacher_logits, y, args) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * label-smoothed cross-entropy."""
    ce = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    if teacher_logits is None:
        return ce
    t = args.distill_temperature
    kd = F.kl_div(
        F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True
    )
    return args.distill_alpha * kd * t * t + (1 - args.distill_alpha) * ce


@torch.no_grad()
def committee_logits(teachers, x) -> torch.Tensor | None:
    """Mean logits of the teachers on this (augmented) batch; None without teachers."""
    if not teachers:
        return None
    return torch.stack([t(x).float() for t in teachers]).mean(0)


def train_one_epoch(model, ema, loader, augment, optimizer, scheduler, epoch, args, teachers=()) -> dict:
    model.train()
    total, t0 = 0, time.time()
    correct = torch.zeros((), device=args.device)
    loss_sum = torch.zeros((), device=args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda"))
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x = to_network_layout(augment(x.to(args.device, non_blocking=True)))
        y = y.to(args.device, non_blocking=True)
        with amp:
            teacher_logits = committee_logits(teachers, x)
            logits = model(x)
            loss = distillation_loss(logits.float(), teacher_logits, y, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        total += len(y)
        correct += (logits.argmax(1) == y).sum()
        loss_sum += loss.detach().float() * len(y)
        if step % 20 == 0:  # .item() waits for the device: not every step
            bar.set_postfix(loss=f"{loss_sum.item() / total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if args.max_steps and step + 1 >= args.max_steps:
            break
    dt = time.time() - t0
    return {
        "train_loss": loss_sum.item() / total,
        "train_top1": correct.item() / total,
        "epoch_s": dt,
        "img_per_s": total / dt,
    }


def lr_lambda(args, steps_per_epoch: int):
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch

    def f(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def new_run_dir(base: Path) -> Path:
    """A fresh folder per run under ``base`` (never overwritten), and ``base/latest`` pointing at it."""
    base.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))
    link = base / f".latest-{run_dir.name}"
    link.symlink_to(run_dir.name)
    os.replace(link, base / "latest")  # atomic: a reader never sees a missing pointer
    return run_dir


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # --resume continues in the checkpoint's own folder; a new run gets a new one.
    out = Path(args.resume).resolve().parent if args.resume else new_run_dir(Path(args.output))
    file_log = logging.FileHandler(out / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(file_log)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    d = load_data(args)
    if args.val_fraction > 0:
        train_idx, val_idx = gdata.track_split(d["labels"], d["tracks"], args.val_fraction, args.seed)
    else:
        train_idx, val_idx = torch.arange(len(d["labels"])), torch.arange(0)
    log.info(f"split by track: {len(train_idx)} train / {len(val_idx)} val images")
    loader = make_loader(d, train_idx, args)
    augment = make_augment(args)
    val_x, val_y = d["images"][val_idx], d["labels"][val_idx]

    model = create_model(
        gdata.NUM_CLASSES, args.resolution, arch=args.arch, pretrained=args.pretrained, pretrained_file=args.pretrained_file,
        drop_rate=args.drop_rate, drop_path_rate=args.drop_path_rate, input_norm=args.input_norm,
    ).to(args.device, memory_format=torch.channels_last)  # fmt: skip
    # No weight decay on biases and BatchNorm parameters.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps = min(len(loader), args.max_steps or len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, steps))
    ema = timm.utils.ModelEmaV3(model, decay=args.ema_decay) if args.ema_decay > 0 else None
    if missing := [t for t in args.teacher if not Path(t).is_file()]:
        sys.exit(
            f"teacher checkpoint {missing[0]} not found: `make teacher` trains it; `--teacher` alone = labels only"
        )
    teachers = [
        export.load_checkpoint(t).to(args.device, memory_format=torch.channels_last).eval() for t in args.teacher
    ]
    if teachers and len(val_y):
        for path, t in zip(args.teacher, teachers):
            s = metrics.summarize(metrics.predict(t, val_x, args.device), val_y)
            log.info(f"teacher {path}: val top-1 {s['top1']:.2%} (meaningful only if it never saw these tracks)")

    start, history, best, mlflow_run_id = 1, [], -1.0, None
    if args.resume:
        ckpt = torch.load(args.resume, map_location=args.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ema is not None and ckpt.get("ema"):
            ema.module.load_state_dict(ckpt["ema"])
        start, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
        mlflow_run_id = ckpt.get("mlflow_run_id")
        log.info(f"resumed from {args.resume} at epoch {start}")

    run_info = {
        "arch": args.arch, "num_classes": gdata.NUM_CLASSES, "image_size": IMAGE_SIZE, "data_source": d["source"],
        "data_fingerprint": d["fingerprint"], "git_commit": git_commit(), "torch": str(torch.__version__),
        "teacher_sha256": [hashlib.sha256(Path(t).read_bytes()).hexdigest() for t in args.teacher],
        "teacher_weights_sha256": [export.weights_digest(t) for t in args.teacher],
    }  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "_run": run_info}, sort_keys=False))
    run = tracking.start_run(
        "gtsrb-teacher" if args.arch == TEACHER_ARCH else "gtsrb", out.name, config, run_info, run_id=mlflow_run_id
    )
    mlflow_run_id = run.info.run_id
    log.info(f"{args.arch} @ {args.resolution}px, {len(teachers)} teacher(s), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
             f"{args.epochs} epochs x {steps} steps, device {args.device}, output {out}")  # fmt: skip

    t_start = time.time()
    for epoch in range(start, args.epochs + 1):
        row = {
            "epoch": epoch,
            **train_one_epoch(model, ema, loader, augment, optimizer, scheduler, epoch, args, teachers),
        }
        eval_model = ema.module if ema is not None else model
        msg = ""
        if len(val_y):
            s = metrics.summarize(metrics.predict(eval_model, val_x, args.device), val_y)
            row |= {"val_loss": s["loss"], "val_top1": s["top1"], "val_macro_f1": s["macro_f1"]}
            msg = f" | val loss {s['loss']:.4f} top-1 {s['top1']:.2%} macro-F1 {s['macro_f1']:.4f}"
            if ema is not None and (epoch % 5 == 0 or epoch == args.epochs):  # one run measures EMA vs raw
                raw = metrics.summarize(metrics.predict(model, val_x, args.device), val_y)
                row |= {"val_top1_raw": raw["top1"], "val_loss_raw": raw["loss"]}
                msg += f" (raw weights: top-1 {raw['top1']:.2%})"
        history.append(row)
        tracking.log_epoch(row)
        log.info(f"epoch {epoch:3d} | train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2%} | "
                 f"{row['img_per_s']:.0f} img/s {row['epoch_s']:.0f}s{msg}")  # fmt: skip
        score = row.get("val_top1", epoch)  # without a val split the last epoch is the one kept
        ckpt = {
            "model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "epoch": epoch,
            "args": {**config, "num_classes": gdata.NUM_CLASSES}, "history": history, "best": max(best, score),
            "mlflow_run_id": mlflow_run_id,
        }  # fmt: skip
        torch.save(ckpt, out / "last.pth")
        if score > best:
            best = score
            torch.save(ckpt, out / "best.pth")
    wall = time.time() - t_start

    # ---- export and reports
    # The final weights (the EMA when kept), never an epoch picked on the validation tracks: those tracks
    # calibrate the temperature and measure the model, they do not choose it (training/evaluate.py).
    evaluation = evaluate.evaluate_run(out, data=d, public_root=args.public_root or d["root"])
    model_path = out / "model.pt"
    result = {"run": run_info, "run_dir": str(out), "mlflow_run_id": mlflow_run_id, "train_wall_s": round(wall, 1)}
    result["history"] = history
    result["train_img_per_s"] = round(sum(h["img_per_s"] for h in history) / max(1, len(history)), 1)
    result["evaluation"] = evaluation
    metrics.plot_curves(history, out / "curves.png")
    if len(val_y):
        s = metrics.summarize(metrics.predict(export.load(model_path), val_x), val_y, gdata.CLASS_NAMES)
        result["val"] = s
        metrics.plot_confusion(s, out / "confusion.png", f"validation (held-out tracks), top-1 {s['top1']:.2%}")
        log.info("exported model on validation tracks: " + metrics.format_summary(s))
    metrics.write_json(result, out / "metrics.json")
    # Input-drift reference (tools/drift_report.py): statistics of the images this model was trained on.
    reference = build_reference(d["images"][train_idx], d["labels"][train_idx], gdata.NUM_CLASSES)
    (out / "reference.json").write_text(json.dumps(reference) + "\n")
    log.info(f"done in {wall / 60:.1f} min: {model_path} ({os.path.getsize(model_path) / 1e6:.1f} MB); "
             + evaluate.summary_line(evaluation))  # fmt: skip
    tracking.log_outputs(out)
    lineage = {"mlflow_run_id": mlflow_run_id, "run_dir": str(out), **run_info}
    if args.register:
        lineage["registered_model"] = args.register
        lineage["registered_version"] = tracking.register(args.register, mlflow_run_id, run_info)
        log.info(f"registered {args.register} version {lineage['registered_version']} (run {mlflow_run_id})")
    tracking.end_run()
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    try:
        if args.export:  # the promotion gate: refuses (raises promote.Refused) a model that does not beat the shipped
            promoted = promote.promote(out, Path(args.export), override=args.promote_override)
            result["promotion"] = promoted["promotion"]
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except promote.Refused as e:
        sys.exit(f"REFUSED by the promotion gate: {e}. The shipped model is unchanged; the candidate stays in its run "
                 "folder (--promote-override REASON ships it anyway, recording the reason).")  # fmt: skip
