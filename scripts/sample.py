#!/usr/bin/env python
"""Sample many images from an exported pipeline: PNGs, an `.npz` (`images` uint8 NxHxWxC, `labels`) and a grid.

python scripts/sample.py --pipeline runs/digits --output_dir runs/digits/samples --num_per_class 10 --grid
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from tqdm.auto import tqdm

import sadm  # noqa: F401  (registers sadm's pipeline classes on diffusers)
from sadm.training import image_grid

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=str, required=True, help="A pipeline folder (a training --output_dir).")
    parser.add_argument("--output_dir", type=str, required=True, help="Where PNGs, samples.npz and grid.png go.")
    parser.add_argument("--num_images", type=int, default=None, help="Total images (classes drawn uniformly).")
    parser.add_argument("--num_per_class", type=int, default=None, help="Images per class (class-conditional models).")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None, help="Explicit class ids, one per image.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument(
        "--scheduler", type=str, default=None, choices=sorted(SCHEDULERS), help="Override the saved scheduler."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", action="store_true", help="Also write grid.png (one row per class when per class).")
    parser.add_argument("--no_png", action="store_true", help="Only write the .npz (and grid).")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty --output_dir.")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.num_images, args.num_per_class, args.class_labels)) != 1:
        parser.error("Give exactly one of --num_images, --num_per_class, --class_labels.")
    return args


def sample_images(pipeline, class_labels: list[int] | None, num_images: int, batch_size: int, seed: int, **kwargs):
    """Images (uint8 NHWC) and labels, in batches; each batch has its own seeded generator so results do not depend on
    how the work is split."""
    images, labels = [], []
    for start in tqdm(range(0, num_images, batch_size), desc="sampling"):
        end = min(start + batch_size, num_images)
        generator = torch.Generator(device=pipeline.device).manual_seed(seed + start)
        batch_labels = class_labels[start:end] if class_labels is not None else None
        out = pipeline(
            class_labels=batch_labels, batch_size=end - start, generator=generator, output_type="np", **kwargs
        )
        images.append((out.images * 255).round().astype(np.uint8))
        labels.extend(batch_labels if batch_labels is not None else [-1] * (end - start))
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)


def main(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--output_dir {out} is not empty; pass --overwrite or choose another folder.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = DiffusionPipeline.from_pretrained(args.pipeline).to(device)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler is not None:
        pipeline.scheduler = SCHEDULERS[args.scheduler].from_config(pipeline.scheduler.config)
    num_classes = getattr(pipeline, "num_classes", 0)
    if args.class_labels is not None:
        class_labels = args.class_labels
    elif args.num_per_class is not None:
        if not num_classes:
            raise ValueError(
                "--num_per_class needs a class-conditional model; this one is unconditional (use --num_images)."
            )
        class_labels = [c for c in range(num_classes) for _ in range(args.num_per_class)]
    elif num_classes:
        rng = np.random.default_rng(args.seed)
        class_labels = rng.integers(0, num_classes, size=args.num_images).tolist()
    else:
        class_labels = None
    num_images = len(class_labels) if class_labels is not None else args.num_images
    images, labels = sample_images(
        pipeline,
        class_labels,
        num_images,
        args.batch_size,
        args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
    )
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images=images, labels=labels)
    if not args.no_png:
        for index, (image, label) in enumerate(zip(images, labels)):
            name = f"{index:06d}" + (f"_class{label}" if label >= 0 else "") + ".png"
            image_grid(image[None].astype(np.float32) / 255.0).save(out / name)
    if args.grid:
        rows = num_classes if args.num_per_class is not None else None
        image_grid(images.astype(np.float32) / 255.0, rows=rows).save(out / "grid.png")
    print(f"Wrote {num_images} images to {out}")


if __name__ == "__main__":
    main(parse_args())
