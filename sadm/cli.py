"""The command-line flags that several scripts share, and their translation into typed configs.

argparse lives here and in the scripts only: the library takes `DataConfig` and `EvalConfig`. Each `add_*_args` takes its
defaults from the config's dataclass, so `--help` shows the defaults the library applies, and each `*_config_from_args`
builds the config, which validates every option once; with a `parser`, a bad value stops through `parser.error`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

import torch

from .data import DataConfig
from .evaluation import EVAL_METRICS, FEATURE_NETWORK_NAMES, EvalConfig

_DATA = {field.name: field.default for field in dataclasses.fields(DataConfig)}
_EVAL = {field.name: field.default for field in dataclasses.fields(EvalConfig)}

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A script's description as written, and the effective default of every flag at the end of its help."""


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags every training script has, named as in diffusers' training examples."""
    g = parser.add_argument_group("training")
    g.add_argument(
        "--config",
        type=str,
        default=None,
        help="A YAML or JSON file of flags (keys: flag names without '--', e.g. configs/finetune_gan.yaml); flags on "
        "the command line override it.",
    )
    g.add_argument("--output_dir", type=str, required=True, help="Where the exported pipeline and checkpoints go.")
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Allow writing into a non-empty --output_dir that is not resumed.",
    )
    g.add_argument("--seed", type=int, default=0, help="Seed for initialisation, data order, noise and timesteps.")
    g.add_argument("--train_batch_size", type=int, default=32, help="Batch size per process.")
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Epochs when --max_train_steps is not given.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Learning rate. Default: 1e-4 (DiT) for the DiT-* presets and pretrained models, 1e-3 for the tiny preset "
        "(measured on the digits default: docs/DIGITS.md).",
    )
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant_with_warmup",
        choices=LR_SCHEDULERS,
        help="diffusers' get_scheduler name.",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="Warm-up optimizer steps.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1 (DiT: 0.9).")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2 (DiT: 0.999).")
    g.add_argument("--adam_weight_decay", type=float, default=0.0, help="DiT uses AdamW without weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (must be installed).")
    g.add_argument(
        "--adam_fused",
        action="store_true",
        help="torch's fused AdamW (one kernel for all parameters, CUDA and CPU); same maths as the default.",
    )
    g.add_argument(
        "--adam_foreach",
        action="store_true",
        help="torch's multi-tensor AdamW (torch's own default on CUDA, not on CPU); same maths as the default.",
    )
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    g.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config.",
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs.")
    g.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an EMA of the weights for validation and export (--no-use_ema to disable).",
    )
    g.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay cap (DiT: 0.9999).")
    g.add_argument(
        "--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up: decay = 1 - (1 + step/inv_gamma)^-power."
    )
    g.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up power.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints (oldest pruned)."
    )
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--max_bad_steps", type=int, default=20, help="Stop after N consecutive non-finite steps.")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    g.add_argument(
        "--ddp_timeout", type=int, default=7200, help="Process-group timeout (s), long enough for evaluation."
    )


def add_validation_args(parser: argparse.ArgumentParser, project_name: str) -> argparse._ArgumentGroup:
    """The validation-grid and logging flags of every training script (`project_name`: the script's default tracker
    project); returns the group for a script's own validation flags."""
    v = parser.add_argument_group("validation and logging")
    v.add_argument(
        "--validation_steps", type=int, default=500, help="Sample a validation grid every N steps (0: never)."
    )
    v.add_argument(
        "--num_validation_images", type=int, default=20, help="Images per validation grid (cycling the classes)."
    )
    v.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log scalars every N steps (averaged over the processes; one host sync per log), with img/s, s/step and "
        "the peak accelerator memory.",
    )
    v.add_argument("--tracker_project_name", type=str, default=project_name, help="Tracker project.")
    v.add_argument(
        "--run_name",
        type=str,
        default=None,
        help="The run's name in wandb / comet / mlflow (None: the tracker's own).",
    )
    return v


