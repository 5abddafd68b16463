"""Crash safety: a training run SIGKILLed at any moment leaves only complete, loadable checkpoints, and resumes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils.other import load as accelerate_load
from diffusers import DiffusionPipeline
from helpers import REPO, write_class_folder
from safetensors.torch import load_file

from sadm.accelerate_setup import make_accelerator
from sadm.checkpointing import (
    TRAIN_STATE_NAME,
    assert_finite_parameters,
    check_output_dir,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_path,
)
from sadm.export import atomic_save_pretrained
from sadm.step import BadStepCounter, step_if_finite

TOTAL_LIMIT = 2
TINY = [
    "--model", "tiny", "--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0", "--report_to", "none",
    "--checkpointing_steps", "1", "--checkpoints_total_limit", str(TOTAL_LIMIT), "--logging_steps", "1000",
    "--resume_from_checkpoint", "latest", "--structure_loss_weight", "0.01", "--structure_warmup_steps", "0", "--gan_loss_weight", "0.05",
]  # fmt: skip


def step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def start(out: Path, data: Path, max_steps: int, log: Path) -> subprocess.Popen:
    """The script itself (no launcher in between), so that SIGKILL hits the process that writes."""
    cmd = [sys.executable, str(REPO / "scripts" / "train_sadm.py"), *TINY, "--train_data_dir", str(data),
           "--output_dir", str(out), "--max_train_steps", str(max_steps)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))


def wait_until(proc: subprocess.Popen, condition, timeout: float = 120.0, poll: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def check_checkpoint_complete(path: Path) -> None:
    """Every part a resume needs is there and loads: weights as safetensors, the rest with weights_only=True."""
    state = json.loads((path / TRAIN_STATE_NAME).read_text())
    assert state["global_step"] == step_of(path)
    for sub in ("transformer", "transformer_ema", "discriminator", "timestep_discriminator"):
        assert (path / sub / "config.json").exists(), f"{path}/{sub} has no config"
        tensors = load_file(str(path / sub / "diffusion_pytorch_model.safetensors"))
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    for name in ("optimizer.bin", "optimizer_1.bin", "optimizer_2.bin", "scheduler.bin", "random_states_0.pkl"):
        assert accelerate_load(path / name, map_location="cpu") is not None  # accelerate's loader: weights_only=True
    torch.load(path / "adaptive_diffusion.pt", map_location="cpu", weights_only=True)
    assert not any(p.suffix in (".pt", ".bin", ".pkl") and p.stat().st_size == 0 for p in path.iterdir())


def check_run_folder(out: Path, had_checkpoint: bool) -> list[Path]:
    named = sorted((p for p in out.iterdir() if p.name.startswith("checkpoint-")), key=step_of)
    complete = list_checkpoints(out)
    assert named == complete, f"incomplete checkpoint folders {set(named) - set(complete)}"
    for path in complete:
        check_checkpoint_complete(path)
    assert not any(p.name.startswith(".") for p in complete)  # .tmp-* leftovers are never listed
    if had_checkpoint:
        assert 1 <= len(complete) <= TOTAL_LIMIT + 1  # +1: killed between the rename and the pruning
        assert resolve_resume_path(str(out), "latest") == complete[-1]
    return complete


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_resumable_checkpoints(tmp_path):
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    out = tmp_path / "run"
    rng = random.Random(0)

    def tmp_checkpoint_exists() -> bool:
        return any(p.name.startswith(".tmp-checkpoint-") for p in out.iterdir()) if out.exists() else False

    def checkpoint_after(step: int):
        return lambda: bool(list_checkpoints(out)) and step_of(list_checkpoints(out)[-1]) > step

    # (what to wait for, extra random delay): random moments between checkpoints, and while one is being written
    moments = [("checkpoint", 0.8), ("tmp", 0.0), ("tmp", 0.03), ("checkpoint", 0.3), ("tmp", 0.01)]
    latest, killed_while_writing = 0, 0
    for round_index, (moment, delay) in enumerate(moments):
        proc = start(out, data, max_steps=10_000, log=tmp_path / f"log-{round_index}.txt")
        try:
            # first let this run make progress past the checkpoint it resumed from
            assert wait_until(proc, checkpoint_after(latest)), (tmp_path / f"log-{round_index}.txt").read_text()[
                -3000:
            ]
            if moment == "tmp":
                assert wait_until(proc, tmp_checkpoint_exists), "no checkpoint was being written"
                killed_while_writing += 1
            time.sleep(rng.uniform(0, delay))
        finally:
            kill(proc)
        complete = check_run_folder(out, had_checkpoint=True)
        assert step_of(complete[-1]) > latest  # resumed and moved on, never went back
        latest = step_of(complete[-1])
    assert killed_while_writing == 3

    # a last run resumes from the newest complete checkpoint, finishes and exports a loadable pipeline
    log = tmp_path / "log-final.txt"
    proc = start(out, data, max_steps=latest + 2, log=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"Resuming from {out / f'checkpoint-{latest}'}" in log.read_text()
    complete = check_run_folder(out, had_checkpoint=True)
    assert [step_of(p) for p in complete] == [latest + 1, latest + 2]
    assert not any(p.name.startswith(".tmp-checkpoint-") for p in out.iterdir())  # stale temporaries were cleaned
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 1)


# ------------------------------------------------------------------------------------------- the same rules, in-process
def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / TRAIN_STATE_NAME).write_text(json.dumps({"global_step": step}))
    return path


def test_leftovers_are_ignored_and_latest_is_the_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 5)
    (tmp_path / ".tmp-checkpoint-6").mkdir()  # killed after train_state.json was written, before the rename
    (tmp_path / ".tmp-checkpoint-6" / TRAIN_STATE_NAME).write_text(json.dumps({"global_step": 6}))
    (tmp_path / ".tmp-checkpoint-7").mkdir()  # killed inside save_state
    (tmp_path / ".tmp-pruned-checkpoint-1").mkdir()
    fake_checkpoint(tmp_path, 9, complete=False)  # never produced by save_checkpoint; still not taken for complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5"]
    assert resolve_resume_path(str(tmp_path), "latest") == tmp_path / "checkpoint-5"
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        resolve_resume_path(str(tmp_path), str(tmp_path / "checkpoint-9"))


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_pruning_keeps_at_least_one_and_removes_leftovers(tmp_path, limit):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ".tmp-pruned-checkpoint-0").mkdir()  # a pruning killed mid-delete
    prune_checkpoints(tmp_path, limit)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (1, 2, 3)][-max(limit, 1) :]
    assert not list(tmp_path.glob(".tmp-pruned-*"))


def test_export_interrupted_while_writing_leaves_the_previous_export(tmp_path):
    def write(version):
        def run(folder):
            (Path(folder) / "transformer").mkdir()
            (Path(folder) / "transformer" / "w.txt").write_text(version)
            if version == "crash":
                raise KeyboardInterrupt
            (Path(folder) / "model_index.json").write_text(version)

        return run

    atomic_save_pretrained(str(tmp_path), write("v1"))
    with pytest.raises(KeyboardInterrupt):
        atomic_save_pretrained(str(tmp_path), write("crash"))
    assert (tmp_path / "model_index.json").read_text() == "v1"
    assert (tmp_path / "transformer" / "w.txt").read_text() == "v1"
    atomic_save_pretrained(str(tmp_path), write("v2"))  # the leftover .tmp-export does not block the next export
    assert (tmp_path / "model_index.json").read_text() == "v2" and not (tmp_path / ".tmp-export").exists()


def test_export_interrupted_while_moving_has_no_model_index(tmp_path, monkeypatch):
    """model_index.json is removed first and moved in last: a half-moved export never loads as a pipeline."""

    def write(version):
        def run(folder):
            for sub in ("scheduler", "transformer"):
                (Path(folder) / sub).mkdir()
                (Path(folder) / sub / "w.txt").write_text(version)
            (Path(folder) / "model_index.json").write_text(version)

        return run

    atomic_save_pretrained(str(tmp_path), write("v1"))
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(dst).name == ".old-transformer":
            raise KeyboardInterrupt  # killed after the scheduler was replaced, before the transformer
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_pretrained(str(tmp_path), write("v2"))
    monkeypatch.undo()
    assert (tmp_path / "scheduler" / "w.txt").read_text() == "v2"
    assert (tmp_path / "transformer" / "w.txt").read_text() == "v1"  # a mix on disk, but
    assert not (tmp_path / "model_index.json").exists()
    atomic_save_pretrained(str(tmp_path), write("v3"))
    assert all((tmp_path / s / "w.txt").read_text() == "v3" for s in ("scheduler", "transformer"))
    assert (tmp_path / "model_index.json").read_text() == "v3"


# ------------------------------------------------------------------------------ non-finite steps and weights, output dir
@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    """A learning rate of 1e30 makes every step after the first overflow: those steps are skipped (the weights stay
    as they were, and finite, in every checkpoint) and --max_bad_steps consecutive ones stop the run."""
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train_sadm.py"), "--model", "tiny", "--resolution", "8",
           "--train_batch_size", "2", "--validation_steps", "0", "--report_to", "none", "--train_data_dir", str(data),
           "--output_dir", str(out), "--max_train_steps", "20", "--checkpointing_steps", "1", "--learning_rate", "1e30",
           "--lr_warmup_steps", "0", "--max_bad_steps", "3", "--structure_loss_weight", "0", "--no-use_ema"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert result.returncode != 0
    assert "3 consecutive non-finite transformer steps (--max_bad_steps 3); stopping" in result.stderr
    assert result.stderr.count("Non-finite transformer gradient") == 3
    assert not (out / "model_index.json").exists()  # no export after a failed run
    saved = [load_file(str(p / "transformer" / "diffusion_pytorch_model.safetensors")) for p in list_checkpoints(out)]
    assert len(saved) >= 2 and all(torch.isfinite(t).all() for w in saved for t in w.values())
    assert all(torch.equal(saved[0][k], w[k]) for w in saved[1:] for k in w)  # skipped steps changed nothing


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, flags",
    [
        ("discriminator", ["--structure_loss_weight", "0.01", "--disc_r1_gamma", "3e38"]),
        ("timestep_discriminator", ["--gan_loss_weight", "0.05", "--diffusion_gan_r1_gamma", "3e38",
                                    "--diffusion_gan_r1_interval", "1", "--gan_timestep_weighting", "none"]),
    ],
    ids=["discriminator", "timestep_discriminator"],
)  # fmt: skip
def test_non_finite_discriminator_steps_are_skipped_counted_then_the_run_stops(tmp_path, model_name, flags):
    """An R1 weight of 3e38 overflows every gradient of one discriminator (R1 is in its loss only; no timestep
    weighting, so no sample's loss is multiplied by 0): its steps are
    skipped and counted per model (`bad_steps_<model>`), the denoiser keeps training, and --max_bad_steps consecutive
    bad discriminator steps stop the run; every checkpoint holds finite weights and the same discriminator."""
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train_sadm.py"), "--model", "tiny", "--resolution", "8",
           "--train_batch_size", "2", "--validation_steps", "0", "--report_to", "tensorboard", "--logging_steps", "1",
           "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "20",
           "--checkpointing_steps", "1", "--lr_warmup_steps", "0", "--max_bad_steps", "3", "--no-use_ema", *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert result.returncode != 0
    assert f"FloatingPointError: 3 consecutive non-finite {model_name} steps (--max_bad_steps 3)" in result.stderr
    assert result.stderr.count(f"Non-finite {model_name} gradient") == 3
    assert "Non-finite transformer gradient" not in result.stderr
    assert not (out / "model_index.json").exists()
    checkpoints = list_checkpoints(out)
    assert [step_of(p) for p in checkpoints] == [1, 2]  # the third bad step stopped the run before checkpoint-3
    state = json.loads((checkpoints[-1] / TRAIN_STATE_NAME).read_text())["bad_steps"]
    assert state["total"]["transformer"] == 0 and state["total"][model_name] == state["consecutive"][model_name] == 2
    disc = [load_file(str(p / model_name / "diffusion_pytorch_model.safetensors")) for p in checkpoints]
    assert all(torch.isfinite(t).all() for w in disc for t in w.values())
    weights = [k for k in disc[0] if not k.endswith(("._u", "._v"))]  # spectral-norm vectors move on every forward
    assert weights and all(torch.equal(disc[0][k], disc[1][k]) for k in weights)  # skipped steps changed nothing
    denoiser = [load_file(str(p / "transformer" / "diffusion_pytorch_model.safetensors")) for p in checkpoints]
    assert any(not torch.equal(denoiser[0][k], denoiser[1][k]) for k in denoiser[0])  # the denoiser did train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.value for e in events.Scalars(f"bad_steps_{model_name}")] == [1.0, 2.0]
    assert [e.value for e in events.Scalars("bad_steps_transformer")] == [0.0, 0.0]


@pytest.mark.slow
def test_gan_trainer_skips_non_finite_discriminator_steps_then_stops(tmp_path):
    """The GAN trainer (scripts/train_diffusion_gan.py) under the same fault: R1 weight 3e38 at every D step. The
    discriminator's steps are skipped and counted, the generator keeps training, --max_bad_steps consecutive bad
    steps stop the run with no export; every checkpoint holds finite weights and the same discriminator."""
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train_diffusion_gan.py"), "--resolution", "8",
           "--train_batch_size", "2", "--latent_dim", "8", "--generator_base_channels", "8",
           "--disc_base_channels", "8", "--disc_num_layers", "2", "--validation_steps", "0", "--report_to", "none",
           "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "20",
           "--checkpointing_steps", "1", "--lr_warmup_steps", "0", "--max_bad_steps", "3", "--no-use_ema",
           "--diffusion_gan_r1_gamma", "3e38", "--diffusion_gan_r1_interval", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert result.returncode != 0
    assert "FloatingPointError: 3 consecutive non-finite discriminator steps (--max_bad_steps 3)" in result.stderr
    assert result.stderr.count("Non-finite discriminator gradient") == 3
    assert "Non-finite generator gradient" not in result.stderr
    assert not (out / "model_index.json").exists()
    checkpoints = list_checkpoints(out)
    assert [step_of(p) for p in checkpoints] == [1, 2]
    state = json.loads((checkpoints[-1] / TRAIN_STATE_NAME).read_text())["bad_steps"]
    assert state["total"]["generator"] == 0 and state["consecutive"]["discriminator"] == 2
    disc, gen = (
        [load_file(str(p / name / "diffusion_pytorch_model.safetensors")) for p in checkpoints]
        for name in ("discriminator", "generator")
    )
    assert all(torch.isfinite(t).all() for w in disc + gen for t in w.values())
    weights = [k for k in disc[0] if not k.endswith(("._u", "._v"))]  # spectral-norm vectors move on every forward
    assert weights and all(torch.equal(disc[0][k], disc[1][k]) for k in weights)  # skipped steps changed nothing
    assert any(not torch.equal(gen[0][k], gen[1][k]) for k in gen[0])  # the generator did train


def test_bad_step_counter_counts_consecutive_steps_per_model(caplog):
    counter = BadStepCounter(max_bad_steps=2)
    counter.update("transformer", True, 0)
    counter.update("discriminator", False, 0)
    counter.update("discriminator", True, 1)  # a finite step resets the model's consecutive count
    counter.update("discriminator", False, 2)
    counter.update("transformer", False, 2)  # another model's bad step does not add to it
    assert counter.stats() == {"bad_steps_transformer": 1, "bad_steps_discriminator": 2}
    resumed = BadStepCounter(2, json.loads(json.dumps(counter.state_dict())))  # as train_state.json holds it
    assert resumed.state_dict() == counter.state_dict()
    with pytest.raises(
        FloatingPointError, match=r"2 consecutive non-finite discriminator steps \(--max_bad_steps 2\)"
    ):
        resumed.update("discriminator", False, 3)
    assert BadStepCounter(5, 3).consecutive == {"transformer": 3}  # checkpoints from before per-model counts


@pytest.fixture
def cpu_accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_step_if_finite_skips_non_finite_gradients(cpu_accelerator):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer, scheduler = cpu_accelerator.prepare(model, optimizer, scheduler)
    before = [p.detach().clone() for p in model.parameters()]
    cpu_accelerator.backward(model(torch.ones(1, 2)).sum() * float("nan"))
    finite, grad_norm = step_if_finite(cpu_accelerator, model, optimizer, 1.0, scheduler)
    assert not finite and not torch.isfinite(grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and scheduler.get_last_lr() == [0.1]
    assert all(p.grad is None for p in model.parameters())
    cpu_accelerator.backward(model(torch.ones(1, 2)).sum())
    finite, _ = step_if_finite(cpu_accelerator, model, optimizer, 1.0, scheduler)
    assert finite and not torch.equal(before[0], model.weight) and scheduler.get_last_lr() == [0.05]


# fp16 loss scaling cannot run on CPU: accelerate 1.15 makes `mixed_precision="fp16"` a silent no-op there (no autocast,
# no GradScaler; native_amp is only set for GPU-like devices). The test below gives the CPU accelerator the GradScaler
# that accelerate creates on a GPU (torch.amp.GradScaler("cpu") behaves the same), to check our step logic against it.
@pytest.fixture
def fp16_scaled_accelerator():
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None and not accelerator.native_amp  # what accelerate does on CPU
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**8), True
    yield accelerator
    AcceleratorState._reset_state(True)


def test_fp16_overflow_is_skipped_and_the_loss_scale_backs_off(fp16_scaled_accelerator):
    accelerator = fp16_scaled_accelerator
    net = torch.nn.Linear(2, 1)
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    accelerator.backward(model(torch.ones(1, 2)).sum() * 1e35)  # overflows float16: inf gradients
    finite, _ = step_if_finite(accelerator, model, optimizer, 1.0)
    assert not finite and torch.equal(before, model.weight)
    assert accelerator.scaler.get_scale() == 2.0**7  # the scaler saw the step and halved the scale
    accelerator.backward(model(torch.ones(1, 2)).sum())
    assert step_if_finite(accelerator, model, optimizer, 1.0)[0] and not torch.equal(before, model.weight)


def test_fp16_step_unscales_only_its_own_optimizer(fp16_scaled_accelerator):
    """A discriminator's gradients, accumulated over micro-batches, stay scaled while the denoiser steps."""
    accelerator = fp16_scaled_accelerator
    torch.manual_seed(0)
    net_a, net_b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opt_a, opt_b = torch.optim.SGD(net_a.parameters(), lr=0.1), torch.optim.SGD(net_b.parameters(), lr=0.1)
    net_a, opt_a, net_b, opt_b = accelerator.prepare(net_a, opt_a, net_b, opt_b)
    accelerator.backward(net_b(torch.ones(1, 2)).sum())  # b's first micro-batch: gradient 1 x scale
    scaled = net_b.weight.grad.clone()
    accelerator.backward(net_a(torch.ones(1, 2)).sum())
    assert step_if_finite(accelerator, net_a, opt_a, 1.0)[0]
    torch.testing.assert_close(net_b.weight.grad, scaled)  # accelerate's clip_grad_norm_ would have unscaled it
    torch.testing.assert_close(scaled, torch.full_like(scaled, accelerator.scaler.get_scale()))


def test_fp16_on_cpu_warns_that_it_runs_float32(tmp_path, caplog):
    AcceleratorState._reset_state(True)
    args = SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="fp16", report_to="none", ddp_timeout=60,
                           output_dir=str(tmp_path), logging_dir="logs", allow_tf32=False)  # fmt: skip
    with caplog.at_level("WARNING", logger="sadm.accelerate_setup"):
        accelerator = make_accelerator(args)
    on_cpu, scaler = accelerator.device.type == "cpu", accelerator.scaler
    AcceleratorState._reset_state(True)
    if on_cpu:
        assert scaler is None and "--mixed_precision fp16 has no effect on CPU" in caplog.text
    else:
        assert scaler is not None and "no effect" not in caplog.text


