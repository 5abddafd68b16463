"""The small CNN that judges generated digits (class accuracy, "digits-FID" features).

A plain diffusers model: it is trained once and cached by `sadm.evaluation.digits.load_or_train_digit_classifier`, and
wrapped as a feature network by `sadm.evaluation.DigitsFeatures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class DigitClassifierOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `[B, num_classes]`): raw class scores.
        features (`torch.Tensor` of shape `[B, feature_dim]`): penultimate features (used for digits-FID).
    """

    logits: torch.Tensor
    features: torch.Tensor


class DigitClassifier(ModelMixin, ConfigMixin):
    r"""
    conv-BN-ReLU, max-pool, (conv-BN-ReLU) x2, max-pool -> 4x4 adaptive average pool -> linear -> ReLU (features) -> linear (logits).

    Args:
        resolution (`int`): input height and width.
        in_channels (`int`): input channels (1 for digits).
        num_classes (`int`): number of classes.
        hidden_channels (`tuple[int, int]`): channels of the two conv stages.
        feature_dim (`int`): size of the penultimate features.
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden_channels: tuple[int, int] = (16, 32),
        feature_dim: int = 128,
    ):
        super().__init__()
        c1, c2 = hidden_channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.conv = nn.Sequential(
            *block(in_channels, c1), nn.MaxPool2d(2), *block(c1, c2), *block(c2, c2), nn.MaxPool2d(2)
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.to_features = nn.Sequential(nn.Linear(c2 * 16, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        expected = (self.config.in_channels, self.config.resolution, self.config.resolution)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"DigitClassifier expects [B, {', '.join(map(str, expected))}] inputs, got {tuple(pixel_values.shape)}."
            )

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate features `[B, feature_dim]` of images `[B, C, R, R]` in [-1, 1]."""
        self._check_input(pixel_values)
        h = self.conv(pixel_values)  # [B, c2, R/4, R/4]
        h = self.pool(h).flatten(1)  # [B, c2 * 16]
        return self.to_features(h)  # [B, feature_dim]

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = False) -> torch.Tensor | DigitClassifierOutput:
        """Raw logits `[B, num_classes]` (or a `DigitClassifierOutput` with the features too when `return_dict`)."""
        features = self.features(pixel_values)
        logits = self.head(self.dropout(features))  # [B, num_classes]
        if not return_dict:
            return logits
        return DigitClassifierOutput(logits=logits, features=features)
