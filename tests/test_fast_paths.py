"""Fast paths give the same numbers as the plain path (CPU, tiny seeded models; tolerances stated per test)."""

import argparse

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from helpers import adamw_after_steps

from sadm.accelerate_setup import make_accelerator
from sadm.cli import adamw_implementation, add_training_args, check_optimizer_args
from sadm.data import make_dataloader
from sadm.losses import denoising_loss
from sadm.losses.structure import relation_entropy, structure_loss
from sadm.models.dit import build_dit, float32_norms


def dit_batch(seed: int = 0, batch: int = 4, channels: int = 4, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, channels, size, size, generator=generator)  # [B, C, H, W]
    noise = torch.randn(batch, channels, size, size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return x_t, noise, timesteps, labels


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x_t, noise, timesteps, labels = batch
    model.zero_grad(set_to_none=True)
    prediction = model(x_t, timestep=timesteps, class_labels=labels).sample
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    loss = denoising_loss(prediction, noise, timesteps, alphas_cumprod, "epsilon").mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(reference, other, atol: float) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=atol, msg=name)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = dit_batch()
    plain = build_dit("tiny", 8, 4, 10, seed=0).train()
    checkpointed = build_dit("tiny", 8, 4, 10, seed=0).train()
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    # recomputation repeats the same float32 ops: equal to rounding (1e-6)
    assert_same_loss_and_grads(loss_and_grads(plain, batch), loss_and_grads(checkpointed, batch), atol=1e-6)


def test_sdpa_attention_equals_the_eager_attention_processor():
    batch = dit_batch()
    sdpa = build_dit("tiny", 8, 4, 10, seed=0).train()
    layers = [m for m in sdpa.modules() if isinstance(m, Attention)]
    assert len(layers) == 4 and all(isinstance(m.processor, AttnProcessor2_0) for m in layers)  # default: SDPA
    eager = build_dit("tiny", 8, 4, 10, seed=0).train()
    for module in eager.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())  # softmax(QKᵀ/√d)V written out
    assert_same_loss_and_grads(loss_and_grads(eager, batch), loss_and_grads(sdpa, batch), atol=1e-5)


def test_allow_tf32_sets_the_cuda_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        make_accelerator(parser.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"]))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        args = parser.parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--allow_tf32"])
        make_accelerator(args)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_autocast_keeps_relation_maths_in_float32():
    generator = torch.Generator().manual_seed(0)
    z_real, z_fake = torch.randn(2, 8, 16, generator=generator).unbind(0)  # [N, d] each
    reference = structure_loss(z_real, z_fake), relation_entropy(z_fake)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = structure_loss(z_real, z_fake), relation_entropy(z_fake)
    for a, b in zip(reference, autocast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)  # bf16 matmuls would be off by ~1e-2 at τ = 0.1


def test_float32_norms_under_bf16_autocast():
    model = float32_norms(build_dit("tiny", 8, 4, 10, seed=0))
    float32_norms(model)  # idempotent: wrapping twice changes nothing
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    x_t, _, timesteps, labels = dit_batch()
    reference = model(x_t, timestep=timesteps, class_labels=labels).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.float32
        output = model(x_t, timestep=timesteps, class_labels=labels).sample
        loss = denoising_loss(output, reference, timesteps, torch.linspace(0.999, 0.01, 1000), "epsilon")
    assert loss.dtype == torch.float32  # the denoising loss is computed in float32 too
    # bf16 matmuls keep ~3 significant digits: outputs agree to 3% of their scale
    torch.testing.assert_close(output.float(), reference, rtol=0, atol=0.03 * reference.abs().max().item())
    assert torch.equal(model(x_t, timestep=timesteps, class_labels=labels).sample, reference)  # fp32 path unchanged


@pytest.mark.parametrize("implementation", [["--adam_foreach"], ["--adam_fused"]], ids=["foreach", "fused"])
def test_foreach_and_fused_adamw_equal_the_default(tmp_path, implementation):
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path), *implementation])
    kwargs = adamw_implementation(args)
    assert kwargs == ({"foreach": True} if implementation == ["--adam_foreach"] else {"fused": True})
    initial = [p.detach().clone() for p in build_dit("tiny", 8, 4, 10, seed=0).parameters()]
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) for p in initial] for _ in range(3)]  # fixed, 3 steps
    # torch's for-loop reference, then the flag's implementation
    results = [adamw_after_steps(initial, gradients, **extra) for extra in ({"foreach": False}, kwargs)]
    moved = (results[0] - torch.cat([p.flatten() for p in initial])).abs()
    assert (moved > 0).float().mean() > 0.99 and moved.mean() > 1e-3  # the 3 steps (each ~lr) moved the weights
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-7)  # same maths, rounding only (≪ lr)


def test_adamw_flags_exclude_each_other(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path), "--adam_fused", "--adam_foreach"])
    with pytest.raises(SystemExit):
        check_optimizer_args(args, parser)
    assert adamw_implementation(parser.parse_args(["--output_dir", str(tmp_path)])) == {}


def test_loading_is_pinned_and_non_blocking_exactly_when_cuda_is_there(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    accelerator = make_accelerator(parser.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"]))
    assert accelerator.dataloader_config.non_blocking == torch.cuda.is_available()
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    loader = make_dataloader(dataset, 2, 0, 0, None)
    assert loader.pin_memory == torch.cuda.is_available()


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~2 minutes here
def test_torch_compile_gives_the_same_loss_and_gradients():
    batch = dit_batch()
    eager = build_dit("tiny", 8, 4, 10, seed=0).train()
    compiled = build_dit("tiny", 8, 4, 10, seed=0).train()
    compiled.compile()  # in place, as train_sadm.py --torch_compile: same parameters and state dict keys
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    # inductor fuses and reorders float32 reductions: equal to 1e-5
    assert_same_loss_and_grads(loss_and_grads(eager, batch), loss_and_grads(compiled, batch), atol=1e-5)
