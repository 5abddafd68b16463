"""Distributed training: the guard against silent DDP-less runs, a real 2-process gloo run, the shipped CPU config, and
gradient accumulation 2 x b == one batch of 2b for every loss."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from diffusers import DiffusionPipeline
from helpers import REPO, write_class_folder
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline

from sadm.accelerate_setup import check_distributed
from sadm.checkpointing import list_checkpoints
from sadm.diffusion_gan import DiffusionGANConfig, diffusion_gan_discriminator_loss
from sadm.losses import denoising_loss, training_target
from sadm.models.dit import build_dit
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.models.timestep_discriminator import TimestepDiscriminator
from sadm.structure import StructureConfig, structure_discriminator_loss, structure_inputs

TINY = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0",
        "--report_to", "none"]  # fmt: skip
TWO_GLOO_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip


def launch(launch_args: list[str], script: str, script_args: list[str], env: dict, timeout: int = 300):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, script, *script_args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    if "ACCELERATE_USE_CPU" not in env:  # only what the test asks for
        full_env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO))


# ------------------------------------------------------------------------------------------------------ (a) the guard
@pytest.mark.parametrize(
    "world_size, num_processes, distributed_type, error",
    [
        ("2", 1, DistributedType.NO, "WORLD_SIZE=2 processes were started but accelerate sees a single process"),
        ("1", 2, DistributedType.NO, "no distributed backend"),
        ("2", 2, DistributedType.MULTI_CPU, None),
        ("1", 1, DistributedType.NO, None),
    ],
)
def test_check_distributed(monkeypatch, world_size, num_processes, distributed_type, error):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    accelerator = SimpleNamespace(num_processes=num_processes, distributed_type=distributed_type)
    if error is None:
        check_distributed(accelerator)
    else:
        with pytest.raises(RuntimeError, match=error):
            check_distributed(accelerator)


# --------------------------------------------------------------------------------------- (b) real 2-process gloo runs
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


@pytest.mark.slow
def test_two_process_gloo_run_exports_a_loadable_pipeline(tmp_path, data_dir):
    out = tmp_path / "ddp"
    result = launch(
        TWO_GLOO_PROCESSES, str(REPO / "scripts" / "train_sadm.py"),
        [*TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "2",
         "--structure_loss_weight", "0.01", "--gan_loss_weight", "0.05", "--structure_scope", "global"],
        env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "total batch 4" in result.stdout + result.stderr  # 2 processes x batch 2
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, SADMDiTPipeline)
    assert pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 1)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()  # one RNG state per process


PROBE = """
import torch.distributed as dist
from accelerate import Accelerator
a = Accelerator()
print(f"rank {a.process_index}/{a.num_processes} {a.distributed_type} {dist.get_backend() if dist.is_initialized() else None}")
"""


@pytest.mark.slow
def test_ddp_cpu_config_starts_two_gloo_processes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    config = ["--config_file", str(REPO / "configs" / "accelerate" / "ddp_cpu.yaml")]
    result = launch(config, str(probe), [], env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0/2 DistributedType.MULTI_CPU gloo", "rank 1/2 DistributedType.MULTI_CPU gloo"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="without ACCELERATE_USE_CPU the config uses the GPUs")
def test_ddp_cpu_config_without_use_cpu_is_stopped_by_the_guard(tmp_path, data_dir):
    """accelerate does not pass `use_cpu: true` on to torchrun's processes: each would train alone, so the script stops."""
    config = ["--config_file", str(REPO / "configs" / "accelerate" / "ddp_cpu.yaml")]
    out = tmp_path / "silent"
    result = launch(
        config, str(REPO / "scripts" / "train_sadm.py"),
        [*TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "1"], env={},
    )  # fmt: skip
    assert result.returncode != 0
    assert "WORLD_SIZE=2 processes were started but accelerate sees a single process" in result.stderr
    assert not list_checkpoints(out)


# ---------------------------------------------------------------- (c) gradient accumulation 2 x b == one batch of 2b
# Tolerance: float32 on CPU, atol 1e-6 + rtol 1e-5 on every gradient entry (the two sums differ only in rounding order).
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(gradient_accumulation_steps=2, cpu=True)
    AcceleratorState._reset_state(True)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def accumulated(accelerator, model, loss_of_half) -> dict[str, torch.Tensor]:
    """Two micro-batches through one `accumulate` window each, as the training script runs them."""
    model.zero_grad(set_to_none=True)
    syncs = []
    for half in (slice(0, 4), slice(4, 8)):
        with accelerator.accumulate(model):
            accelerator.backward(loss_of_half(half).mean())  # accelerate divides by the 2 accumulation steps
            syncs.append(accelerator.sync_gradients)
    assert syncs == [False, True]
    return grads(model)


def full_batch(model, loss_of_all) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of_all().mean().backward()
    return grads(model)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    x0_hat = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 2, (n,), generator=g)
    return x0, x0_hat, labels, g


