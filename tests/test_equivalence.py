"""The update does not depend on how the global batch is split: 2 processes x b == 1 process x 2b, and gradient
accumulation 2 x b == 1 x 2b, for the denoiser and both discriminators, with the real training script; and SADM's
global structure scope on 2 processes == the local scope on 1 process (losses and gradients).

The noise, timesteps, label dropout and the Diffusion-GAN term's draws come from `--per_sample_noise` (generators seeded
by the seed and each sample's key), so every configuration draws the same values for the same sample: the comparison
is exact in intent, and the differences left are float32 rounding (batch 2 vs 4 changes the reduction order of the
matmuls). `sadm.randomness.sample_generators` and the list-of-generators path of `AdaptiveDiffusion` are unit-tested here
too.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, run_script, write_class_folder
from safetensors.torch import load_file
from test_distributed import TWO_GLOO_PROCESSES, launch

from sadm.diffusion_augment import AdaptiveDiffusion
from sadm.randomness import draw_timesteps, draw_uniform, sample_generators

MODELS = ("transformer", "discriminator", "timestep_discriminator")
# 8 images, global batch 4: two optimizer steps (checkpoint-1 and checkpoint-2). Adam's first steps are ~lr·sign(g):
# a rounding-level difference in a gradient entry near 0 would become an O(lr) weight difference, so ε = 1 makes the
# update ≈ lr·g/(|g| + 1) and the weight difference bounds lr × the gradient difference (measured ≤ 1.5e-8 with ε = 1;
# with the default ε = 1e-8 the same runs differ by up to 2e-5 in the denoiser).
COMMON = [
    "--model", "tiny", "--resolution", "8", "--validation_steps", "0", "--report_to", "none", "--no-use_ema",
    "--per_sample_noise", "--lr_warmup_steps", "0", "--max_train_steps", "2", "--checkpointing_steps", "1",
    "--logging_steps", "1000", "--adam_epsilon", "1", "--disc_adam_epsilon", "1", "--disc_learning_rate", "1e-2",
    "--gan_loss_weight", "0.05", "--gan_timestep_weighting", "none",  # every sample feeds the GAN term
]  # fmt: skip
SADM = ["--structure_loss_weight", "0.05", "--structure_warmup_steps", "0", "--structure_timestep_weighting", "none"]
WEIGHTS_ATOL, WEIGHTS_RTOL = 1e-7, 1e-6  # float32 weights after two steps (lr 1e-3 and 1e-2 for the discriminators)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


def weights(out, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step}" / name / "diffusion_pytorch_model.safetensors"))


def assert_same_updates(a, b, models) -> None:
    for name in models:
        wa, wb = weights(a, 2, name), weights(b, 2, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=WEIGHTS_ATOL, rtol=WEIGHTS_RTOL, msg=f"{name}.{key}")
        # the test can see a difference: the second step moved the weights far more than the tolerance
        moved = max((wa[k] - weights(a, 1, name)[k]).abs().max().item() for k in wa if wa[k].is_floating_point())
        assert moved > 100 * WEIGHTS_ATOL, f"{name} barely moved ({moved})"


def one_process(out, data_dir, *args) -> None:
    result = run_script("train_sadm.py", *COMMON, "--train_data_dir", str(data_dir), "--output_dir", str(out), *args,
                        launch=False, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_double_batch(tmp_path, data_dir):
    """DSM + SADM (global scope on 2 processes, local on 1) + Diffusion-GAN term: all three models, ~50 s."""
    one_process(tmp_path / "one", data_dir, *SADM, "--structure_scope", "local", "--train_batch_size", "4")
    result = launch(
        TWO_GLOO_PROCESSES, str(REPO / "scripts" / "train_sadm.py"),
        [*COMMON, *SADM, "--structure_scope", "global", "--train_batch_size", "2", "--train_data_dir", str(data_dir),
         "--output_dir", str(tmp_path / "two")],
        env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total batch 4" in result.stdout + result.stderr
    assert_same_updates(tmp_path / "one", tmp_path / "two", MODELS)


@pytest.mark.slow
def test_accumulation_equals_the_double_batch(tmp_path, data_dir):
    """DSM + Diffusion-GAN term, 2 micro-batches of 2 == one batch of 4 (~40 s). SADM's relations are taken within a
    micro-batch, so its accumulation is the mean of micro-batch losses by design (tests/test_distributed.py)."""
    one_process(tmp_path / "one", data_dir, "--train_batch_size", "4")
    one_process(tmp_path / "accum", data_dir, "--train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert_same_updates(tmp_path / "one", tmp_path / "accum", ("transformer", "timestep_discriminator"))


# Global scope on 2 processes == local scope on 1 (tests/ddp_structure_worker.py): float32, batch 2 vs 4 changes the
# DiT's reduction order, and x̂₀ = (x_t − √(1−ᾱ)·ε̂)/√ᾱ amplifies it up to 1/√ᾱ = 10x here (measured ≤ 6e-7).
STRUCT_ATOL, STRUCT_RTOL = 2e-6, 1e-5


@pytest.mark.slow
def test_global_structure_scope_on_two_processes_equals_local_on_one(tmp_path):
    worker = str(REPO / "tests" / "ddp_structure_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    local = subprocess.run([sys.executable, worker, str(tmp_path / "local.pt"), "local"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=str(REPO))  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    two = launch(TWO_GLOO_PROCESSES, worker, [str(tmp_path / "global.pt"), "global"], env={"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "local.pt"), torch.load(tmp_path / "global.pt")
    for key in ("loss_denoiser", "loss_discriminator"):  # per sample, over the whole batch of 4
        assert a[key].shape == (4,) and a[key].abs().min() > 1e-3
        torch.testing.assert_close(a[key], b[key], atol=STRUCT_ATOL, rtol=STRUCT_RTOL)
    for key in ("grads_denoiser", "grads_discriminator"):
        assert a[key].keys() == b[key].keys() and a[key]
        assert sum(g.count_nonzero() for g in a[key].values()) > 0
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=STRUCT_ATOL, rtol=STRUCT_RTOL, msg=name)


# ------------------------------------------------------------------------------------- per-sample draws (fast, in-process)
def test_per_sample_draws_do_not_depend_on_the_batch_split():
    keys = torch.tensor([7, 3, 12, 40])

    def draws(part):
        rngs = sample_generators(0, keys[part], stream=0)
        return draw_uniform(len(rngs), "cpu", rngs), draw_timesteps(len(rngs), 1000, "cpu", rngs)

    whole, halves = draws(slice(None)), [draws(slice(0, 2)), draws(slice(2, 4))]
    for i in range(2):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    other_stream = draw_uniform(4, "cpu", sample_generators(0, keys, stream=1))
    other_seed = draw_uniform(4, "cpu", sample_generators(1, keys, stream=0))
    assert not torch.equal(whole[0], other_stream) and not torch.equal(whole[0], other_seed)


def test_adaptive_diffusion_with_one_generator_per_sample():
    diffusion = AdaptiveDiffusion(t_min=5, t_max=50, initial_p=1.0, clean_fraction=0.0)
    x = torch.randn(4, 1, 8, 8)
    keys = torch.tensor([0, 1, 2, 3])
    y, t = diffusion(x, generator=sample_generators(0, keys, stream=2))
    y_a, t_a = diffusion(x[:2], generator=sample_generators(0, keys[:2], stream=2))
    y_b, t_b = diffusion(x[2:], generator=sample_generators(0, keys[2:], stream=2))
    assert torch.equal(t, torch.cat([t_a, t_b])) and torch.equal(y, torch.cat([y_a, y_b]))
    with pytest.raises(ValueError, match="3 generators for a batch of 4"):
        diffusion(x, generator=sample_generators(0, keys[:3], stream=2))
