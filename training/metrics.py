"""Classification metrics and the report figures (confusion matrix, training curves)."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from training.data import NUM_CLASSES


@torch.inference_mode()
def predict(model, images: torch.Tensor, device="cpu", batch_size: int = 512) -> torch.Tensor:
    """Logits of a uint8 image tensor, in batches."""
    model.eval()
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def summarize(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Top-1, macro-F1, per-class accuracy/F1 and the confusion matrix (rows: true, columns: predicted)."""
    preds = logits.argmax(1)
    cm = torch.bincount(labels * NUM_CLASSES + preds, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
    tp = cm.diag().float()
    support, predicted = cm.sum(1).float(), cm.sum(0).float()
    recall = tp / support.clamp(min=1)
    precision = tp / predicted.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = support > 0
    names = class_names or [str(i) for i in range(NUM_CLASSES)]
    return {
        "n": len(labels),
        "top1": (preds == labels).float().mean().item(),
        "top5": (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item(),
        "macro_f1": f1[present].mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "per_class": [
            {"class": i, "name": names[i], "support": int(support[i]), "accuracy": recall[i].item(), "f1": f1[i].item()}
            for i in range(NUM_CLASSES)
        ],
        "confusion": cm.tolist(),
    }


def paired(preds_a: torch.Tensor, preds_b: torch.Tensor, labels: torch.Tensor) -> dict:
    """Two models' answers on the same images, compared pairwise (exact McNemar test): only the images exactly one
    of them gets right tell them apart. ``a_only``/``b_only``: right only by A / only by B; ``p``: two-sided
    probability of a split at least that uneven if both were equally good; ``top1_ci95``: each top-1's Wilson
    interval, the spread of the number itself over a test set of this size."""
    from scipy.stats import binomtest  # training only: not in the serving environment

    right_a, right_b = preds_a == labels, preds_b == labels
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    n = len(labels)

    def ci(k: int) -> list[float]:
        interval = binomtest(k, n).proportion_ci(0.95, method="wilson")
        return [round(interval.low, 6), round(interval.high, 6)]

    p = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {
        "n": n,
        "top1": [right_a.float().mean().item(), right_b.float().mean().item()],
        "top1_ci95": [ci(int(right_a.sum())), ci(int(right_b.sum()))],
        "a_only": a_only,
        "b_only": b_only,
        "p": float(p),
    }


def calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the softmax top-1 probability: 15 equal-width bins, weighted by count."""
    conf, pred = logits.float().softmax(1).max(1)
    correct = (pred == labels).float()
    which = (conf * bins).long().clamp(max=bins - 1)
    n = torch.bincount(which, minlength=bins).float()
    gap = (torch.bincount(which, correct, minlength=bins) - torch.bincount(which, conf, minlength=bins)).abs()
    return (gap.sum() / n.sum()).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al., 2017), by a
    log-spaced grid search refined once: one convex parameter, no optimiser state, the same answer every time."""
    logits = logits.float()

    def nll(ts: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.cross_entropy(logits / t, labels) for t in ts])

    grid = torch.logspace(-1, 1, 81)  # 0.1 .. 10
    best = grid[nll(grid).argmin()]
    fine = best * torch.logspace(-0.025, 0.025, 51)
    return round(fine[nll(fine).argmin()].item(), 4)


def worst_classes(summary: dict, k: int = 5) -> list[dict]:
    rows = [r for r in summary["per_class"] if r["support"] > 0]
    return sorted(rows, key=lambda r: r["accuracy"])[:k]


def format_summary(summary: dict, k: int = 5) -> str:
    lines = [
        f"top-1 {summary['top1']:.2%}  top-5 {summary['top5']:.2%}  macro-F1 {summary['macro_f1']:.4f}  (n={summary['n']})"
    ]
    lines += [
        f"  worst: {r['class']:2d} {r['name']:<45} acc {r['accuracy']:.2%}  (n={r['support']})"
        for r in worst_classes(summary, k)
    ]
    return "\n".join(lines)


def plot_confusion(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.tensor(summary["confusion"]).float()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(11, 10))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set(
        xlabel="predicted class", ylabel="true class", title=title, xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES)
    )
    ax.tick_params(labelsize=6)
    for i, j in zip(*torch.nonzero((cm > 0) & ~torch.eye(NUM_CLASSES, dtype=torch.bool), as_tuple=True)):
        ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="w", fontsize=5)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [h["train_loss"] for h in history], label="train loss")
    if "val_loss" in history[0]:
        a.plot(ep, [h["val_loss"] for h in history], label="val loss")
        b.plot(ep, [100 * h["val_top1"] for h in history], label="val top-1 (%)")
        b.plot(ep, [100 * h["val_macro_f1"] for h in history], label="val macro-F1 (x100)")
        b.set_ylim(max(0, min(100 * h["val_top1"] for h in history[len(history) // 3 :]) - 2), 100)
    b.plot(ep, [100 * h["train_top1"] for h in history], label="train top-1 (%, augmented)")
    a.set(xlabel="epoch", yscale="log", title="loss")
    b.set(xlabel="epoch", title="accuracy")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(obj, path: Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
