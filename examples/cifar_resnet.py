"""CIFAR-10 ResNet-20/56 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
Sec. 4.2), written for fdistill from the architecture description in ``../shared/README.md``.

The parameter names match the pre-trained weights in ``../shared/weights/resnet-cifar10``
(``conv1``, ``bn1``, ``layer1..3`` of BasicBlocks with ``conv1/bn1/conv2/bn2``, ``linear``), so

    model = resnet56()
    model.load_state_dict(safetensors.torch.load_file("resnet56.safetensors"))

works, and the model is a ready-made ``python:`` teacher for feature distillation::

    fdistill.create_teacher(
        "python:examples/cifar_resnet.py:resnet56",
        weights="../shared/weights/resnet-cifar10/resnet56.safetensors",
        feature_method="forward_features",          # (B, 64, 8, 8) for 32x32 inputs
        img_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)

Inputs are RGB in [0, 1] normalised with ImageNet's mean/std (``CIFAR_MEAN``/``CIFAR_STD`` below,
the values these weights were trained with).

Run it to measure the top-1 accuracy of the shared weights on an image folder::

    python examples/cifar_resnet.py --weights ../shared/weights/resnet-cifar10/resnet56.safetensors \\
        --data ../shared/data/cifar10-jpg-mini/val
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the normalisation the shared CIFAR weights were trained with (ImageNet's statistics)
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ShortcutA(nn.Module):
    """The paper's option-A shortcut: parameter-free; subsample by 2 and zero-pad the channels
    (``planes // 4`` zero planes on each side, so 16 -> 32 and 32 -> 64)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (B, C, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # (B, C + 2 * pad, H/2, W/2)


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if (stride != 1 or in_planes != planes) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 CIFAR images: 3 stages of n BasicBlocks with 16, 32, 64 channels.

    ``forward_features(x)`` -> the last stage's map (B, 64, H/4, W/4), i.e. (B, 64, 8, 8) for
    32x32 inputs: the natural token map for feature distillation (64 tokens of width 64).
    ``forward(x)`` -> (B, num_classes) logits (global average pool + ``linear``).
    """

    def __init__(self, num_blocks: int, num_classes: int = 10):
        super().__init__()
        self.num_blocks = num_blocks
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, num_blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, num_blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, num_blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.num_features = 64
        for m in self.modules():  # He init, as in the paper
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks: List[nn.Module] = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 64, H/4, W/4) last-stage map."""
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        x = self.layer1(x)  # (B, 16, H, W)
        x = self.layer2(x)  # (B, 32, H/2, W/2)
        return self.layer3(x)  # (B, 64, H/4, W/4)

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, 64, h, w) -> (B, num_classes)."""
        return self.linear(feat.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n = 3, 0.27 M parameters)."""
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n = 9, 0.85 M parameters)."""
    return CifarResNet(9, num_classes)


@torch.no_grad()
def evaluate_top1(model: nn.Module, folder: str, *, batch_size: int = 250, mean=CIFAR_MEAN, std=CIFAR_STD) -> float:
    """Top-1 accuracy (in [0, 1]) of ``model`` on an image folder with one sub-folder per class,
    class indices in sorted folder-name order (CIFAR-10's order for the shared data)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    ds = datasets.ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(dim=1) == y).sum()
        total += y.numel()
    return float(correct) / max(total, 1)


def main() -> None:
    import argparse

    from fdistill.weights import load_into, load_state_dict_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("resnet20", "resnet56"), default="resnet56")
    ap.add_argument("--weights", required=True, help="a .safetensors (or weights-only .pt) state dict")
    ap.add_argument("--data", required=True, help="image folder with class sub-folders")
    args = ap.parse_args()
    model = {"resnet20": resnet20, "resnet56": resnet56}[args.arch]()
    load_into(model, load_state_dict_file(args.weights), what=args.arch)
    print(f"{args.arch}: top-1 {100 * evaluate_top1(model, args.data):.2f}% on {args.data}")


if __name__ == "__main__":
    main()
