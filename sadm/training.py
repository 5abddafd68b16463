"""What both training scripts share: flags, the output-folder and checkpoint rules, save/load hooks, EMA, grids, export.

The scripts keep the loop and the method logic visible; this module only holds plumbing that must behave identically
in both (and is tested once): never overwrite an output folder by accident, write checkpoints and exports atomically,
never save non-finite weights, restore every piece of state on resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import sys
import typing
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from PIL import Image
from torch.utils.data import Sampler

from .data import resolve_num_workers
from .preemption import ignore_preemption_signals

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_STATE_NAME = "train_state.json"
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
EMA_STATE_NAME = "ema_state.pt"
MANIFEST_NAME = "manifest.json"


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


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Refuse a non-empty --output_dir unless resuming or explicitly overwriting, before any work is done."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {path} exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()) and resume is None and not overwrite:
        raise ValueError(
            f"--output_dir {path} is not empty. Pass --resume_from_checkpoint latest to continue that run, "
            "--overwrite_output_dir to write into it anyway, or choose another folder."
        )


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator with the project/logging folders, a long process-group timeout and a guard against silent DDP-less runs."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        # batches come from pinned memory on CUDA (`make_dataloader`), so the copy to the device need not block
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )
    check_distributed(accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.device.type == "cpu":
        logger.warning(
            "--mixed_precision fp16 has no effect on CPU: accelerate runs float32 there, without autocast or loss "
            "scaling. Use --mixed_precision bf16 for mixed precision on CPUs."
        )
    if args.allow_tf32:  # read by CUDA kernels only: a no-op on CPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def check_fsdp(
    accelerator: Accelerator, trainable: str, use_ema: bool, validation_steps: int = 0, eval_steps: int = 0
) -> None:
    """Stop, before any model is built, on the FSDP setups the training scripts do not handle.

    The scripts keep the trained parameters (EMA, weight swaps, export) as the tensors they were before `prepare`:
    FSDP1 with `use_orig_params` keeps those objects (the accelerate configs under configs/accelerate/ set it),
    FSDP2 replaces them with DTensors. With several processes each one holds only its shard of every parameter, which
    a full-size EMA cannot follow, nor can the validation and evaluation samplers run the unwrapped module;
    parameter-efficient fine-tuning saves parameters by name from the unsharded module.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if accelerator.is_fsdp2:
        raise ValueError(
            "FSDP2 (fsdp_version: 2) replaces the parameters with DTensors in accelerator.prepare, while the EMA and "
            "the export hold on to the original ones: use fsdp_version: 1 (configs/accelerate/fsdp.yaml)."
        )
    if not accelerator.state.fsdp_plugin.use_orig_params:
        raise ValueError(
            "FSDP without use_orig_params flattens the parameters that the EMA, the discriminator optimizers and the "
            "export use: set fsdp_use_orig_params: true in the accelerate config (configs/accelerate/fsdp.yaml)."
        )
    if trainable != "full":
        raise ValueError(f"--trainable {trainable} is not supported under FSDP: use --trainable full, or DDP.")
    if use_ema and accelerator.num_processes > 1:
        raise ValueError(
            f"--use_ema under FSDP with {accelerator.num_processes} processes: each process holds a shard of every "
            "parameter, which the full-size EMA cannot follow. Use --no-use_ema with FSDP, or DDP (the EMA works with "
            "a single FSDP process, as in scripts/gpu_check.sh)."
        )
    if (validation_steps or eval_steps) and accelerator.num_processes > 1:
        raise ValueError(
            f"--validation_steps {validation_steps} / --eval_steps {eval_steps} under FSDP with "
            f"{accelerator.num_processes} processes: the samplers run the unwrapped model, whose parameters are "
            "sharded. Pass --validation_steps 0 --eval_steps 0 and evaluate the export (scripts/evaluate.py)."
        )


