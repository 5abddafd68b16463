#!/usr/bin/env python
"""Sample many images from an exported pipeline, on one process or many: PNGs, `samples.npz` (`images` uint8 NxHxWxC,
`labels`), optionally an ADM-evaluator `.npz` (`arr_0` uint8 NxHxWx3, `arr_1` labels) and a grid.

python scripts/sample.py --pipeline runs/digits --output_dir runs/digits/samples --num_per_class 10 --grid

# FID-50K as DiT reports it, on 8 GPUs (DDPM 250 steps with the learned σ, guidance 1.5 on 3 of 4 latent channels)
accelerate launch --multi_gpu --num_processes 8 scripts/sample.py --pipeline runs/dit-xl-2-256 \\
    --output_dir samples/dit --num_images 50000 --batch_size 125 --num_inference_steps 250 --guidance_scale 1.5 \\
    --guidance_channels 3 --scheduler ddpm --no_png --adm_npz samples/dit_xl2_cfg1.5_250steps.npz

# any diffusers scheduler by class name, with its options as JSON; guidance only for t/T in [0.1, 0.75]
python scripts/sample.py ... --scheduler DPMSolverMultistepScheduler --scheduler_kwargs '{"use_karras_sigmas": true}' \\
    --num_inference_steps 25 --guidance_scale 4 --guidance_interval 0.1 0.75

Image i's noise (initial and per step) comes from its own generator, seeded `seed * 2**32 + i` on the CPU, and its
class from `--seed` alone: an image does not depend on the number of processes. With a fixed `--batch_size` the
batches are the same too (batch j runs on process j mod N), so the images are byte-identical on identical devices;
across batch sizes they agree up to the float rounding of batch-size-dependent kernels (bit-exact on CPUs with
`MKL_CBWR=AVX2,STRICT`). Every process writes its PNGs and a `shard-<rank>-of-<N>.npz`; after a barrier the main process
merges the shards in index order into `samples.npz` (and `--adm_npz`), removes them, and records the settings in
`sampling.json`.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import re
from datetime import timedelta
from pathlib import Path

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers import DiffusionPipeline, SchedulerMixin
from tqdm.auto import tqdm

import sadm  # registers sadm's pipeline classes on diffusers
from sadm.accelerate_setup import check_distributed
from sadm.evaluation import sample_seed
from sadm.export import image_grid

SHORT_NAMES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}  # what other scripts pass
# what this script writes into --output_dir: with --overwrite, earlier ones are removed first (no stale PNGs mix in)
OWN_FILES = re.compile(r"\d{6,}(_class\d+)?\.png|shard-\d{5}-of-\d{5}\.npz|samples\.npz|grid\.png|sampling\.json")


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """`--scheduler`: a diffusers scheduler class name (`DPMSolverMultistepScheduler`, ...) or `ddpm` / `ddim`."""
    class_name = SHORT_NAMES.get(name, name)
    cls = getattr(diffusers, class_name, None)
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin) and cls is not SchedulerMixin:
        return cls
    if hasattr(cls, "_backends"):  # diffusers' placeholder for a class whose optional dependency is missing
        raise argparse.ArgumentTypeError(f"diffusers' {class_name} needs {' and '.join(cls._backends)} installed.")
    names = [n for n in dir(diffusers) if n.endswith("Scheduler")]
    close = difflib.get_close_matches(class_name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise argparse.ArgumentTypeError(
        f"diffusers {diffusers.__version__} has no scheduler class '{name}'.{hint} Give a class name such as "
        "DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler, or the short names ddpm / ddim."
    )


def json_object(text: str) -> dict:
    """`--scheduler_kwargs`: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"use_karras_sigmas\": true}}', got {text}"
        )
    return value


