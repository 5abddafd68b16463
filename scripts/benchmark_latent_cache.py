#!/usr/bin/env python
"""Latent cache benchmark: build time and peak memory of `--cache_latents` on an image folder, and DataLoader workers.

    python scripts/benchmark_latent_cache.py                          # 2 500 and 10 000 32x32 PNGs, tiny VAE
    python scripts/benchmark_latent_cache.py --sizes 1000 --loader_workers 0 1 2

Writes a folder of `max(--sizes)` random RGB PNGs (10 class subfolders) into a temporary folder, then, for each size,
in a fresh process (so that its peak resident set size, `ru_maxrss`, is that run's own): reads the first N images as
`load_train_dataset` does (the decoding scan), builds the cache of a seeded random-init tiny `AutoencoderKL` with
`build_latent_cache`, memory-maps it with `load_latent_cache` and reads one epoch of items. It prints build time,
images/s, the peak RSS before and after the build, and extrapolates to ImageNet's 1 281 167 images (same images/s,
same bytes per image). `--loader_workers` times one pass of the training DataLoader (`make_dataloader`) over the
cached latents and over the images with each worker count. The last line is JSON with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_TRAIN_IMAGES = 1_281_167


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000], help="Dataset sizes to build.")
    parser.add_argument("--resolution", type=int, default=32, help="Image side (PNGs are written at this size).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder call (x2 with the flips).")
    parser.add_argument("--dtype", type=str, default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--loader_workers", type=int, nargs="*", default=[], help="Worker counts to time.")
    parser.add_argument("--loader_batch_size", type=int, default=64)
    parser.add_argument("--work_dir", type=str, default=None, help="Default: a temporary folder, removed after.")
    parser.add_argument(
        "--sd_vae_images", type=int, default=0,
        help="Also time encoding N 256x256 images and their flips with a random-init VAE of Stable Diffusion's (and "
        "DiT-XL-2-256's) architecture, to extrapolate the real VAE's cost to ImageNet.",
    )  # fmt: skip
    parser.add_argument("--_child", type=str, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_folder(root: Path, num_images: int, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "images"
    rng = np.random.default_rng(0)
    for index in range(num_images):
        label_dir = folder / str(index % 10)
        label_dir.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(label_dir / f"{index:07d}.png")
    return folder


def tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    ).eval()


def sd_vae_seconds_per_image(num_images: int) -> float:
    """Seconds per image (with its flip) of `encode_moments` with the architecture of stabilityai/sd-vae-ft-ema."""
    import torch
    from diffusers import AutoencoderKL

    from sadm.latents import encode_moments

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    ).eval()
    pixels = torch.rand(num_images, 3, 256, 256) * 2 - 1
    encode_moments(vae, pixels[:1])  # warm-up
    start = time.perf_counter()
    encode_moments(vae, torch.cat([pixels, pixels.flip(-1)]))
    return (time.perf_counter() - start) / num_images


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(spec: dict) -> dict:
    """One size in this (fresh) process: scan, build, load, read."""
    import torch

    from sadm.data import DataConfig, collate_fn, load_train_dataset, make_dataloader
    from sadm.latents import build_latent_cache, collate_latents, load_latent_cache

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    vae = tiny_vae()
    start = time.perf_counter()
    config = DataConfig(
        train_data_dir=spec["folder"], resolution=spec["resolution"], center_crop=True, random_flip=True,
        max_train_samples=spec["num_images"],
    )  # fmt: skip
    images = load_train_dataset(config)
    scan_s = time.perf_counter() - start
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    folder = build_latent_cache(
        images, vae, spec["cache_dir"], batch_size=spec["batch_size"], disable_progress=True, dtype=spec["dtype"]
    )
    build_s = time.perf_counter() - start
    rss_build = peak_rss_mib()
    start = time.perf_counter()
    cache = load_latent_cache(folder, images)
    total = sum(float(cache[key]["latent_moments"][0, 0, 0]) for key in range(len(cache)))
    read_s = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in Path(folder).iterdir())
    result = {
        "num_images": len(images),
        "scan_s": scan_s,
        "build_s": build_s,
        "images_per_s": len(images) / build_s,
        "read_epoch_s": read_s,
        "peak_rss_before_build_mib": rss_before,
        "peak_rss_after_build_mib": rss_build,
        "peak_rss_after_read_mib": peak_rss_mib(),
        "disk_bytes": disk,
        "bytes_per_image": disk / len(images),
        "all_moments_in_ram_mib": disk / 2**20,  # what the earlier one-tensor cache held while building
        "checksum": total,
    }
    loaders = {}
    for workers in spec["loader_workers"]:
        for name, dataset, collate in (("cached", cache, collate_latents), ("images", images, collate_fn)):
            loader = make_dataloader(dataset, spec["loader_batch_size"], 0, workers, collate)
            start = time.perf_counter()
            count = sum(len(next(iter(batch.values()))) for batch in loader)
            loaders[f"{name}_workers{workers}_images_per_s"] = count / (time.perf_counter() - start)
    result.update(loaders)
    return result


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._child is not None:
        print("RESULT " + json.dumps(child(json.loads(args._child))), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        folder = write_folder(root, max(args.sizes), args.resolution)
        print(f"wrote {max(args.sizes)} {args.resolution}x{args.resolution} PNGs in {time.perf_counter() - start:.1f} s")
        results = []
        for num_images in args.sizes:
            spec = {
                "folder": str(folder), "num_images": num_images, "resolution": args.resolution,
                "batch_size": args.batch_size, "dtype": args.dtype, "cache_dir": str(root / f"cache-{num_images}"),
                "loader_workers": args.loader_workers, "loader_batch_size": args.loader_batch_size,
            }  # fmt: skip
            out = subprocess.run(
                [sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"the {num_images}-image run failed:\n{out.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            results.append(result)
            print(
                f"{result['num_images']:>7} images: scan {result['scan_s']:.1f} s, build {result['build_s']:.1f} s "
                f"({result['images_per_s']:.0f} images/s, {args.dtype}), peak RSS {result['peak_rss_before_build_mib']:.0f}"
                f" MiB before the build, {result['peak_rss_after_build_mib']:.0f} MiB after it, "
                f"{result['peak_rss_after_read_mib']:.0f} MiB after reading an epoch from the memory map; cache "
                f"{result['disk_bytes'] / 2**20:.1f} MiB on disk ({result['bytes_per_image']:.0f} B/image)"
            )
            for key, value in result.items():
                if key.endswith("_images_per_s") and "workers" in key:
                    print(f"    DataLoader {key[: -len('_images_per_s')]}: {value:.0f} images/s")
        if args.sd_vae_images:
            per_image = sd_vae_seconds_per_image(args.sd_vae_images)
            print(
                f"SD-VAE architecture at 256x256: {per_image:.2f} s per image and its flip on this CPU "
                f"({torch_threads()} thread(s)): {per_image * IMAGENET_TRAIN_IMAGES / 86400:.0f} days for ImageNet"
            )
        largest = max(results, key=lambda r: r["num_images"])
        extrapolated = {
            "imagenet_build_h": IMAGENET_TRAIN_IMAGES / largest["images_per_s"] / 3600,
            "imagenet_scan_h": largest["scan_s"] / largest["num_images"] * IMAGENET_TRAIN_IMAGES / 3600,
            "imagenet_disk_gib": largest["bytes_per_image"] * IMAGENET_TRAIN_IMAGES / 2**30,
        }
        if args.sd_vae_images:
            extrapolated["sd_vae_s_per_image"] = per_image
            extrapolated["imagenet_sd_vae_days"] = per_image * IMAGENET_TRAIN_IMAGES / 86400
        print(
            f"1 281 167 images (ImageNet train) at the same rate, one process: build "
            f"{extrapolated['imagenet_build_h']:.1f} h, scan {extrapolated['imagenet_scan_h']:.1f} h, "
            f"{extrapolated['imagenet_disk_gib']:.1f} GiB on disk (this tiny VAE's latents; the build divides by the "
            "number of processes)"
        )
        print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "_child"}, "results": results,
                          "extrapolated": extrapolated}))  # fmt: skip


if __name__ == "__main__":
    main()
