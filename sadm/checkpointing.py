"""Checkpoints and the output folder of a training run.

The rules both training scripts share (tested once): never overwrite an output folder by accident, write checkpoints
atomically (a temporary folder, a manifest of file sizes written last, one rename), resume only from complete ones,
never save non-finite weights, and restore every piece of state on resume (models through `save_pretrained`, the EMA,
non-model state such as AdaptiveDiffusion's).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_STATE_NAME = "train_state.json"
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
EMA_STATE_NAME = "ema_state.pt"
MANIFEST_NAME = "manifest.json"


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
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_tree(final.parent)
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


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` (before the rename that makes a checkpoint or an export visible)."""
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
