"""The served network (timm mobilenetv3_small_100) and its distillation teacher, behind one input contract.

Input: uint8 [N, 3, IMAGE_SIZE, IMAGE_SIZE] straight from ``presets.EvalPreset``. Scaling to [0, 1],
normalisation and the upsampling to the working ``resolution`` happen inside, so they travel with the
exported TorchScript file and the handler cannot get them wrong.
"""

import timm
import torch
import torch.nn.functional as F
from torch import nn

from handler.presets import IMAGE_SIZE, MEAN, STD

ARCH = "mobilenetv3_small_100"
TEACHER_ARCH = "cnn_teacher"


class TeacherCNN(nn.Sequential):
    """A plain VGG-style CNN for 32-px signs (0.59 M parameters): the distillation teacher.

    Three blocks of two 3x3 conv+BN+ReLU and a 2x2 max-pool (32, 64, 128 channels), a 3x3 conv to 256,
    global average pool, dropout, linear. Dense 3x3 convolutions at full 32-px resolution are what
    GTSRB rewards (99.49% on the official test split in 20 epochs, measured); MobileNetV3's early
    stride-2 layers throw that resolution away, hence the student's upsampled input.
    """

    def __init__(self, num_classes: int, drop_rate: float = 0.3) -> None:
        layers, cin = [], 3
        for cout in (32, 64, 128):
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(cin, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate), nn.Linear(256, num_classes)]
        super().__init__(*layers)


INPUT_NORMS = ("dataset", "image")


class GTSRBClassifier(nn.Module):
    """``input_norm``: "dataset" scales every frame by the training set's mean/std; "image" standardises each frame
    by its own mean and spread (all pixels and channels together, so colour survives): a dark or flat photo reaches
    the net with the contrast of a bright one."""

    def __init__(self, net: nn.Module, resolution: int, input_norm: str = "dataset") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, not {input_norm!r}")
        self.net = net
        self.resolution = resolution
        self.image_size = IMAGE_SIZE
        self.image_norm = input_norm == "image"
        # 1/255 folded into the normalisation.
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(STD).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(MEAN).view(1, 3, 1, 1) / torch.tensor(STD).view(1, 3, 1, 1))
        # Calibration: logits are divided by a temperature fitted on held-out tracks after training
        # (training/evaluate.py); not a trained weight, so not in the checkpoints' state dict. The argmax, and
        # so the accuracy, does not move; the served softmax probabilities become calibrated ones.
        self.register_buffer("temperature", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_norm:
            x = x.float()
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            spread = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            x = (x - mean) / (spread + 4.0)  # +4 grey levels: a uniform frame stays ~0 instead of amplified noise
        else:
            x = x.float() * self.scale - self.shift
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.net(x) / self.temperature


def create_model(
    num_classes: int,
    resolution: int,
    *,
    arch: str = ARCH,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    input_norm: str = "dataset",
) -> GTSRBClassifier:
    if arch == TEACHER_ARCH:
        return GTSRBClassifier(TeacherCNN(num_classes, drop_rate), resolution, input_norm)
    kwargs = {}
    if pretrained_file:  # local timm weights; the classifier head is re-initialised for 43 classes
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file}
    net = timm.create_model(
        arch,
        pretrained=pretrained or bool(pretrained_file),
        num_classes=num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
    return GTSRBClassifier(net, resolution, input_norm)