def check_distributed(accelerator: Accelerator) -> None:
    """Several processes started without a distributed backend train unrelated copies silently: stop instead.

    Also warns when `accelerate launch --cpu --num_processes N` (N > 1) started a single process: that launcher exports
    MASTER_ADDR but starts one process without WORLD_SIZE unless MPI is set up (the run is correct, but on one process).
    """
    if (
        accelerator.num_processes == 1
        and "WORLD_SIZE" not in os.environ
        and "MASTER_ADDR" in os.environ
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    ):
        logger.warning(
            "accelerate's CPU launcher was asked for several processes but started ONE (`--cpu --num_processes N` "
            "needs MPI). For N DDP processes over gloo use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ... (docs/DISTRIBUTED.md)."
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} processes were started but accelerate sees a single process ({accelerator.distributed_type}). "
            "On CPUs use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError("Several processes but no distributed backend is active; check the accelerate config.")


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with its own generator seeded by (seed, epoch): the data order depends only on the epoch, so a resumed run
    sees the same batches as an uninterrupted one and no global RNG is consumed by the data order.

    It yields `epoch * num_items + index`; `ImageLabelDataset` takes the index modulo its length and seeds the sample's
    augmentation with the whole key."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offset = self.epoch * self.num_items
        return iter((torch.randperm(self.num_items, generator=generator) + offset).tolist())

    def __len__(self) -> int:
        return self.num_items


def make_dataloader(
    dataset, batch_size: int, seed: int, num_workers: int | None, collate_fn
) -> torch.utils.data.DataLoader:
    """A training DataLoader whose order is reproducible and resumable (see `EpochShuffleSampler`); `num_workers=None`
    picks the default of `sadm.data.resolve_num_workers`."""
    dataset.augment_seed = seed
    num_workers = resolve_num_workers(num_workers, dataset)
    if len(dataset) < batch_size:
        logger.warning(
            f"The dataset has {len(dataset)} samples, fewer than one batch of {batch_size}; batches are partial."
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=len(dataset) >= batch_size,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # worker seeds never draw from the global RNG
        persistent_workers=False,
        worker_init_fn=ignore_preemption_signals,  # the cluster's SIGTERM must reach only the main process's handler
    )


# ----------------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders with a train_state.json (no temporary prefix), oldest first, not verified."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
            if (path / TRAIN_STATE_NAME).exists():
                found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes `path` an incomplete checkpoint (naming the file), or None when it is complete.

    Complete: a train_state.json and, when the checkpoint has a `manifest.json` (written last by `save_checkpoint`),
    every file it lists with its recorded size. Checkpoints written before the manifest existed count as complete
    when their train_state.json is there. Sizes, not checksums: a write cut short (killed process, full disk, a copy
    interrupted by a sync tool) leaves missing or short files, which a `stat` per file finds; hashing would read every
    weight file on each save and resume (gigabytes for DiT-XL), and silent bit flips are the file system's to catch.
    """
    path = Path(path)
    if not (path / TRAIN_STATE_NAME).is_file():
        return f"{path / TRAIN_STATE_NAME} is missing"
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} has {actual} bytes, the manifest says {size} (truncated)"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-N` that pass `checkpoint_problem`, no temporary prefix), oldest first."""
    return [path for path in _checkpoint_folders(output_dir) if checkpoint_problem(path) is None]


