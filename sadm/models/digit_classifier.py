"""A small CNN trained once on scikit-learn's digits: class accuracy of generated digits and "digits-FID" features.

`load_or_train_digit_classifier` trains it on the embedded digits exactly as `sadm.data` serves them (8x8 -> uint8 ->
bilinear antialiased resize to the resolution -> [-1, 1]) with small random shifts, scales and rotations, so that slightly
off-centre generated digits are judged fairly, and caches it as a `save_pretrained` folder per resolution and seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

logger = logging.getLogger(__name__)

NUM_HELDOUT = 300  # of the 1797 digits, kept out of training to measure the accuracy
MIN_HELDOUT_ACCURACY = 0.97  # below this the classifier is not trusted to judge samples; a warning is logged


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


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts (up to 1 pixel of the 8x8 original), scales (0.9-1.1) and rotations (±10°); background stays -1."""
    batch = images.shape[0]
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(batch, generator=generator)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (
        2 / 8
    )  # in [-1, 1] coordinates: 2/8 = one 8x8 pixel
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [B, R, R, 2]
    # sample (x + 1) so that zero padding outside the image is the black background -1
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def _digits_tensors(resolution: int, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits `[N, 1, R, R]` in [-1, 1] and labels `[N]`, read through `sadm.data` so preprocessing is identical."""
    from sadm.data import load_train_dataset  # the one place that defines how digits become tensors

    dataset = load_train_dataset(resolution=resolution, cache_dir=str(cache_dir))
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["pixel_values"] for item in items]), torch.stack([item["class_labels"] for item in items])


def train_digit_classifier(
    resolution: int = 16,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_epochs: int = 20,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
) -> tuple[DigitClassifier, float]:
    """Train a `DigitClassifier` on the digits (all but a seeded held-out set of 300) on the CPU.

    Returns:
        `(model in eval mode, held-out accuracy)`.
    """
    from sadm.data import default_cache_dir

    images, labels = _digits_tensors(resolution, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    heldout, train = order[:NUM_HELDOUT], order[NUM_HELDOUT:]
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout without touching the caller's global RNG
        torch.manual_seed(seed)
        model = DigitClassifier(resolution=resolution)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(train) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, learning_rate, total_steps=num_epochs * steps_per_epoch
        )
        model.train()
        for _ in range(num_epochs):
            permutation = train[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(permutation), batch_size):
                index = permutation[start : start + batch_size]
                loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[heldout]).argmax(dim=1) == labels[heldout]).float().mean())
    return model, accuracy


def load_or_train_digit_classifier(
    resolution: int = 16, cache_dir: str | os.PathLike | None = None, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """The digit classifier for a resolution: loaded from `<cache_dir>/digit_classifier_r{R}_seed{S}`, or trained once.

    Training takes a few seconds on two CPU cores at resolution 16. The folder is a `save_pretrained` folder with
    `heldout_accuracy.json` beside the weights; it is written to a temporary folder and renamed, so concurrent processes
    never read a half-written model (in multi-process runs, call it under `accelerator.main_process_first()`).

    Args:
        resolution (`int`): input resolution (the digits are resized to it as `sadm.data` does).
        cache_dir (`str`, *optional*): default `$SADM_CACHE` or `~/.cache/sadm`.
        seed (`int`): split, initialisation and augmentation seed.

    Returns:
        `(model in eval mode on the CPU, held-out accuracy on the 300 held-out digits)`.
    """
    from sadm.data import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"digit_classifier_r{resolution}_seed{seed}"
    info_file = folder / "heldout_accuracy.json"
    if not info_file.exists():
        model, accuracy = train_digit_classifier(resolution, root, seed)
        tmp = root / f"{folder.name}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        info = {"heldout_accuracy": accuracy, "num_heldout": NUM_HELDOUT, "resolution": resolution, "seed": seed}
        (tmp / "heldout_accuracy.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its model
            if not info_file.exists():
                raise
    model = DigitClassifier.from_pretrained(folder).eval()
    accuracy = json.loads(info_file.read_text())["heldout_accuracy"]
    if accuracy < MIN_HELDOUT_ACCURACY:
        logger.warning(
            f"The digit classifier in {folder} has held-out accuracy {accuracy:.3f} < {MIN_HELDOUT_ACCURACY}."
        )
    return model, accuracy


class DigitsFeatures(nn.Module):
    """The digit classifier as a feature network for `sadm.metrics` ("digits-FID") and a classifier (accuracy, digits-IS).

    Inputs `[N, 1 or 3, H, W]` in [-1, 1]; RGB is averaged to grey and other sizes are resized (bilinear, antialiased) to
    the classifier's resolution. The identity is `digit_classifier_r{R}_<weights fingerprint>`, so statistics saved with
    one trained classifier never compare silently against another.

    Args:
        resolution (`int`): classifier resolution (use the data resolution).
        cache_dir (`str`, *optional*): see `load_or_train_digit_classifier`.
        seed (`int`): see `load_or_train_digit_classifier`.
    """

    def __init__(self, resolution: int = 16, cache_dir: str | os.PathLike | None = None, seed: int = 0):
        super().__init__()
        from sadm.metrics import state_dict_fingerprint

        self.classifier, self.heldout_accuracy = load_or_train_digit_classifier(resolution, cache_dir, seed)
        self.classifier.requires_grad_(False)
        self.resolution = resolution
        self.identity = f"digit_classifier_r{resolution}_{state_dict_fingerprint(self.classifier)}"

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}.")
        images = images.to(self.classifier.device, torch.float32)
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)  # [N, 1, H, W]
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return images

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features `[N, 128]` and logits `[N, 10]`."""
        output = self.classifier.eval()(self._prepare(images), return_dict=True)
        return output.features, output.logits

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]
