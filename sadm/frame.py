"""The frame both training scripts put around their step, written once so that the two cannot drift apart.

The optimizer factory, the EMA weights swapped in for validation and evaluation, the validation grid, resuming into a
train state, the best-checkpoint export of the in-training evaluator, and the configuration logged to the tracker.
Typed arguments only: the scripts read their flags and call these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .checkpointing import CHECKPOINT_PREFIX, assert_finite_parameters, load_train_state, resolve_resume_path
from .export import atomic_save_pretrained, image_grid

logger = get_logger(__name__)


def log_images(accelerator: Accelerator, name: str, images: np.ndarray, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image) for image in images]}, step=step)


def make_adamw(
    params,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    use_8bit: bool = False,
    fused: bool = False,
    foreach: bool = False,
) -> torch.optim.Optimizer:
    """AdamW: torch's (default, fused or multi-tensor implementation, same maths) or bitsandbytes' 8-bit AdamW."""
    if use_8bit:
        if fused or foreach:
            raise ValueError("bitsandbytes' 8-bit AdamW has no fused or foreach implementation.")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    implementation = {"fused": True} if fused else {"foreach": True} if foreach else {}
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **implementation)


@contextlib.contextmanager
def ema_weights(ema, parameters: Iterable[torch.nn.Parameter], model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block `model` is in eval mode with the EMA weights (when there is an EMA); afterwards the training
    weights and train mode are back. `parameters` are the tensors the EMA tracks (all of `model`'s, or the trained
    ones under PEFT)."""
    parameters = list(parameters)
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    model.eval()
    try:
        yield model
    finally:
        model.train()
        if ema is not None:
            ema.restore(parameters)


def validation_labels(num_images: int, num_classes: int) -> list[int] | None:
    """Class labels of a validation grid, cycling through the classes (None for unlabeled data)."""
    return [i % num_classes for i in range(num_images)] if num_classes else None


def save_validation_grid(accelerator: Accelerator, images: np.ndarray, output_dir: str, step: int) -> str:
    """Log float NHWC images to the trackers and write them as `<output_dir>/validation/step-NNNNNNN.png`."""
    log_images(accelerator, "validation", images, step)
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:07d}.png")
    image_grid(images).save(path)
    return path


def resume_train_state(accelerator: Accelerator, output_dir: str, resume_from_checkpoint: str | None) -> dict | None:
    """Load the checkpoint `--resume_from_checkpoint` names (models, optimizers, RNG states, registered hooks) and
    return its `train_state.json`; None when there is nothing to resume (`latest` without a checkpoint starts anew)."""
    resume_path: Path | None = resolve_resume_path(output_dir, resume_from_checkpoint)
    if resume_path is None:
        if resume_from_checkpoint is not None:
            accelerator.print(f"No checkpoint in {output_dir}; starting a new run.")
        return None
    accelerator.print(f"Resuming from {resume_path}")
    accelerator.load_state(str(resume_path))
    return load_train_state(resume_path)


def log_preemption_stop(accelerator: Accelerator, preemption, output_dir: str, step: int) -> None:
    """Say that a signal (see [`~sadm.preemption.PreemptionHandler`]) stopped the run at `step` after its checkpoint,
    and how to continue; the script then returns (exit code 0) without exporting."""
    checkpoint = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    logger.warning(
        f"Stopped by {preemption.signal_name} at step {step}: checkpoint {checkpoint} written, no export. Continue "
        "with --resume_from_checkpoint latest (and the same flags).",
        main_process_only=True,
    )


def evaluate_and_keep_best(
    accelerator: Accelerator,
    evaluator,
    step: int,
    pipeline,
    write_best: Callable[[str], None],
    models: dict[str, torch.nn.Module],
) -> dict[str, float]:
    """Measure `pipeline` with the in-training evaluator (on every process), log `eval/<metric>`, and export it into
    the evaluator's `best/` when it is the best so far (`write_best(folder)`, then the metrics file; finite weights
    only). Call inside `preserve_rng_state` and `ema_weights`; returns the results."""
    results, is_best = evaluator.evaluate(pipeline, step)
    if is_best and accelerator.is_main_process:
        assert_finite_parameters(models)

        def write(folder: str) -> None:
            write_best(folder)
            evaluator.write_best_metrics(folder, step, results)

        atomic_save_pretrained(evaluator.best_dir, write)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in results.items())
    logger.info(f"step {step}: {summary}" + (" (best)" * is_best))
    accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
    return results