def resolve_resume_path(output_dir: str, resume: str | None) -> Path | None:
    """`latest` -> the newest complete checkpoint of output_dir (None when there is none), warning about each newer
    incomplete one it passes over; a path must be a complete checkpoint (else an error naming the missing or
    truncated file)."""
    if resume is None:
        return None
    if resume == "latest":
        for path in reversed(_checkpoint_folders(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logger.warning(f"Skipping the incomplete checkpoint {path}: {problem}. Trying the previous one.")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a complete checkpoint: {problem}.")
    return path


def assert_finite_parameters(models: dict[str, torch.nn.Module]) -> None:
    """Never write non-finite weights: raise naming the model and parameter."""
    for model_name, model in models.items():
        for param_name, param in model.state_dict().items():
            if param.is_floating_point() and not torch.isfinite(param).all():
                raise FloatingPointError(f"Refusing to save: {model_name}.{param_name} has non-finite values.")


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, global_step: int, train_state: dict, total_limit: int | None
) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed into place when complete; then prune old checkpoints.

    The main process writes `train_state.json`, then `manifest.json` (every file's size, see `checkpoint_problem`) last,
    fsyncs and renames. A process killed at any moment leaves either no `checkpoint-N` or a complete one, and `latest`
    only sees complete ones; older checkpoints are pruned only once the new one is in place. A failed write (e.g. a full
    disk) removes the temporary folder, leaves the previous checkpoints as they were and raises, naming the folder and
    the free space. Call on every process (save_state runs the registered hooks and writes RNG states per process).
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = Path(output_dir) / f".tmp-{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        if final.exists():
            raise FileExistsError(f"Checkpoint {final} already exists; refusing to overwrite it.")
        for leftover in Path(output_dir).glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # saves killed mid-way, this one included
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(tmp / TRAIN_STATE_NAME, "w") as f:
                json.dump({"global_step": global_step, **train_state}, f, indent=2)
            write_manifest(tmp)
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(output_dir).free
        previous = list_checkpoints(output_dir)
        need = f", the previous checkpoint takes {_folder_size(previous[-1]) / 2**20:.1f} MiB" if previous else ""
        kept = f" {previous[-1]} is intact." if previous else ""
        raise OSError(
            errno.ENOSPC,
            f"No space left on the device of --output_dir {output_dir} while writing checkpoint {global_step} "
            f"({free / 2**20:.1f} MiB free{need}); the partial checkpoint was removed.{kept} Free some space (or lower "
            "--checkpoints_total_limit) and resume with --resume_from_checkpoint latest.",
        ) from e
    if accelerator.is_main_process and total_limit is not None:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def write_manifest(checkpoint: Path) -> None:
    """`manifest.json`: the size of every file of the checkpoint, written last (see `checkpoint_problem`)."""
    files = {
        file.relative_to(checkpoint).as_posix(): file.stat().st_size
        for file in sorted(checkpoint.rglob("*"))
        if file.is_file() and file.name != MANIFEST_NAME
    }
    with open(checkpoint / MANIFEST_NAME, "w") as f:
        json.dump({"files": files}, f, indent=1)


def _folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int) -> None:
    """Keep the newest `total_limit` (at least one) complete checkpoints.

    Each pruned folder is first renamed to `.tmp-pruned-checkpoint-N` (atomic), then deleted: a process killed while
    deleting leaves a hidden leftover that `list_checkpoints` ignores (and the next pruning removes), never a half-deleted
    `checkpoint-N` that still looks complete.
    """
    root = Path(output_dir)
    for leftover in root.glob(f".tmp-pruned-{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in list_checkpoints(root)[: -max(total_limit, 1)]:
        doomed = root / f".tmp-pruned-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def _fsync_dir(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def load_train_state(checkpoint: Path) -> dict:
    with open(checkpoint / TRAIN_STATE_NAME) as f:
        return json.load(f)


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of a prepared model, with the keys of the unwrapped model.

    Under FSDP this is a collective: call it on every process (with several processes only the main one gets the
    tensors, in CPU memory; the others get an empty dict). FSDP1 gathers with `FULL_STATE_DICT`, offloading to the CPU
    only with several processes (torch refuses the offload for the `NO_SHARD` it uses on a single process, which
    `accelerator.get_state_dict` would ask for); FSDP2 through `accelerator.get_state_dict`. Other setups: the
    unwrapped model's `state_dict()`.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(model).state_dict()
    if accelerator.is_fsdp2:
        return accelerator.get_state_dict(model)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    several = accelerator.num_processes > 1
    config = FullStateDictConfig(offload_to_cpu=several, rank0_only=several)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    prefix = "_orig_mod."  # a compiled module's keys, as `unwrap_model` strips the compile wrapper
    return {key.removeprefix(prefix): value for key, value in state.items()}


def save_pretrained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: str) -> None:
    """What `model.save_pretrained(folder)` writes (config and safetensors weights), with the weights taken from `state`
    (e.g. gathered from FSDP shards, where the module itself only holds this process's shard)."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    # (no `model.state_dict()` here: under FSDP that is itself a collective, and this runs on the main process only)
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(tensors, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def register_model_hooks(
    accelerator: Accelerator,
    names: list[str],
    ema=None,
    ema_name: str = "transformer_ema",
    trainable_only: tuple[str, ...] = (),
) -> None:
    """Save every prepared model with `save_pretrained` into `<checkpoint>/<name>/` (safetensors) and load it back.

    `names` follow the order in which the models were passed to `accelerator.prepare`. The EMA is saved beside them.
    Models named in `trainable_only` (parameter-efficient fine-tuning) save only their trained parameters, by name, in
    `<name>/trainable.safetensors`; the frozen rest is rebuilt from the pretrained weights on resume. An EMA built without
    a `model_cls` (one over the trained parameters only) is saved as its state dict, `<ema_name>/ema_state.pt`.

    Under FSDP (`accelerate launch --config_file configs/accelerate/fsdp*.yaml`) the folders hold the gathered full
    weights (`full_state_dict`, gathered by every process, written by the main one), so a checkpoint's model folders
    load with `from_pretrained` whatever the sharding; accelerate itself saves and loads the FSDP models and
    optimizers (`pytorch_model_fsdp*.bin`, `optimizer*.bin`) and resumes from those.
    """
    from safetensors.torch import load_file, save_file

    def trained(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        # `EMAModel.save_pretrained` builds a model to save into, and its initialisation draws from the global CPU RNG:
        # without the fork, writing a checkpoint would change the rest of the run (a run stopped by a signal at step N
        # would then not resume into the uninterrupted run, which wrote no checkpoint at N)
        with torch.random.fork_rng(devices=[]):
            _save_models(models, output_dir)
        while weights:  # accelerate must not pickle the weights again
            weights.pop()

    def _save_models(models, output_dir):
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        # FSDP: every process takes part in gathering each model's full state dict (a collective), the main one writes
        gathered = [full_state_dict(accelerator, model) for model in models] if fsdp else [None] * len(models)
        if accelerator.is_main_process:
            for name, model, state in zip(names, models, gathered):
                model = accelerator.unwrap_model(model)
                if name in trainable_only:
                    os.makedirs(os.path.join(output_dir, name), exist_ok=True)
                    save_file(trained(model), os.path.join(output_dir, name, TRAINABLE_WEIGHTS_NAME))
                elif state is not None:
                    save_pretrained_state(model, state, os.path.join(output_dir, name))
                else:
                    model.save_pretrained(os.path.join(output_dir, name))
            if ema is not None and ema.model_cls is None:
                os.makedirs(os.path.join(output_dir, ema_name), exist_ok=True)
                torch.save(ema.state_dict(), os.path.join(output_dir, ema_name, EMA_STATE_NAME))
            elif ema is not None:
                ema.save_pretrained(os.path.join(output_dir, ema_name))

    def load_hook(models, input_dir):
        # FSDP: accelerate loads the models itself (its full-state-dict `pytorch_model_fsdp*.bin`) and passes none here
        for name, model in zip(names, list(models)):
            model = accelerator.unwrap_model(model)
            if name in trainable_only:
                path = os.path.join(input_dir, name, TRAINABLE_WEIGHTS_NAME)
                state, expected = load_file(path), set(trained(model))
                if set(state) != expected:
                    raise ValueError(
                        f"{path} holds other parameters than this run trains ({len(set(state) - expected)} unexpected, "
                        f"{len(expected - set(state))} missing, e.g. {sorted(set(state) ^ expected)[:3]}): resume with "
                        "the --trainable/--lora_* options of the run that wrote it."
                    )
                model.load_state_dict(state, strict=False)
                continue
            loaded = type(model).from_pretrained(input_dir, subfolder=name)
            model.load_state_dict(loaded.state_dict())
            del loaded
        while models:
            models.pop()
        if ema is not None and ema.model_cls is None:
            state = torch.load(
                os.path.join(input_dir, ema_name, EMA_STATE_NAME), map_location="cpu", weights_only=True
            )
            ema.load_state_dict(state)
            ema.to(accelerator.device)
        elif ema is not None:
            from diffusers.training_utils import EMAModel

            loaded_ema = EMAModel.from_pretrained(os.path.join(input_dir, ema_name), model_cls=ema.model_cls)
            ema.load_state_dict(loaded_ema.state_dict())
            ema.to(accelerator.device)
            del loaded_ema

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------------------- export
def atomic_save_pretrained(output_dir: str, write) -> None:
    """Run `write(tmp_dir)` and move each written entry into output_dir, replacing older ones only once all is written.

    `output_dir` also holds the checkpoints, so the export cannot be one rename: the entries are moved one by one, with
    `model_index.json` (what `DiffusionPipeline.from_pretrained` reads first) removed before and moved in last. A process
    killed during the moves leaves a folder without `model_index.json` (fails to load, loudly), never one that loads a
    mix of old and new weights; killed during `write`, the previous export is untouched.
    """
    root = Path(output_dir)
    tmp = root / ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(str(tmp))
    _fsync_dir(tmp)
    index = root / "model_index.json"
    if (tmp / "model_index.json").exists() and index.exists():
        os.remove(index)
    for entry in sorted(tmp.iterdir(), key=lambda p: (p.name == "model_index.json", p.name)):
        target = root / entry.name
        if target.is_dir():
            old = root / f".old-{entry.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp)


def write_model_card(
    output_dir: str,
    title: str,
    lines: list[str],
    loads_without_sadm: bool = True,
    base_model: str | None = None,
    tags: tuple[str, ...] = ("sadm", "dit", "diffusion-transformer"),
) -> None:
    """README.md of an export: what was trained, how to load it, and the command that produced it.

    The metadata block is huggingface_hub's `ModelCardData` (valid YAML the Hub reads: `library_name: diffusers`,
    `base_model` for a fine-tune of a Hub model, the tags) completed by diffusers' `populate_model_card`. Not diffusers'
    `load_or_create_model_card`: it first looks the card up on the Hub, which fails offline and on a local folder.

    Args:
        output_dir (`str`): the export folder.
        title (`str`): the card's heading.
        lines (`list[str]`): markdown lines describing the run (data, model, objective).
        loads_without_sadm (`bool`): the folder holds a `pipeline.py`, so diffusers loads it with `trust_remote_code`.
        base_model (`str`, *optional*): the model fine-tuned; recorded in the metadata when it is a Hub repository id
            (a local folder is named in `lines` instead, since the Hub cannot resolve it).
        tags (`tuple[str, ...]`): Hub tags.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    command = " ".join(["accelerate launch"] + [a if " " not in a else repr(a) for a in sys.argv])
    body = [
        f"# {title}",
        "",
        *lines,
        "",
        "## Load",
        "```python",
        "import sadm  # registers the pipeline classes on diffusers",
        "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained('PATH')",
        "```",
        "Without installing sadm: `DiffusionPipeline.from_pretrained('PATH', custom_pipeline='pipeline', trust_remote_code=True)`."
        if loads_without_sadm
        else "Loading needs sadm installed (the model class lives in sadm).",
        "",
        "## Command",
        "```",
        command,
        "```",
    ]
    hub_base = base_model if base_model is not None and not os.path.exists(base_model) else None
    data = ModelCardData(library_name="diffusers", base_model=hub_base)
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body) + "\n"), tags=list(tags))
    card.save(os.path.join(output_dir, "README.md"))


