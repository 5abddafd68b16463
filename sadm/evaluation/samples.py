"""Generated samples saved as files -> datasets of images in [-1, 1] (with the classes they were generated for).

`.npz` files as `scripts/sample.py` writes them (or in the ADM evaluator's layout) and folders of PNGs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class ImageTensorDataset(Dataset):
    """Images already in memory, `[N, C, H, W]` float in [-1, 1], with optional labels `[N]`; items as `sadm.data` yields."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}.")
        if labels is not None and labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [{images.shape[0]}], got shape {tuple(labels.shape)}.")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.images[index]}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        return item


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W, C]` (or `[N, H, W]`) -> float `[N, C, H, W]` in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, C, H, W]


def load_images_npz(path: str | os.PathLike, num_samples: int | None = None) -> ImageTensorDataset:
    """An `.npz` with `images` (uint8, `[N, H, W, C]` or `[N, H, W]`) and optional `labels` (`[N]` ints), as
    `scripts/sample.py` writes it, or in the ADM evaluator's layout: `arr_0` images (and optional `arr_1` labels)."""
    with np.load(path, allow_pickle=False) as data:
        image_key, label_key = ("images", "labels") if "images" in data else ("arr_0", "arr_1")
        if image_key not in data:
            raise ValueError(f"{path} has no 'images' (nor ADM's 'arr_0') array (it has {list(data.keys())}).")
        images, labels = data[image_key], data[label_key] if label_key in data else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(
            f"{path}: 'images' must be uint8 [N, H, W, 1 or 3] or [N, H, W], got {images.dtype} {images.shape}."
        )
    if labels is not None and (labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: 'labels' must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}.")
    if num_samples is not None:
        images, labels = images[:num_samples], labels[:num_samples] if labels is not None else None
    return ImageTensorDataset(uint8_to_tensor(images), torch.from_numpy(labels).long() if labels is not None else None)


def load_image_folder(path: str | os.PathLike, num_samples: int | None = None) -> ImageTensorDataset:
    """Every `*.png` of a folder (sorted by name), unlabeled; greyscale when all of them are, else RGB."""
    files = sorted(Path(path).glob("*.png"))[:num_samples]
    if not files:
        raise ValueError(f"--samples {path} contains no .png files.")
    pil_images = []
    for file in files:
        with Image.open(file) as image:
            image.load()
            pil_images.append(image)
    mode = "L" if all(image.mode in ("1", "L") for image in pil_images) else "RGB"
    arrays = [np.asarray(image.convert(mode)) for image in pil_images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"The PNGs in {path} have different sizes {sorted(shapes)}; all samples must have one size.")
    return ImageTensorDataset(uint8_to_tensor(np.stack(arrays)))