def test_accumulation_equals_a_double_batch_for_the_denoising_loss(accelerator):
    torch.manual_seed(0)
    model = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    x0, _, labels, g = batch()
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)

    def loss(part=slice(None)):
        x_t = (
            alphas_cumprod[t[part]].sqrt().view(-1, 1, 1, 1) * x0[part]
            + (1 - alphas_cumprod[t[part]]).sqrt().view(-1, 1, 1, 1) * noise[part]
        )
        prediction = model(x_t, timestep=t[part], class_labels=labels[part]).sample
        target = training_target(x0[part], noise[part], t[part], alphas_cumprod, "epsilon")
        return denoising_loss(prediction, target, t[part], alphas_cumprod, "epsilon", 5.0)  # Min-SNR-5 weights too

    assert_same(accumulated(accelerator, model, loss), full_batch(model, loss))


class FixedDiffusion(torch.nn.Module):
    """Stands in for AdaptiveDiffusion with t and ε given up front: y = √ᾱ_t·x + √(1−ᾱ_t)·ε, one (t, ε) slice per call."""

    def __init__(self, calls: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.calls = list(calls)
        self.alphas_cumprod = torch.linspace(1.0, 0.2, 51)

    def forward(self, x, generator=None):
        t, eps = self.calls.pop(0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * eps, t


@pytest.mark.parametrize("r1_gamma", [0.0, 0.1], ids=["no_r1", "r1"])
def test_accumulation_equals_a_double_batch_for_the_diffusion_gan_discriminator_loss(accelerator, r1_gamma):
    torch.manual_seed(0)
    disc = TimestepDiscriminator(in_channels=1, sample_size=8, base_channels=8, num_classes=2, max_timesteps=50)
    config = DiffusionGANConfig(weight=0.05, r1_gamma=r1_gamma, r1_interval=1, class_conditional_disc=True)
    x0, x0_hat, labels, g = batch(1)
    t_real, t_fake = torch.randint(0, 51, (8,), generator=g), torch.randint(0, 51, (8,), generator=g)
    eps_real, eps_fake = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)

    def loss(part=slice(None)):  # the discriminator's call order: the real batch, then the fake one
        diffusion = FixedDiffusion([(t_real[part], eps_real[part]), (t_fake[part], eps_fake[part])])
        value, _, _ = diffusion_gan_discriminator_loss(
            disc, diffusion, x0[part], x0_hat[part], labels[part], config, 0
        )
        return value

    assert_same(accumulated(accelerator, disc, loss), full_batch(disc, loss))


def test_accumulation_of_the_structure_discriminator_loss_averages_micro_batch_losses(accelerator):
    """SADM's relations are taken within a batch, so 2 x b is not one batch of 2b by design: accumulation gives the
    mean of the micro-batch losses (checked exactly), and the double-batch loss differs (checked too)."""
    torch.manual_seed(0)
    disc = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16, spectral_norm=False)
    config = StructureConfig(weight=0.05, timestep_weighting="none", warmup_steps=0)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    x0, x0_hat, _, g = batch(2)
    t = torch.randint(0, 1000, (8,), generator=g)

    def loss(part=slice(None)):
        return structure_discriminator_loss(
            disc, structure_inputs(x0[part], x0_hat[part], t[part], alphas_cumprod, config), config
        )[0]

    def mean_of_halves():
        return (loss(slice(0, 4)).mean() + loss(slice(4, 8)).mean()) / 2

    accumulated_grads = accumulated(accelerator, disc, loss)
    assert_same(accumulated_grads, full_batch(disc, mean_of_halves))
    double = full_batch(disc, loss)
    assert any(not torch.allclose(accumulated_grads[n], double[n], atol=ATOL, rtol=RTOL) for n in double)


def test_cpu_launcher_with_several_processes_warns(monkeypatch, caplog):
    """`accelerate launch --cpu --num_processes 2` (no MPI) starts one process with MASTER_ADDR and no WORLD_SIZE."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level("WARNING", logger="sadm.accelerate_setup"):
        check_distributed(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    assert "started ONE" in caplog.text
    caplog.clear()
    monkeypatch.delenv("MASTER_ADDR")  # a plain single-process run says nothing
    with caplog.at_level("WARNING", logger="sadm.accelerate_setup"):
        check_distributed(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    assert caplog.text == ""


# ------------------------------------------------------------------------------- (d) the shipped accelerate configs
@pytest.mark.parametrize(
    "name, distributed_type",
    [("ddp_cpu", "MULTI_GPU"), ("ddp_gpu", "MULTI_GPU"), ("multinode_ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
     ("deepspeed_zero2", "DEEPSPEED")],
)  # fmt: skip
def test_accelerate_configs_are_valid_for_launch(name, distributed_type):
    """Each file loads with accelerate's config loader and passes `accelerate launch --config_file`'s validation (the
    step before any process starts); what the scripts rely on is checked too."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = str(REPO / "configs" / "accelerate" / f"{name}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type == distributed_type
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "train.py"]))
    assert args.num_processes == config.num_processes >= 2
    assert (args.use_fsdp, args.use_deepspeed) == (distributed_type == "FSDP", distributed_type == "DEEPSPEED")
    if distributed_type == "FSDP":  # the wrap policy names a block class the DiT really has
        block = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        dit = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2)
        assert block in {type(m).__name__ for m in dit.modules()}
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the save hooks need full weights
    if distributed_type == "DEEPSPEED":  # DeepSpeed clips and accumulates itself: the values must match the defaults
        assert config.deepspeed_config["gradient_clipping"] == 1.0  # --max_grad_norm's default
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
