"""The digit classifier trained once on scikit-learn's digits, the judge of generated digits (accuracy, digits-FID).

`load_or_train_digit_classifier` trains a `sadm.models.digit_classifier.DigitClassifier` on the embedded digits exactly as
`sadm.data` serves them (8x8 -> uint8 -> bilinear antialiased resize to the resolution -> [-1, 1]) with small random
shifts, scales and rotations, so that slightly off-centre generated digits are judged fairly, and caches it as a
`save_pretrained` folder per resolution and seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import DataConfig, default_cache_dir, load_train_dataset
from ..models.digit_classifier import DigitClassifier

logger = logging.getLogger(__name__)

NUM_HELDOUT = 300  # of the 1797 digits, kept out of training to measure the accuracy
MIN_HELDOUT_ACCURACY = 0.97  # below this the classifier is not trusted to judge samples; a warning is logged


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
    dataset = load_train_dataset(DataConfig(resolution=resolution, cache_dir=str(cache_dir)))
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
