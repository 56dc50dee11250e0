"""Training-time augmentation: per-sample random geometry and photometry on a uint8 batch, on its device.

Not (yet) kornia.augmentation (issue #14: switch if within ~20% of this speed). `python -m bench.augment_speed`,
batch 256x3x32x32, two runs on this 2-core box while other jobs ran (2026-11-28), kornia 0.9.0 / TrainAugment
median time: 0.58 and 0.82 at 1 thread, 1.66 and 1.08 at 2 threads (torch's default here, what training
uses). Not consistently within 20%, and kornia's erasing and blur are close to these, not the same, so a
switch also needs a training run to confirm accuracy. Re-measure on an idle machine first.
"""

import torch


class TrainAugment:
    """Per-sample augmentation of a uint8 batch [B, 3, S, S] (``presets.EvalPreset`` output), on its device.

    Each image draws its own parameters. Measured on this 2-core box, ``transforms.v2`` applied per
    sample costs 1.5-3 ms an image (more than the training step itself), and applied to a batch tensor
    it draws one set of parameters for the whole batch; so the same operations (affine, colour jitter,
    blur, erasing) are written here as batched tensor code: ~0.15 ms an image (35 ms of CPU a batch of
    256 at one thread, bench/augment_speed.py).

    No horizontal flip (timm's default hflip=0.5 is wrong here: it turns "keep left" into "keep right"
    and mirrors digits). Geometry and photometry mimic a camera on a moving car: small rotations,
    shifts and scale changes of the detection box, shear, lighting, motion/focus blur, occlusion.
    """

    def __init__(
        self,
        *,
        degrees: float,
        translate: float,
        scale: tuple[float, float],
        shear: float,
        color_jitter: float,
        blur_p: float,
        erase_p: float,
    ) -> None:  # values: configs/gtsrb.yaml (train.make_augment)
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear
        self.color_jitter, self.blur_p, self.erase_p = color_jitter, blur_p, erase_p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        x = x.float()

        def u(lo, hi, *shape):
            return torch.empty(b, *shape, device=dev).uniform_(lo, hi)

        # Geometry: rotation, shear, isotropic scale and translation, one matrix per image.
        rot, shr = torch.deg2rad(u(-self.degrees, self.degrees)), torch.deg2rad(u(-self.shear, self.shear))
        sc = u(*self.scale)
        cos, sin = torch.cos(rot), torch.sin(rot)
        theta = torch.stack(
            [
                torch.stack([cos, -sin + torch.tan(shr) * cos, 2 * u(-self.translate, self.translate)], 1),
                torch.stack([sin, cos + torch.tan(shr) * sin, 2 * u(-self.translate, self.translate)], 1),
            ],
            1,
        ) / sc.view(b, 1, 1)
        theta[:, :, 2] *= sc.view(b, 1)  # translation is not scaled
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        # Photometry: brightness, contrast, saturation.
        if self.color_jitter > 0:
            j = self.color_jitter
            x = x * u(1 - j, 1 + j, 1, 1, 1)
            gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            x = gray.mean((2, 3), keepdim=True) + (x - gray.mean((2, 3), keepdim=True)) * u(1 - j, 1 + j, 1, 1, 1)
            gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            x = gray + (x - gray) * u(1 - j, 1 + j, 1, 1, 1)

        # Blur: a random share of a 3x3 box-ish Gaussian (sigma ~1) for some images.
        if self.blur_p > 0:
            k = torch.tensor([0.27, 0.46, 0.27], device=dev)
            k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
            blurred = torch.nn.functional.conv2d(
                torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3
            )
            w = (torch.rand(b, 1, 1, 1, device=dev) < self.blur_p) * u(0.3, 1.0, 1, 1, 1)
            x = x + w * (blurred - x)

        # Occlusion: one random rectangle (2-12% of the area) set to black.
        if self.erase_p > 0:
            h, wd = x.shape[-2:]
            area = u(0.02, 0.12) * h * wd
            ratio = torch.exp(u(-1.0, 1.0))
            eh, ew = (area * ratio).sqrt().clamp(max=h), (area / ratio).sqrt().clamp(max=wd)
            cy, cx = u(0, 1) * h, u(0, 1) * wd
            ys = torch.arange(h, device=dev).view(1, h, 1)
            xs = torch.arange(wd, device=dev).view(1, 1, wd)
            m = ((ys - cy.view(b, 1, 1)).abs() < eh.view(b, 1, 1) / 2) & (
                (xs - cx.view(b, 1, 1)).abs() < ew.view(b, 1, 1) / 2
            )
            m &= torch.rand(b, 1, 1, device=dev) < self.erase_p
            x = x.masked_fill(m.unsqueeze(1), 0.0)

        return x.clamp_(0, 255).round_().to(torch.uint8)
