"""The demo network: a small CNN that says whether a CT slice shows a lung nodule.

Imported only where PyTorch is installed (training, and the tests of the
PyTorch import path); the run side uses the exported ONNX and never this file.
``tools/train_demo_model.py`` trains it; ``demo_model.pt`` holds its state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoLesionNet", "CHANNELS", "HEAD_CHANNELS"]

#: Output channels of the five downsampling conv blocks.
CHANNELS = (16, 32, 64, 128, 256)
#: Channels of the stride-1 conv block after them. It brings the weights to
#: ~0.98 M parameters (~3.9 MB FP32): TensorRT-RTX's INT8 engines carry ~1 MB of
#: kernels (separate bias/ReLU/requantise epilogues) against ~0.4 MB for FP16 and
#: FP32 ones (measured with tensorrt-rtx 1.7, no GPU), so only with weights of
#: this size do the engines order INT8 < FP16 < FP32 as they should.
HEAD_CHANNELS = 256


class DemoLesionNet(nn.Module):
    """Five 3x3 conv blocks (conv, BatchNorm, ReLU), each halving the resolution,
    one more at full resolution, then global average pooling and a linear layer to two logits
    (``["no_lesion", "lesion"]``; apply softmax for probabilities).

    Input: (N, 1, H, W) float32, preprocessed with the demo PreprocessSpec
    (any H, W divisible by 32 works; the shipped model is trained at 128 x 128).
    """

    def __init__(self, channels: tuple[int, ...] = CHANNELS, head_channels: int = HEAD_CHANNELS,
                 num_classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels, stride in [(c, 2) for c in channels] + [(head_channels, 1)]:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)