def run_periodic_jobs(
    accelerator: Accelerator,
    step: int,
    validation_steps: int,
    run_validation: Callable[[int], None],
    eval_steps: int,
    run_evaluation: Callable[[int], None],
) -> None:
    """After optimizer step `step`: the validation grid every `validation_steps` (main process only) and the
    in-training evaluation every `eval_steps` (on every process: it is collective); 0 disables either."""
    if validation_steps and step % validation_steps == 0 and accelerator.is_main_process:
        run_validation(step)
    if eval_steps and step % eval_steps == 0:
        run_evaluation(step)


def export_pipeline(output_dir: str, write: Callable[[str], None]) -> None:
    """Write the final export into `output_dir` atomically (see `atomic_save_pretrained`) and say where it is."""
    atomic_save_pretrained(output_dir, write)
    logger.info(f"Pipeline written to {output_dir}")


def tracker_config(flags: dict, configs: dict[str, object]) -> dict[str, int | float | str | bool]:
    """What the trackers record: every scalar flag, and every field of the effective method configs as
    `<name>.<field>` (None as the string 'None', which TensorBoard's hparams accept)."""
    values = {k: v for k, v in flags.items() if isinstance(v, (int, float, str, bool))}
    for name, config in configs.items():
        for key, value in dataclasses.asdict(config).items():
            values[f"{name}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


class ScalarLogger:
    """Logs scalar statistics to the trackers, the same values on every process's behalf.

    Each value is averaged over the processes before it is logged (one `reduce` of all values together; a value that
    is NaN or infinite on some process is averaged over the others, NaN where none has it), and the throughput since
    the previous log is added: `img_per_s` (global batch × optimizer steps / wall time, which includes any validation,
    evaluation or checkpoint in between), `step_time_s`, and on CUDA `peak_memory_gib` (this process's peak allocated
    memory since the start). Call on every process at the same steps: the reduction is collective.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        global_batch_size (`int`): samples per optimizer step over all processes and accumulation steps.
        start_step (`int`, defaults to 0): the global step the run starts (or resumes) at.
    """

    def __init__(self, accelerator: Accelerator, global_batch_size: int, start_step: int = 0):
        self.accelerator, self.global_batch_size = accelerator, global_batch_size
        self.last_step, self.last_time = start_step, time.perf_counter()

    def __call__(self, values: dict[str, torch.Tensor | float], step: int) -> dict[str, float]:
        """Reduce `values` (0-d tensors or numbers) over the processes, add the throughput, log at `step`; returns what
        was logged."""
        device = self.accelerator.device
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32).to(device).reshape(()) for v in values.values()]
        )
        finite = torch.isfinite(stacked)
        packed = torch.stack([torch.where(finite, stacked, torch.zeros_like(stacked)), finite.float()])  # [2, n]
        if self.accelerator.num_processes > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        means = (packed[0] / packed[1]).tolist()  # one host sync per log; 0/0 = NaN where no process had a value
        logs = dict(zip(values, means))
        now = time.perf_counter()
        steps, elapsed = step - self.last_step, now - self.last_time
        if steps > 0 and elapsed > 0:
            logs["step_time_s"] = elapsed / steps
            logs["img_per_s"] = steps * self.global_batch_size / elapsed
        if device.type == "cuda":
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.accelerator.log(logs, step=step)
        self.last_step, self.last_time = step, now
        return logs


def init_trackers(accelerator: Accelerator, project_name: str, run_name: str | None, config: dict) -> None:
    """`accelerator.init_trackers` with the run's name where the tracker has one (wandb, comet, mlflow, aim);
    TensorBoard keeps one folder per run (`--logging_dir`)."""
    init_kwargs = {}
    if run_name is not None:
        init_kwargs = {"wandb": {"name": run_name}, "comet_ml": {"name": run_name}, "mlflow": {"run_name": run_name}}
    accelerator.init_trackers(project_name, config=config, init_kwargs=init_kwargs)
