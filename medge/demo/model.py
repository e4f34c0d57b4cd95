"""The demo network: a small CNN that says whether a CT slice shows a lung nodule.

Imported only where PyTorch is installed (training, and the tests of the
PyTorch import path); the run side uses the exported ONNX and never this file.
``tools/train_demo_model.py`` trains it; ``demo_model.pt`` holds its state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoLesionNet", "CHANNELS"]

#: Output channels of the five conv blocks. Chosen so the weights (~0.39 M
#: parameters, ~1.6 MB FP32) dominate the engine size, which makes FP32 / FP16 /
#: INT8 engines visibly different, while the ONNX file stays under 2 MB.
CHANNELS = (16, 32, 64, 128, 256)


class DemoLesionNet(nn.Module):
    """Five 3x3 conv blocks (conv, BatchNorm, ReLU), each halving the resolution,
    then global average pooling and a linear layer to two logits
    (``["no_lesion", "lesion"]``; apply softmax for probabilities).

    Input: (N, 1, H, W) float32, preprocessed with the demo PreprocessSpec
    (any H, W divisible by 32 works; the shipped model is trained at 128 x 128).
    """

    def __init__(self, channels: tuple[int, ...] = CHANNELS, num_classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels in channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
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