@pytest.mark.slow
def test_bf16_run_trains_in_mixed_precision_with_float32_weights(tmp_path):
    """`--mixed_precision bf16` (CPU autocast) with SADM and the Diffusion-GAN term: it trains, the saved weights are
    float32 and finite, and they differ from a float32 run's, by little (autocast was on). ~35 s."""
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    weights = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        cmd = [sys.executable, str(REPO / "scripts" / "train_sadm.py"), "--model", "tiny", "--resolution", "8",
               "--train_batch_size", "2", "--validation_steps", "0", "--report_to", "none", "--no-use_ema",
               "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "2",
               "--mixed_precision", precision, "--structure_loss_weight", "0.05", "--structure_warmup_steps", "0",
               "--structure_timestep_weighting", "none", "--gan_loss_weight", "0.05", "--gan_timestep_weighting", "none"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
        assert result.returncode == 0, result.stderr[-3000:]
        weights[precision] = {
            name: load_file(str(out / "checkpoint-2" / name / "diffusion_pytorch_model.safetensors"))
            for name in ("transformer", "discriminator", "timestep_discriminator")
        }
    diffs = {}
    for name, tensors in weights["bf16"].items():
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
        diffs[name] = max((t - weights["no"][name][k]).abs().max().item() for k, t in tensors.items())
    # Adam's first steps are ~lr·sign(g): where bf16 keeps every gradient's sign, a model's weights can stay equal
    assert max(diffs.values()) > 0 and max(diffs.values()) < 0.05, diffs


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(2, 2)
    assert_finite_parameters({"transformer": model})
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"Refusing to save: transformer.bias has non-finite values"):
        assert_finite_parameters({"transformer": model})


def test_output_dir_is_never_overwritten_by_accident(tmp_path):
    check_output_dir(str(tmp_path / "new"), resume=None, overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), resume=None, overwrite=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="--output_dir .*taken is not empty"):
        check_output_dir(str(tmp_path / "taken"), resume=None, overwrite=False)
    check_output_dir(str(tmp_path / "taken"), resume="latest", overwrite=False)
    check_output_dir(str(tmp_path / "taken"), resume=None, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_dir(str(tmp_path / "file"), resume=None, overwrite=True)
