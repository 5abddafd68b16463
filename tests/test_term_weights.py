"""λ of the adversarial terms: start step, warm-up, and the gradient-norm rule (`sadm.term_weights`), and the
Diffusion-GAN term of the DiT trainer honouring them in the real train step."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from test_adversarial_step import batch, make_step

from sadm.diffusion_gan import DiffusionGANConfig
from sadm.structure import StructureConfig
from sadm.term_weights import gradient_norm_ratio, gradient_ratio_weight, ramped_weight


def test_ramped_weight_is_zero_before_the_start_then_linear_to_the_weight():
    assert ramped_weight(99, 0.5, warmup_steps=100, start_step=100) == 0.0
    assert ramped_weight(100, 0.5, warmup_steps=100, start_step=100) == 0.0
    assert ramped_weight(150, 0.5, warmup_steps=100, start_step=100) == pytest.approx(0.25)
    assert ramped_weight(10_000, 0.5, warmup_steps=100, start_step=100) == 0.5
    assert ramped_weight(100, 0.5, warmup_steps=0, start_step=100) == 0.5  # no warm-up: full weight at the start
    assert ramped_weight(0, 0.5, warmup_steps=0) == 0.5
    with pytest.raises(ValueError, match="step"):
        ramped_weight(-1, 0.5, warmup_steps=0)


def test_the_gradient_ratio_weight_gives_the_term_that_share_of_the_reference_gradient():
    torch.manual_seed(0)
    output = torch.randn(4, 3, requires_grad=True)
    loss_ref = (output**2).sum()  # gradient 2·output
    loss_term = (output * torch.randn(4, 3)).sum() * 1e-3  # a weak term
    lam, ratio = gradient_ratio_weight(loss_ref, loss_term, output, grad_ratio=0.1, cap=1e6)
    assert ratio == pytest.approx(gradient_norm_ratio(loss_ref, loss_term, output).item())
    (g_ref,) = torch.autograd.grad(loss_ref, output, retain_graph=True)
    (g_term,) = torch.autograd.grad(lam * loss_term, output, retain_graph=True)
    assert g_term.norm() / g_ref.norm() == pytest.approx(0.1, rel=1e-5)
    capped, _ = gradient_ratio_weight(loss_ref, loss_term, output, grad_ratio=0.1, cap=2.0)
    assert capped == 2.0
    unused = torch.zeros((), requires_grad=True) * 1.0  # a term that does not depend on the output: λ = 0, no error
    lam0, ratio0 = gradient_ratio_weight(loss_ref, unused, output, grad_ratio=0.1, cap=1e6)
    assert lam0 == 0 and ratio0 == 0


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def denoiser_grads(step, step_index):
    """The denoiser's gradient of one train step (taken before its optimizer steps, via a hook on the optimizer)."""
    grads = {}

    def grab(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[id(p)] = p.grad.detach().clone()

    handle = step.optimizer.optimizer.register_step_pre_hook(grab)
    step(batch(), step_index)
    handle.remove()
    return grads, step.stats


def test_the_gan_term_adds_nothing_before_its_start_step_and_scales_by_the_gradient_rule_after(accelerator):
    struct_off = StructureConfig(weight=1e-12, warmup_steps=10_000)  # present but λ ≈ 0 at these steps
    gan_cfg = DiffusionGANConfig(weight=10.0, start_step=5, timestep_weighting="none", grad_ratio=0.2)
    step, _ = make_step(accelerator, struct_off, gan_cfg)
    _, stats = denoiser_grads(step, 4)
    assert stats["gan_lambda"] == 0.0 and "gan_grad_ratio" not in stats
    assert torch.isclose(stats["loss"], stats["loss_dsm"], rtol=0, atol=1e-6)

    step, _ = make_step(accelerator, struct_off, gan_cfg)
    _, stats = denoiser_grads(step, 5 + 1)  # after the start, no warm-up: the gradient rule sets λ_adv
    lam, ratio = stats["gan_lambda"], stats["gan_grad_ratio"]
    assert 0 < lam <= 10.0 and ratio > 0
    assert lam == pytest.approx(min(10.0, 0.2 / ratio.item()), rel=1e-5)
    assert stats["loss"] - stats["loss_dsm"] == pytest.approx((lam * stats["loss_gan_g"]).item(), abs=1e-5)


def test_a_discriminator_lr_scheduler_steps_with_each_discriminator_step(accelerator):
    from diffusers.optimization import get_scheduler

    from sadm.step import DenoiserTrainStep

    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000)
    gan_cfg = DiffusionGANConfig(weight=0.1, timestep_weighting="none")
    step, _ = make_step(accelerator, struct_cfg, gan_cfg)
    assert isinstance(step, DenoiserTrainStep)
    term = step.terms[1]
    term.optimizer = torch.optim.AdamW(term.unwrapped.parameters(), lr=1e-3)  # a fresh one, prepared with a schedule
    term.prepare(get_scheduler("linear", optimizer=term.optimizer, num_warmup_steps=2, num_training_steps=10))
    lrs = []
    for i in range(3):
        step(batch(), i)
        lrs.append(term.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3 * 7 / 8])  # warm-up 1/2, 2/2, then linear decay over 8 steps
    assert step.terms[0].lr_scheduler is None  # the other term keeps its constant LR


def test_the_step_logs_each_terms_push_relative_to_the_denoising_loss(accelerator):
    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000)
    gan_cfg = DiffusionGANConfig(weight=10.0, timestep_weighting="none", grad_ratio=0.2)
    step, _ = make_step(accelerator, struct_cfg, gan_cfg)
    step.grad_ratio_steps = 2
    step(batch(), 0)
    assert "grad_ratio_structure" not in step.stats  # measured on steps 1, 3, ... (logged after step 2, 4, ...)
    step(batch(), 1)
    assert step.stats["grad_ratio_structure"] > 0
    # under the gradient rule the weighted GAN term pushes with exactly grad_ratio (λ_adv is below its cap here)
    assert step.stats["gan_lambda"] < 10.0
    assert step.stats["grad_ratio_diffusion_gan"] == pytest.approx(0.2, rel=1e-4)
