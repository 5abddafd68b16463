"""Runs that survive a cluster: SIGTERM/SIGUSR1 checkpoint and stop at an optimizer step (and the resume is exact),
incomplete checkpoints are detected by their manifest, and a full disk keeps the previous checkpoint."""

import errno
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import REPO, write_class_folder
from safetensors.torch import load_file

from sadm.checkpointing import (
    MANIFEST_NAME,
    TRAIN_STATE_NAME,
    checkpoint_problem,
    list_checkpoints,
    resolve_resume_path,
    save_checkpoint,
    write_manifest,
)
from sadm.preemption import PreemptionHandler


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sigterm_at(step: int):
    """An `on_step` callback: the process sends itself SIGTERM after optimizer step `step`."""
    return lambda global_step: os.kill(os.getpid(), signal.SIGTERM) if global_step == step else None


def run_in_process(module, argv: list[str], **kwargs) -> None:
    AcceleratorState._reset_state(True)
    try:
        module.main(module.parse_args(argv), **kwargs)
    finally:
        AcceleratorState._reset_state(True)


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a_dir, b_dir, subs):
    for sub in subs:
        a, b = weights(a_dir / sub), weights(b_dir / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{sub} differs"


# ----------------------------------------------------------------------------------------------------------- handler
def test_handler_records_signals_ignores_repeats_and_restores_the_previous_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (e.g. forwarded by a launcher) must not kill the run
        time.sleep(0.01)
        assert handler.should_stop() and handler.signal_name == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in before} == before

    with pytest.raises(RuntimeError, match="inside"):  # restored on an exception too
        with PreemptionHandler():
            raise RuntimeError("inside")
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---------------------------------------------------------------------------------------------- stop and exact resume
SADM = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0", "--report_to",
        "none", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4", "--use_ema", "--random_flip",
        "--structure_loss_weight", "0.05", "--structure_warmup_steps", "0", "--structure_t_threshold", "1000",
        "--gan_loss_weight", "0.05", "--max_train_steps", "5"]  # fmt: skip
GAN = ["--resolution", "8", "--train_batch_size", "2", "--latent_dim", "8", "--generator_base_channels", "8",
       "--disc_base_channels", "8", "--disc_num_layers", "2", "--validation_steps", "0", "--report_to", "none",
       "--gradient_accumulation_steps", "2", "--diffusion_gan_disc_update_ratio", "2", "--use_ema",
       "--checkpointing_steps", "4", "--diffusion_gan_ada_interval", "1", "--diffusion_gan_ada_kimg", "0.01",
       "--diffusion_gan_target", "-0.5", "--max_train_steps", "5"]  # fmt: skip
CASES = {
    "train_sadm": (SADM, ["transformer", "discriminator", "timestep_discriminator"]),
    "train_diffusion_gan": (GAN, ["gan", "discriminator", "checkpoint-5/generator", "checkpoint-5/generator_ema"]),
}


