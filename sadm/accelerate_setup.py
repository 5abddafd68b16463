"""The `Accelerator` of a training run and the checks of the distributed setup, made before any model is built."""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, ProjectConfiguration

logger = logging.getLogger(__name__)


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
