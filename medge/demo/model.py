"""The demo network: a small CNN that says whether a CT slice shows a lung nodule, and where.

Imported only where PyTorch is installed (training, and the tests of the
PyTorch import path); the run side uses the exported ONNX and never this file.
``tools/train_demo_model.py`` trains it; ``demo_model.pt`` holds its state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoLesionNet", "CHANNELS", "HEAD_CHANNELS", "MAP_CHANNELS", "MAP_STRIDE"]

#: Output channels of the five downsampling conv blocks.
CHANNELS = (16, 32, 64, 128, 256)
#: Channels of the stride-1 conv block after them. It brings the weights to
#: ~1 M parameters (~4 MB FP32): TensorRT-RTX's INT8 engines carry ~1 MB of
#: kernels (separate bias/ReLU/requantise epilogues) against ~0.4 MB for FP16 and
#: FP32 ones (measured with tensorrt-rtx 1.7, no GPU), so only with weights of
#: this size do the engines order INT8 < FP16 < FP32 as they should.
HEAD_CHANNELS = 256
#: Channels of the last feature map, the one global average pooling and the
#: linear layer read and so the one class activation maps are made of. 16, not
#: 32: with 32 the stride-4 part cost 10.6 M multiply-adds (+37 %) and ONNX
#: Runtime's batch-8 CPU latency grew by 40-90 % (16: 21-48 %), for the same
#: accuracy and a peak inside the nodule on every held-out lesion slice either way.
MAP_CHANNELS = 16
#: The last feature map's stride (the second block's output). The nodules have
#: a radius of 3.2..6.4 pixels at 128 x 128; a CAM peaks on a cell centre, and
#: every point is within stride / sqrt(2) of one: 2.8 pixels at stride 4, less
#: than the smallest radius, while stride 8 (5.7 pixels) misses small nodules
#: and the deep stride-32 map (cells of 32 pixels) misses nearly all of them.
MAP_STRIDE = 4


def _conv_block(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class DemoLesionNet(nn.Module):
    """Five 3x3 conv blocks (conv, BatchNorm, ReLU), each halving the resolution, one more at the
    deepest resolution; a top-down path that brings the deep features back to the stride-4 map of the
    second block (feature-pyramid style: 1x1 projections of both, the deep one upsampled bilinearly,
    added, BatchNorm, ReLU) and one 3x3 block there; then global average pooling and a linear layer
    to two logits (``["no_lesion", "lesion"]``; apply softmax for probabilities).

    Why this shape: the head stays global average pooling + linear, so the engine's class activation
    map is exactly Grad-CAM (medge.convert.explain), and the map it reads has cells of 4 pixels at 128
    (16 at 512), small enough for its peak to fall inside a nodule. The deep path gives each cell the
    context of the whole slice (inside the lung or not); the lateral one says where. The 32x32 part
    (one 1x1 and one 3x3 convolution of MAP_CHANNELS) adds 2.9 M multiply-adds per 128 x 128 image to
    the five-block network's 28.9 M (+10 %).

    Input: (N, 1, H, W) float32, preprocessed with the demo PreprocessSpec
    (any H, W divisible by 2 ** len(channels) works; the shipped model is trained at 128 x 128).
    """

    def __init__(self, channels: tuple[int, ...] = CHANNELS, head_channels: int = HEAD_CHANNELS,
                 map_channels: int = MAP_CHANNELS, num_classes: int = 2) -> None:
        super().__init__()
        if len(channels) < 3:
            raise ValueError("DemoLesionNet needs at least three downsampling blocks")
        self.stem = nn.Sequential(*_conv_block(1, channels[0], 2), *_conv_block(channels[0], channels[1], 2))
        deep: list[nn.Module] = []
        in_channels = channels[1]
        for out_channels, stride in [(c, 2) for c in channels[2:]] + [(head_channels, 1)]:
            deep += _conv_block(in_channels, out_channels, stride)
            in_channels = out_channels
        self.deep = nn.Sequential(*deep)
        # Projections before the upsampling: a 1x1 convolution commutes with bilinear resizing, so
        # projecting on the small map first costs 64x fewer multiply-adds for the same result.
        self.context = nn.Conv2d(head_channels, map_channels, 1, bias=False)
        self.lateral = nn.Conv2d(channels[1], map_channels, 1, bias=False)
        self.merge = nn.Sequential(nn.BatchNorm2d(map_channels), nn.ReLU(inplace=True))
        self.refine = nn.Sequential(*_conv_block(map_channels, map_channels, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(map_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, map_channels, H / 4, W / 4): what pooling and the classifier read."""
        fine = self.stem(x)
        context = nn.functional.interpolate(self.context(self.deep(fine)), size=fine.shape[-2:], mode="bilinear",
                                            align_corners=False)
        return self.refine(self.merge(self.lateral(fine) + context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)
