#!/usr/bin/env python
"""Build the fine-tuning target of docs/FINETUNING.md: greyscale 16x16 crops of scikit-learn's sample photographs.

    python scripts/make_sample_crops.py --output_dir data/sample_crops --per_class 100

Four classes (building, leaves, petals, sky: regions in `sadm.data.SAMPLE_CROP_REGIONS`) as an image folder with class
subfolders, readable with `--train_data_dir`.
"""

from __future__ import annotations

import argparse

from sadm.data import sample_crops_image_folder


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
    print(f"Wrote {4 * args.per_class} crops to {folder}")


if __name__ == "__main__":
    main()
