#!/usr/bin/env python
"""Build the fine-tuning target of docs/FINETUNING.md: greyscale 16x16 crops of scikit-learn's sample photographs.

    python scripts/make_sample_crops.py --output_dir data/sample_crops --per_class 100

Four classes (building, leaves, petals, sky: regions in `SAMPLE_CROP_REGIONS` below) as an image folder with class
subfolders, readable with `--train_data_dir`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Regions (left, top, right, bottom) of scikit-learn's two sample photographs (640x427) that make the classes of
# `sample_crops_image_folder`: a fine-tuning target unlike the digits that ships with an installed package.
SAMPLE_CROP_REGIONS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "building": ("china.jpg", (90, 80, 330, 340)),  # the pagoda
    "leaves": ("flower.jpg", (0, 0, 160, 420)),  # the dark, blurred foliage left of the dahlia
    "petals": ("flower.jpg", (210, 130, 390, 310)),  # inside the dahlia
    "sky": ("china.jpg", (370, 0, 620, 130)),  # hazy sky right of the pagoda
}


def sample_crops_image_folder(
    output_dir: str | os.PathLike, per_class: int = 100, size: int = 16, seed: int = 0
) -> Path:
    """Write greyscale `size`x`size` crops of scikit-learn's sample photographs as `<output_dir>/<class>/<i>.png`.

    Each crop is a random square window of 32-64 px inside the class's region (`SAMPLE_CROP_REGIONS`), resized to
    `size` with a box filter. Deterministic for a given `seed`; refuses a non-empty `output_dir`.
    """
    from sklearn.datasets import load_sample_images

    root = Path(output_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; choose a new folder for the crops.")
    photos = load_sample_images()
    images = {
        Path(name).name: Image.fromarray(array).convert("L") for name, array in zip(photos.filenames, photos.images)
    }
    rng = np.random.default_rng(seed)
    for name, (photo, (left, top, right, bottom)) in SAMPLE_CROP_REGIONS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            window = int(rng.integers(32, min(64, right - left, bottom - top) + 1))
            x = int(rng.integers(left, right - window + 1))
            y = int(rng.integers(top, bottom - window + 1))
            crop = images[photo].crop((x, y, x + window, y + window)).resize((size, size), Image.Resampling.BOX)
            crop.save(root / name / f"{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=str, required=True, help="A new (or empty) folder for the crops.")
    parser.add_argument("--per_class", type=int, default=100, help="Crops per class.")
    parser.add_argument("--size", type=int, default=16, help="Side of the crops in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the crop positions and sizes.")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.size < 1:
        parser.error(f"--per_class and --size must be positive, got {args.per_class} and {args.size}")
    folder = sample_crops_image_folder(args.output_dir, args.per_class, args.size, args.seed)
    print(f"Wrote {len(SAMPLE_CROP_REGIONS) * args.per_class} crops to {folder}")


if __name__ == "__main__":
    main()
