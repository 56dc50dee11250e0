"""Saliency maps for /explanations: integrated gradients of the served TorchScript model.

Integrated gradients (Sundararajan et al. 2017) as captum's ``IntegratedGradients(method="gausslegendre")``
computes it; ``tests/test_handler.py`` checks that the two agree on the shipped model. Written here
instead of importing captum because ``captum.attr`` imports matplotlib: serving it would add ~75 MB of
packages to the image and ~30 MB to every worker for these few lines. Copied into the model archive as
a top-level module.
"""

import numpy as np
import torch


def integrated_gradients(
    model: torch.nn.Module, images: torch.Tensor, targets: list[int], *, baseline: torch.Tensor, steps: int = 32
) -> torch.Tensor:
    """Attributions [N, 3, H, W] of each image's ``targets[i]`` logit to its pixels, along the straight path
    from ``baseline`` (broadcast to [3, H, W]) to the image, by Gauss-Legendre quadrature over ``steps``
    points. The model takes pixel values in 0..255 (uint8 in serving; float here, so gradients flow)."""
    x = images.float()
    base = baseline.float().expand_as(x[0])
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32).view(-1, 1, 1, 1)
    weights = torch.tensor(weights / 2, dtype=torch.float32).view(-1, 1, 1, 1)
    out = torch.empty_like(x)
    with torch.enable_grad():
        for i, target in enumerate(targets):  # one image's path at a time: memory of `steps` images
            path = (base + alphas * (x[i] - base)).requires_grad_(True)
            (grads,) = torch.autograd.grad(model(path)[:, target].sum(), path)
            out[i] = (grads * weights).sum(0) * (x[i] - base)
    return out


def saliency_map(attributions: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] attributions -> [N, H, W] in [0, 1]: the magnitude summed over the colour channels,
    divided by its 99th percentile (so that a few extreme pixels do not leave the rest black), clipped."""
    m = attributions.abs().sum(1)
    scale = torch.quantile(m.flatten(1), 0.99, dim=1).clamp_min(1e-12)
    return (m / scale.view(-1, 1, 1)).clamp(0, 1)