def check_scheduler_kwargs(cls: type[SchedulerMixin], kwargs: dict) -> None:
    """Unknown options would be ignored by `from_config` without a word: refuse them."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"--scheduler_kwargs {unknown} are not options of {cls.__name__}; its options are {sorted(accepted)}."
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=str, required=True, help="A pipeline folder (a training --output_dir).")
    parser.add_argument("--output_dir", type=str, required=True, help="Where PNGs, samples.npz and grid.png go.")
    parser.add_argument("--num_images", type=int, default=None, help="Total images (classes drawn uniformly).")
    parser.add_argument("--num_per_class", type=int, default=None, help="Images per class (class-conditional models).")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None, help="Explicit class ids, one per image.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per pipeline call, per process.")
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="Guide only the steps whose t/T lies in [LOW, HIGH] (1 = noise, 0 = clean); default every step.",
    )
    parser.add_argument(
        "--guidance_channels",
        type=int,
        default=None,
        help="Guide only the first K channels of ε (the original DiT code: 3 of 4 latent channels); default all.",
    )
    parser.add_argument(
        "--scheduler",
        type=scheduler_class,
        default=None,
        help="Override the saved scheduler: a diffusers class name (e.g. DPMSolverMultistepScheduler, "
        "EulerDiscreteScheduler, HeunDiscreteScheduler), or ddpm / ddim; built from the saved scheduler's config.",
    )
    parser.add_argument(
        "--scheduler_kwargs",
        type=json_object,
        default=None,
        help="Scheduler options as a JSON object, e.g. '{\"use_karras_sigmas\": true}' (with or without --scheduler).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Image i's generator is seeded seed * 2**32 + i.")
    parser.add_argument("--grid", action="store_true", help="Also write grid.png (one row per class when per class).")
    parser.add_argument("--no_png", action="store_true", help="Only write the .npz (and grid).")
    parser.add_argument(
        "--adm_npz",
        type=str,
        default=None,
        help="Also write the ADM evaluator's layout here: arr_0 uint8 [N, H, W, 3] (greyscale repeated), arr_1 labels.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty --output_dir.")
    parser.add_argument(
        "--ddp_timeout",
        type=int,
        default=7200,
        help="Process-group timeout (s): the barriers wait for the slowest shard.",
    )
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.num_images, args.num_per_class, args.class_labels)) != 1:
        parser.error("Give exactly one of --num_images, --num_per_class, --class_labels.")
    for flag in ("num_images", "num_per_class", "batch_size", "num_inference_steps", "guidance_channels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}.")
    if args.guidance_interval is not None:
        low, high = args.guidance_interval
        if not 0.0 <= low < high <= 1.0:
            parser.error(
                f"--guidance_interval LOW HIGH needs 0 <= LOW < HIGH <= 1 (fractions of t/T), got {low} {high}."
            )
    if args.adm_npz is not None and not args.adm_npz.endswith(".npz"):
        parser.error(f"--adm_npz must end in .npz (numpy would append it), got {args.adm_npz}.")
    if args.scheduler is not None and args.scheduler_kwargs:
        try:
            check_scheduler_kwargs(args.scheduler, args.scheduler_kwargs)
        except ValueError as error:
            parser.error(str(error))
    return args


def check_outputs(output_dir: Path, adm_npz: Path | None, overwrite: bool) -> None:
    """Refuse to write over earlier samples (they may come from other settings) unless `--overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        held = sorted(p.name for p in output_dir.iterdir())
        raise ValueError(
            f"--output_dir {output_dir} is not empty (it holds {held[:3]}{' ...' if len(held) > 3 else ''}, perhaps "
            "samples of other settings); pass --overwrite or choose another folder."
        )
    if adm_npz is not None and adm_npz.exists() and not overwrite:
        raise ValueError(f"--adm_npz {adm_npz} exists; pass --overwrite or choose another path.")


def build_scheduler(saved: SchedulerMixin | None, cls: type[SchedulerMixin] | None, kwargs: dict) -> SchedulerMixin:
    """The sampling scheduler: `cls` (default: the saved scheduler's class) from the saved config, with `kwargs`."""
    if saved is None:
        raise ValueError("--scheduler / --scheduler_kwargs: this pipeline has no scheduler (a one-step generator).")
    cls = cls or type(saved)
    compatible = {c.__name__ for c in saved.compatibles} | {type(saved).__name__}
    if cls.__name__ not in compatible:
        raise ValueError(
            f"--scheduler {cls.__name__} cannot replace this pipeline's {type(saved).__name__} (another noise "
            f"process); compatible ones are {sorted(compatible)}."
        )
    check_scheduler_kwargs(cls, kwargs)
    return cls.from_config(saved.config, **kwargs)


def sample_batches(
    pipeline, class_labels: list[int] | None, batches: list[list[int]], seed: int, disable_progress: bool, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels of the given batches of image indices, in that order.

    Image i's initial and per-step noise come from its own CPU generator seeded `sample_seed(seed, i)`, so it does not
    depend on the batch or the process it is sampled in (nor on the device's random number generator).
    """
    images, labels = [], []
    for batch in tqdm(batches, desc="sampling", disable=disable_progress):
        generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in batch]
        batch_labels = [class_labels[i] for i in batch] if class_labels is not None else None
        out = pipeline(
            class_labels=batch_labels, batch_size=len(batch), generator=generators, output_type="np", **kwargs
        )
        images.append((out.images * 255).round().astype(np.uint8))  # [B, H, W, C]
        labels.extend(batch_labels if batch_labels is not None else [-1] * len(batch))
    if not images:  # more processes than batches
        return np.zeros((0,), dtype=np.uint8), np.zeros((0,), dtype=np.int64)
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)


def shard_path(output_dir: Path, rank: int, num_processes: int) -> Path:
    return output_dir / f"shard-{rank:05d}-of-{num_processes:05d}.npz"


def merge_shards(output_dir: Path, num_processes: int, batches: list[list[int]], num_images: int):
    """The shards' images and labels in index order (process r sampled batches r, r + N, ...)."""
    images, labels = None, np.full(num_images, -1, dtype=np.int64)
    for rank in range(num_processes):
        path = shard_path(output_dir, rank, num_processes)
        with np.load(path) as shard:
            shard_images, shard_labels = shard["images"], shard["labels"]  # each access reads the file
        indices = np.asarray([i for batch in batches[rank::num_processes] for i in batch], dtype=np.int64)
        if shard_images.shape[0] != len(indices):
            raise RuntimeError(f"{path} holds {shard_images.shape[0]} images, expected {len(indices)}.")
        if not len(indices):
            continue
        if images is None:
            images = np.empty((num_images, *shard_images.shape[1:]), dtype=np.uint8)  # [N, H, W, C]
        images[indices], labels[indices] = shard_images, shard_labels
    return images, labels


def main(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    adm_npz = Path(args.adm_npz) if args.adm_npz is not None else None
    check_outputs(out, adm_npz, args.overwrite)  # on every process, before any process writes
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))])
    check_distributed(accelerator)
    rank, num_processes = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process and out.exists():
        for path in out.iterdir():
            if OWN_FILES.fullmatch(path.name):  # only with --overwrite: an earlier run's PNGs, shards, npz
                path.unlink()
    accelerator.wait_for_everyone()

    pipeline = DiffusionPipeline.from_pretrained(args.pipeline).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler is not None or args.scheduler_kwargs:
        pipeline.scheduler = build_scheduler(
            getattr(pipeline, "scheduler", None), args.scheduler, args.scheduler_kwargs or {}
        )
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
        rng = np.random.default_rng(args.seed)  # the same labels on every process
        class_labels = rng.integers(0, num_classes, size=args.num_images).tolist()
    else:
        class_labels = None
    num_images = len(class_labels) if class_labels is not None else args.num_images
    call_kwargs = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    if args.guidance_interval is not None:  # only when asked: other pipelines (DiffusionGANPipeline) lack them
        call_kwargs["guidance_interval"] = tuple(args.guidance_interval)
    if args.guidance_channels is not None:
        call_kwargs["guidance_channels"] = args.guidance_channels

    # the batches depend on --batch_size only; batch j runs on process j mod N
    batches = [list(range(s, min(s + args.batch_size, num_images))) for s in range(0, num_images, args.batch_size)]
    mine = batches[rank::num_processes]
    images, labels = sample_batches(
        pipeline, class_labels, mine, args.seed, not accelerator.is_local_main_process, **call_kwargs
    )
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_png:
        for index, image, label in zip((i for batch in mine for i in batch), images, labels):
            name = f"{index:06d}" + (f"_class{label}" if label >= 0 else "") + ".png"
            image_grid(image[None].astype(np.float32) / 255.0).save(out / name)
    if num_processes > 1:
        np.savez(shard_path(out, rank, num_processes), images=images, labels=labels)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        images, labels = merge_shards(out, num_processes, batches, num_images)

    np.savez(out / "samples.npz", images=images, labels=labels)
    if adm_npz is not None:
        adm_npz.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images  # [N, H, W, 3]: Inception is RGB
        np.savez(adm_npz, arr_0=rgb, arr_1=labels)
    if num_processes > 1:  # merged and written: the shards can go
        for shard_rank in range(num_processes):
            shard_path(out, shard_rank, num_processes).unlink()
    if args.grid:
        rows = num_classes if args.num_per_class is not None else None
        image_grid(images.astype(np.float32) / 255.0, rows=rows).save(out / "grid.png")
    scheduler = getattr(pipeline, "scheduler", None)
    settings = {
        **{k: v for k, v in vars(args).items() if k not in ("scheduler", "overwrite", "ddp_timeout")},
        "num_images": num_images,
        "num_processes": num_processes,
        "image_seed": "seed * 2**32 + index",
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler_config": dict(scheduler.config) if scheduler is not None else None,
        "pipeline_class": type(pipeline).__name__,
        "versions": {"sadm": sadm.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    (out / "sampling.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    print(f"Wrote {num_images} images to {out}" + (f" and {adm_npz}" if adm_npz is not None else ""))


if __name__ == "__main__":
    main(parse_args())
