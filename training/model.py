"""The served network: timm mobilenetv3_small_100 behind a fixed input contract.

Input: uint8 [N, 3, IMAGE_SIZE, IMAGE_SIZE] straight from ``presets.EvalPreset``. Scaling to [0, 1],
normalisation and the upsampling to the working ``resolution`` happen inside, so they travel with the
exported TorchScript file and the handler cannot get them wrong.
"""

import timm
import torch
import torch.nn.functional as F
from torch import nn

from training.presets import IMAGE_SIZE, MEAN, STD

ARCH = "mobilenetv3_small_100"


class GTSRBClassifier(nn.Module):
    def __init__(self, net: nn.Module, resolution: int) -> None:
        super().__init__()
        self.net = net
        self.resolution = resolution
        self.image_size = IMAGE_SIZE
        # 1/255 folded into the normalisation.
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(STD).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(MEAN).view(1, 3, 1, 1) / torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale - self.shift
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.net(x)


def create_model(
    num_classes: int,
    resolution: int,
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> GTSRBClassifier:
    kwargs = {}
    if pretrained_file:  # local timm weights; the classifier head is re-initialised for 43 classes
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file}
    net = timm.create_model(
        ARCH,
        pretrained=pretrained or bool(pretrained_file),
        num_classes=num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
    return GTSRBClassifier(net, resolution)
