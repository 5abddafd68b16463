"""The command-line flags that several scripts share, and their translation into typed configs.

argparse lives here and in the scripts only: the library takes `DataConfig` and `EvalConfig`. Each `add_*_args` takes its
defaults from the config's dataclass, so `--help` shows the defaults the library applies, and each `*_config_from_args`
builds the config, which validates every option once; with a `parser`, a bad value stops through `parser.error`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from .data import DataConfig
from .evaluation import EVAL_METRICS, FEATURE_NETWORK_NAMES, EvalConfig

_DATA = {field.name: field.default for field in fields(DataConfig)}
_EVAL = {field.name: field.default for field in fields(EvalConfig)}


def _build(config_class, options: dict, parser: argparse.ArgumentParser | None):
    try:
        return config_class(**options)
    except ValueError as error:
        if parser is None:
            raise
        parser.error(str(error))


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data flags shared by every script (`DataConfig`), named as in diffusers' training examples."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None, help="A 🤗 datasets name or a local dataset folder.")
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config name.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="An image folder (class subfolders, or metadata.csv/metadata.jsonl). Neither this nor --dataset_name: the digits default.",
    )
    group.add_argument("--image_column", type=str, default=_DATA["image_column"], help="Image column of the dataset.")
    group.add_argument(
        "--label_column",
        type=str,
        default=_DATA["label_column"],
        help="Label column; the default 'label' is optional, other names must exist.",
    )
    group.add_argument("--unconditional", action="store_true", help="Ignore labels and train an unconditional model.")
    group.add_argument(
        "--resolution",
        type=int,
        default=_DATA["resolution"],
        help="Training resolution (images are resized and cropped to it).",
    )
    group.add_argument("--center_crop", action="store_true", help="Center crop instead of a random crop.")
    group.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    group.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Keep a random subset of N training samples, the same for every run and seed.",
    )
    group.add_argument(
        "--num_channels", type=int, default=None, choices=[1, 3], help="Force greyscale (1) or RGB (3)."
    )
    group.add_argument(
        "--on_bad_image",
        type=str,
        default=_DATA["on_bad_image"],
        choices=["error", "skip"],
        help="Unreadable/truncated image files and rows without a label: stop naming the first (error) or drop them "
        "with one warning (skip).",
    )
    group.add_argument(
        "--small_images",
        type=str,
        default=_DATA["small_images"],
        choices=["upscale", "refuse"],
        help="Images smaller than --resolution: resize them up with one warning (upscale) or stop naming one (refuse).",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="DataLoader worker processes. Default: 0 for cached latents, else a quarter of the CPU cores per process "
        "(0 below 4 cores), as measured in docs/PERFORMANCE.md.",
    )
    group.add_argument(
        "--data_cache_dir", type=str, default=None, help="Cache for datasets and the embedded digits folder."
    )


def data_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> DataConfig:
    """The `DataConfig` of the flags of `add_data_args`."""
    options = {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "train_data_dir": args.train_data_dir,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "max_train_samples": args.max_train_samples,
        "num_channels": args.num_channels,
        "cache_dir": args.data_cache_dir,
        "unconditional": args.unconditional,
        "on_bad_image": args.on_bad_image,
        "small_images": args.small_images,
    }
    return _build(DataConfig, options, parser)


def add_eval_args(parser: argparse.ArgumentParser, diffusion_sampling: bool = True) -> None:
    """The `--eval_*` flags of the training scripts (`EvalConfig`: in-training evaluation of the EMA weights).

    Args:
        diffusion_sampling (`bool`): add `--eval_num_inference_steps` and `--eval_guidance_scale` (diffusion pipelines).
    """
    g = parser.add_argument_group("in-training evaluation")
    g.add_argument(
        "--eval_steps",
        type=int,
        default=_EVAL["steps"],
        help="Every N steps, measure the EMA weights (--eval_metrics), log eval/<metric>, append to eval_history.json "
        "and keep the best pipeline in <output_dir>/best/ (0: never).",
    )
    g.add_argument(
        "--eval_num_samples",
        type=int,
        default=_EVAL["num_samples"],
        help="Generated images per evaluation (equal per class).",
    )
    g.add_argument(
        "--eval_metrics",
        type=str,
        default=None,
        help=f"Comma list from {','.join(EVAL_METRICS)}. Default: fid,accuracy on the embedded digits, else fid.",
    )
    g.add_argument(
        "--eval_feature_network",
        type=str,
        default=None,
        help=f"{', '.join(FEATURE_NETWORK_NAMES)} or timm:<name>: digits (the held-out digit classifier), inception "
        "(FID Inception-v3, needs --eval_inception_weights), pixels (raw pixels), random (a fixed random conv: tests "
        "and sanity checks only), timm:<name> (random init unless --eval_timm_weights). Default: digits on the "
        "embedded digits, else inception.",
    )
    g.add_argument(
        "--eval_inception_weights",
        type=str,
        default=None,
        help="Local path of pt_inception-2015-12-05-6726825d.pth (never downloaded; see docs/EVALUATION.md).",
    )
    g.add_argument(
        "--eval_timm_weights",
        type=str,
        default=None,
        help="Local timm checkpoint for --eval_feature_network timm:<name>.",
    )
    g.add_argument(
        "--eval_reference_stats",
        type=str,
        default=None,
        help="Reference statistics .npz (scripts/evaluate.py --save_reference_stats) instead of the training data.",
    )
    g.add_argument(
        "--eval_num_reference_samples",
        type=int,
        default=_EVAL["num_reference_samples"],
        help="A seeded random subset of the training data as the reference (the whole set when smaller).",
    )
    g.add_argument(
        "--eval_batch_size",
        type=int,
        default=_EVAL["batch_size"],
        help="Per-process batch of sampling and feature extraction.",
    )
    if diffusion_sampling:
        g.add_argument(
            "--eval_num_inference_steps",
            type=int,
            default=_EVAL["num_inference_steps"],
            help="Sampling steps of each evaluation.",
        )
        g.add_argument(
            "--eval_guidance_scale",
            type=float,
            default=_EVAL["guidance_scale"],
            help="Classifier-free guidance scale of each evaluation.",
        )
    g.add_argument(
        "--eval_best_metric",
        type=str,
        default=_EVAL["best_metric"],
        choices=EVAL_METRICS,
        help="Which metric picks best/: fid and kid lower is better; accuracy, precision, recall higher is better.",
    )
    g.add_argument(
        "--eval_seed", type=int, default=_EVAL["seed"], help="Seed of the evaluation samples (the same at every step)."
    )


def parse_metric_list(text: str) -> tuple[str, ...]:
    """`"fid, kid"` -> `("fid", "kid")`."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def eval_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> EvalConfig:
    """The `EvalConfig` of the flags of `add_eval_args` (and of the data flags, which set its defaults).

    Without `--eval_num_inference_steps` / `--eval_guidance_scale` (a one-step generator) the pipeline is sampled in one
    step without guidance.
    """
    options = {
        "steps": args.eval_steps,
        "num_samples": args.eval_num_samples,
        "metrics": parse_metric_list(args.eval_metrics) if args.eval_metrics is not None else None,
        "feature_network": args.eval_feature_network,
        "inception_weights": args.eval_inception_weights,
        "timm_weights": args.eval_timm_weights,
        "reference_stats": args.eval_reference_stats,
        "num_reference_samples": args.eval_num_reference_samples,
        "batch_size": args.eval_batch_size,
        "num_inference_steps": args.eval_num_inference_steps if "eval_num_inference_steps" in args else 1,
        "guidance_scale": args.eval_guidance_scale if "eval_guidance_scale" in args else 1.0,
        "best_metric": args.eval_best_metric,
        "seed": args.eval_seed,
        "on_digits": args.dataset_name is None and args.train_data_dir is None,
        "conditional": not args.unconditional,
    }
    return _build(EvalConfig, options, parser)