@pytest.mark.parametrize("script", list(CASES))
def test_sigterm_checkpoints_at_the_step_and_the_resume_equals_an_uninterrupted_run(tmp_path, data_dir, script):
    module = load_script(script)
    flags, subs = CASES[script]
    common = [*flags, "--train_data_dir", str(data_dir)]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_in_process(module, [*common, "--output_dir", str(straight)])

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:  # what the script's __main__ does
        run_in_process(module, [*common, "--output_dir", str(stopped)], on_step=sigterm_at(2), preemption=handler)
    assert signal.getsignal(signal.SIGTERM) == before
    # stopped at step 2 (not a --checkpointing_steps multiple) with a complete checkpoint there, and no export
    assert [p.name for p in list_checkpoints(stopped)] == ["checkpoint-2"]
    assert (stopped / "checkpoint-2" / MANIFEST_NAME).exists()
    assert not (stopped / "model_index.json").exists()

    run_in_process(module, [*common, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"])
    assert (stopped / "model_index.json").exists()
    assert_same_weights(straight, stopped, subs)


@pytest.mark.slow
def test_the_script_stops_cleanly_on_sigusr1_from_outside(tmp_path, data_dir):
    """The installed entry point: a signal from outside the process, exit code 0, the message, a resumable checkpoint."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [sys.executable, str(REPO / "scripts" / "train_sadm.py"), *SADM[:-2], "--max_train_steps", "100000",
           "--checkpointing_steps", "100000", "--train_data_dir", str(data_dir), "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    try:
        deadline = time.monotonic() + 120
        while "starting at step" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    (checkpoint,) = list_checkpoints(out)
    assert f"Stopped by SIGUSR1 at step {checkpoint.name.split('-')[1]}" in text and "--resume_from_checkpoint" in text
    assert checkpoint_problem(checkpoint) is None and not (out / "model_index.json").exists()


# ------------------------------------------------------------------------------------------- incomplete checkpoints
def fake_checkpoint(root, step: int, manifest: bool = True):
    path = root / f"checkpoint-{step}"
    (path / "transformer").mkdir(parents=True)
    (path / "transformer" / "weights.safetensors").write_bytes(b"w" * 100)
    (path / "optimizer.bin").write_bytes(b"o" * 50)
    (path / TRAIN_STATE_NAME).write_text(json.dumps({"global_step": step}))
    if manifest:
        write_manifest(path)
    return path


def test_a_truncated_or_incomplete_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    legacy = fake_checkpoint(tmp_path, 1, manifest=False)  # written before the manifest existed: still complete
    good = fake_checkpoint(tmp_path, 2)
    truncated = fake_checkpoint(tmp_path, 3)
    with open(truncated / "transformer" / "weights.safetensors", "r+b") as f:
        f.truncate(60)
    missing = fake_checkpoint(tmp_path, 4)
    (missing / "optimizer.bin").unlink()
    assert checkpoint_problem(legacy) is None and checkpoint_problem(good) is None
    assert list_checkpoints(tmp_path) == [legacy, good]

    with caplog.at_level(logging.WARNING, logger="sadm.checkpointing"):
        assert resolve_resume_path(str(tmp_path), "latest") == good
    assert "checkpoint-4/optimizer.bin is missing" in caplog.text
    assert "weights.safetensors has 60 bytes, the manifest says 100" in caplog.text

    with pytest.raises(FileNotFoundError, match=r"checkpoint-3 is not a complete checkpoint: .*weights.safetensors"):
        resolve_resume_path(str(tmp_path), str(truncated))
    with pytest.raises(FileNotFoundError, match="optimizer.bin is missing"):
        resolve_resume_path(str(tmp_path), str(missing))
    assert resolve_resume_path(str(tmp_path), str(legacy)) == legacy


# ------------------------------------------------------------------------------------------------------- full disk
@pytest.fixture
def accelerator_with_model():
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator.prepare(model, optimizer)
    yield accelerator
    AcceleratorState._reset_state(True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_one(tmp_path, accelerator_with_model):
    accelerator = accelerator_with_model
    first = save_checkpoint(accelerator, str(tmp_path), 1, {}, total_limit=1)
    contents = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    real_save_state = accelerator.save_state

    def save_state_until_the_disk_is_full(output_dir):
        real_save_state(output_dir)
        with open(os.path.join(output_dir, "half_written.bin"), "wb") as f:
            f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    accelerator.save_state = save_state_until_the_disk_is_full
    with pytest.raises(OSError, match=rf"--output_dir {tmp_path} .* MiB free.*checkpoint-1 is intact") as raised:
        save_checkpoint(accelerator, str(tmp_path), 2, {}, total_limit=1)
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # partial folder gone, nothing pruned
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == contents
    assert resolve_resume_path(str(tmp_path), "latest") == first

    accelerator.save_state = real_save_state  # space freed: the next checkpoint is written and then prunes the old one
    assert save_checkpoint(accelerator, str(tmp_path), 2, {}, total_limit=1).name == "checkpoint-2"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]


@pytest.mark.slow
def test_all_processes_agree_to_stop_when_one_receives_the_signal():
    """Two DDP processes over gloo; only rank 1 is signalled, both stop at the same step."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "tests" / "ddp_preemption_worker.py")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 stopped at step 3 (SIGTERM)" in result.stdout
    assert "rank 1 stopped at step 3 (SIGTERM)" in result.stdout


def test_dataloader_workers_survive_the_clusters_sigterm():
    """SLURM signals every process: a worker must not die of it (the main process checkpoints instead)."""
    import os
    import signal

    from sadm.data import make_dataloader

    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, index):
            return torch.tensor([index * index])

    loader = make_dataloader(Squares(), 4, seed=0, num_workers=1, collate_fn=torch.utils.data.default_collate)
    iterator = iter(loader)
    seen = [next(iterator)]
    for worker in iterator._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR1)
    seen += list(iterator)
    assert sorted(torch.cat(seen).flatten().tolist()) == [i * i for i in range(40)]