def adamw_from_flags(args: argparse.Namespace, params, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """`sadm.frame.make_adamw` with the shared --adam_weight_decay, --adam_epsilon and implementation flags."""
    from .frame import make_adamw

    return make_adamw(
        params,
        lr,
        betas,
        args.adam_weight_decay,
        args.adam_epsilon,
        use_8bit=args.use_8bit_adam,
        fused=args.adam_fused,
        foreach=args.adam_foreach,
    )


def check_optimizer_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The AdamW implementation flags exclude each other (and bitsandbytes' 8-bit AdamW has neither)."""
    chosen = [flag for flag in ("use_8bit_adam", "adam_fused", "adam_foreach") if getattr(args, flag)]
    if len(chosen) > 1:
        parser.error(f"--{' and --'.join(chosen)} exclude each other; pick one AdamW implementation.")


def adamw_implementation(args: argparse.Namespace) -> dict[str, bool]:
    """Keyword arguments of `torch.optim.AdamW` choosing its implementation: fused, foreach, or torch's default."""
    if args.adam_fused:
        return {"fused": True}
    if args.adam_foreach:
        return {"foreach": True}
    return {}


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the flags of `--config FILE` (YAML or JSON) placed before the command line's.

    The file's entries become command-line tokens, so argparse checks their types and choices as it checks typed flags,
    and a flag given on the command line wins (argparse keeps the last occurrence). Keys are flag names without the
    dashes; booleans switch `store_true` and `--x/--no-x` flags; lists fill multi-value flags; null keeps the default.

    Raises (through `parser.error`, exit code 2): a file that does not exist or is not a mapping, a key that is not a
    flag of this script (both named with the file).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return parser.parse_args(argv)
    if not os.path.isfile(path):
        parser.error(f"--config {path} is not a file.")
    with open(path) as f:
        if path.endswith(".json"):
            entries = json.load(f)
        else:
            import yaml  # PyYAML, a dependency of accelerate

            entries = yaml.safe_load(f)
    if not isinstance(entries, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values, got {type(entries).__name__}.")
    actions = {option.lstrip("-"): action for action in parser._actions for option in action.option_strings}
    tokens: list[str] = []
    for key, value in entries.items():
        action = actions.get(str(key).lstrip("-"))
        if action is None or action.dest in ("config", "help"):
            parser.error(f"--config {path}: {key!r} is not a flag of this script (see --help).")
        flag = "--" + str(key).lstrip("-")
        if value is None:
            continue
        if action.nargs == 0:  # store_true / BooleanOptionalAction
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} takes true or false, got {value!r}.")
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else "--no-" + flag[2:])
            elif value:
                tokens.append(flag)
        elif isinstance(value, list):
            tokens += [flag, *map(str, value)]
        else:
            tokens += [flag, str(value)]
    return parser.parse_args(tokens + argv)


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    config_cls,
    prefix: str,
    rename: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of a method's dataclass config (`--<prefix><field>`, or `rename[field]`), help text from the field.

    Each flag's default is the field's (shown by [`HelpFormatter`]); fields whose default is None are resolved by the
    config itself (e.g. from a preset) and say so in their help.

    Not `transformers.HfArgumentParser`: it names each flag after its field, with no prefix or renaming, so the two
    method configs (whose fields share names such as `weight` and `warmup_steps`) would collide in one parser.
    """
    rename = rename or {}
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(config_cls.__name__)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + rename.get(f.name, prefix + f.name)
        if f.default is dataclasses.MISSING:
            raise ValueError(f"{config_cls.__name__}.{f.name} has no default; every method option needs one.")
        value_type = next(t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        action = {"action": argparse.BooleanOptionalAction} if value_type is bool else {"type": value_type}
        group.add_argument(flag, default=f.default, help=f.metadata.get("help", ""), **action)


def dataclass_from_args(
    config_cls, args: argparse.Namespace, prefix: str, rename: dict[str, str] | None = None, skip: tuple[str, ...] = ()
):
    """Build the config from the flags added by `add_dataclass_args`; fields whose flag was not given keep their default."""
    rename = rename or {}
    values = {}
    for f in dataclasses.fields(config_cls):
        value = None if f.name in skip else getattr(args, rename.get(f.name, prefix + f.name))
        if value is not None:
            values[f.name] = value
    return config_cls(**values)


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
