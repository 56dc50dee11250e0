"""The input-drift reference of a model: what its training images looked like (read by tools/drift_report.py).

Statistics are ``presets.image_stats``, the ones the handler logs for every served image.
"""

import torch

from handler.presets import STAT_NAMES, image_stats

BINS = 10


def build_reference(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Decile edges of each statistic over the training images, and the class prior."""
    stats = image_stats(images)
    q = torch.linspace(0, 1, BINS + 1)[1:-1]
    return {
        "n": len(labels),
        "stats": {name: torch.quantile(stats[:, i], q).tolist() for i, name in enumerate(STAT_NAMES)},
        "class_prior": (torch.bincount(labels, minlength=num_classes).float() / len(labels)).tolist(),
    }
