"""Image preprocessing shared by training and serving: the one definition of the data treatment.

Part of the model archive (like everything in handler/): training imports it from here.

Every image, in training and in the served handler, goes through ``EvalPreset``: RGB, the whole frame
resized to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (bilinear, aspect ratio not kept: that is how the GTSRB
copy we train on was made), as a uint8 CHW tensor. Normalisation (``MEAN``/``STD``) and the upsampling
to the network's working resolution are baked into the exported model (``training/model.py``), so the
handler never repeats them.

Copied into the model archive as a top-level module: it imports nothing from the project, and nothing
the server does not have. The eval transform is written with Pillow, not
torchvision: it is exactly ``v2.Compose([v2.RGB(), v2.Resize(size, BILINEAR, antialias=True),
v2.PILToTensor()])`` on a PIL image (those are the same Pillow calls, ``tests/test_training.py`` checks
it), and it keeps torchvision out of the serving image and the TorchServe workers (a CPU-only torch
wheel has no matching torchvision wheel on every index, and importing it costs worker memory).
"""

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 32
# Per-channel mean/std of the GTSRB training split at IMAGE_SIZE (training/data.py --stats recomputes them).
MEAN = (0.3398, 0.3117, 0.3210)
STD = (0.2755, 0.2647, 0.2712)


class EvalPreset:
    """PIL image (any mode) -> uint8 tensor [3, IMAGE_SIZE, IMAGE_SIZE]."""

    def __init__(self, *, size: int = IMAGE_SIZE) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # Resize the PIL image first: resizing in Pillow (antialiased bilinear) is cheaper than on a tensor.
        img = img.convert("RGB").resize((self.size, self.size), resample=Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def to_network_layout(x: torch.Tensor) -> torch.Tensor:
    """A batch [N, 3, S, S] in the memory layout the network runs in, in training and serving: channels-last
    (NHWC). On CPU the frozen graph's convolutions run 17% faster at batch 1 and ~30% at batch 8 than on the
    default NCHW layout, faster than its oneDNN form too (BENCHMARKS.md, "Latency"); logits agree to ~1e-6."""
    return x.contiguous(memory_format=torch.channels_last)


# Light per-image statistics for input-drift monitoring (tools/drift_report.py): computed on the
# EvalPreset tensor, the same way for the training reference and for served requests. Never the image.
STAT_NAMES = ("brightness", "contrast", "red", "green", "blue", "saturation", "sharpness")


def image_stats(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float [N, len(STAT_NAMES)], values in [0, 1]-ish units."""
    x = x.float() / 255
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    rgb = x.mean((2, 3))
    sat = (x.amax(1) - x.amin(1)).mean((1, 2))
    lap = (
        4 * gray[:, 1:-1, 1:-1] - gray[:, :-2, 1:-1] - gray[:, 2:, 1:-1] - gray[:, 1:-1, :-2] - gray[:, 1:-1, 2:]
    ).abs()
    return torch.stack([gray.mean((1, 2)), gray.std((1, 2)), rgb[:, 0], rgb[:, 1], rgb[:, 2], sat, lap.mean((1, 2))], 1)