def copy_pipeline_file(source_file: str, output_dir: str) -> None:
    """A `pipeline.py` in the folder lets diffusers load it without sadm installed (custom_pipeline + trust_remote_code)."""
    shutil.copyfile(source_file, os.path.join(output_dir, "pipeline.py"))


# ---------------------------------------------------------------------------------------------------------------- images
def image_grid(images: np.ndarray, rows: int | None = None, padding: int = 1) -> Image.Image:
    """Float NHWC images in [0, 1] -> one PIL grid with `padding` mid-grey pixels between cells.

    Not `diffusers.utils.make_image_grid`: that one butts the cells together, and 8x8 digits are unreadable without the
    grey lines between them (it also needs rows x cols == n, where this fills the last row partially)."""
    n, h, w, c = images.shape
    rows = rows or int(math.ceil(math.sqrt(n)))
    cols = int(math.ceil(n / rows))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 0.5, dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    array = (grid * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0], mode="L") if c == 1 else Image.fromarray(array)


def log_images(accelerator: Accelerator, name: str, images: np.ndarray, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image) for image in images]}, step=step)


# ----------------------------------------------------------------------------------------------- method configs as flags
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


def register_state_hooks(accelerator: Accelerator, states: dict[str, torch.nn.Module]) -> None:
    """Save non-model state (e.g. AdaptiveDiffusion's p, T, t-table, RNG) as `<checkpoint>/<name>.pt` and load it back with
    `torch.load(weights_only=True)`."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for name, module in states.items():
                torch.save(module.state_dict(), os.path.join(output_dir, f"{name}.pt"))

    def load_hook(models, input_dir):
        for name, module in states.items():
            module.load_state_dict(
                torch.load(os.path.join(input_dir, f"{name}.pt"), map_location="cpu", weights_only=True)
            )

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ------------------------------------------------------------------------------------------------------- numerical faults
def step_if_finite(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    lr_scheduler=None,
) -> tuple[bool, torch.Tensor]:
    """Clip the gradients, then step only when their norm is finite; returns `(finite, grad_norm)`. One host sync.

    A non-finite step changes nothing: no optimizer or LR-scheduler step, the gradients are zeroed. With fp16 loss
    scaling (`accelerator.scaler`) the optimizer step is still called: the scaler skips it itself (it saw the inf when
    unscaling for the clip) and lowers the scale; without that call the scale would never back off and every later
    step would overflow again. Only this optimizer's gradients are unscaled: accelerate's `clip_grad_norm_` unscales
    every optimizer's, which would unscale a discriminator's gradients while they are still being accumulated (scaled)
    over micro-batches.
    """
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    if accelerator.scaler is not None and accelerator.distributed_type != DistributedType.FSDP:
        accelerator.unscale_gradients(optimizer=optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    finite = bool(torch.isfinite(grad_norm))
    if finite or accelerator.scaler is not None:
        optimizer.step()
    if finite and lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


class BadStepCounter:
    """Skipped (non-finite) optimizer steps per model: `consecutive` stops the run at `max_bad_steps` in a row of any
    one model, `total` is logged as `bad_steps_<model>`. Saved in `train_state.json` for an exact resume."""

    def __init__(self, max_bad_steps: int, state: dict | int | None = None):
        self.max_bad_steps = max_bad_steps
        self.consecutive: dict[str, int] = {}
        self.total: dict[str, int] = {}
        if isinstance(state, int):  # checkpoints written before per-model counts: the denoiser's consecutive count
            self.consecutive["transformer"] = state
        elif state:
            self.consecutive, self.total = dict(state["consecutive"]), dict(state["total"])

    def update(self, model_name: str, finite: bool, step: int) -> None:
        """Count one optimizer step of `model_name`; raise `FloatingPointError` after `max_bad_steps` bad ones in a row."""
        self.total.setdefault(model_name, 0)
        if finite:
            self.consecutive[model_name] = 0
            return
        self.total[model_name] += 1
        count = self.consecutive[model_name] = self.consecutive.get(model_name, 0) + 1
        logger.warning(f"Non-finite {model_name} gradient at step {step}: step skipped ({count} in a row).")
        if count >= self.max_bad_steps:
            raise FloatingPointError(
                f"{count} consecutive non-finite {model_name} steps (--max_bad_steps {self.max_bad_steps}); stopping. "
                "Lower the learning rate(s) or --max_grad_norm, or resume from an earlier checkpoint."
            )

    def stats(self) -> dict[str, int]:
        return {f"bad_steps_{name}": count for name, count in self.total.items()}

    def state_dict(self) -> dict:
        return {"consecutive": dict(self.consecutive), "total": dict(self.total)}


# ------------------------------------------------------------------------------------------------- per-sample randomness
def sample_generators(
    seed: int, sample_keys: torch.Tensor, stream: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample on `device`, seeded by a hash of (seed, sample key, stream).

    Draws made from them depend only on the sample (its key says which image in which epoch, see `EpochShuffleSampler`),
    not on its position in the batch, the process that holds it or the micro-batch it falls in: a run is then the same
    on any number of processes and accumulation steps. `stream` separates independent uses of one sample. Generators on
    the GPU draw there (one small kernel per sample); CPU and GPU generators give different numbers.
    """
    return [torch.Generator(device=device).manual_seed(_mix64(seed, key, stream)) for key in sample_keys.tolist()]


def _mix64(*values: int) -> int:
    """SplitMix64 over the values: nearby (seed, key, stream) triples give unrelated 64-bit seeds."""
    mask, x = (1 << 64) - 1, 0
    for value in values:
        x = (x + 0x9E3779B97F4A7C15 + (value & mask)) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x


def draw_uniform(n: int, device: torch.device, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """U[0, 1) `[n]`: from the global RNG (`torch.rand`), or sample i from `generators[i]`."""
    if generators is None:
        return torch.rand(n, device=device)
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(device)


def draw_timesteps(
    n: int, num_timesteps: int, device: torch.device, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_timesteps) `[n]`: from the global RNG, or sample i from `generators[i]`."""
    if generators is None:
        return torch.randint(0, num_timesteps, (n,), device=device)
    return torch.cat([torch.randint(0, num_timesteps, (1,), generator=g, device=g.device) for g in generators]).to(
        device
    )
