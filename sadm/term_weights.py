"""The weight λ of an adversarial term in the denoiser's loss: a start step with a linear warm-up, and the adaptive λ
from the ratio of gradient norms (Esser et al. 2021, eq. 7, the rule of diffusers' VQGAN example).

Both terms of `scripts/train_sadm.py` use them (`StructureConfig` and `DiffusionGANConfig` hold the options):

    λ(step) = weight · clip((step − start_step) / warmup_steps, 0, 1)           (weight from start_step when warmup = 0)
    λ_adaptive = min(weight, grad_ratio · ‖∂L_DSM/∂out‖ / ‖∂L_term/∂out‖) · λ(step) / weight

The gradients are taken at the denoiser's output rather than at its last layer's weights (VQGAN): the output is where
both losses meet, and the gradient there costs one backward through the loss heads, not through the network.
"""

from __future__ import annotations

import torch


def ramped_weight(step: int, weight: float, warmup_steps: int, start_step: int = 0) -> float:
    """λ at a global step: 0 before `start_step`, then a linear ramp to `weight` over `warmup_steps` (0 at the start
    step itself unless `warmup_steps == 0`)."""
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if step < start_step:
        return 0.0
    if warmup_steps == 0:
        return weight
    return weight * min(1.0, (step - start_step) / warmup_steps)


def gradient_norm_ratio(loss_ref: torch.Tensor, loss_term: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """‖∂loss_term/∂output‖ / ‖∂loss_ref/∂output‖ as a detached 0-d tensor (no host sync); 0 when the term does not
    depend on `output` (e.g. no active sample in the batch). Both graphs are kept for the caller's backward."""
    (grad_ref,) = torch.autograd.grad(loss_ref, output, retain_graph=True)
    (grad_term,) = torch.autograd.grad(loss_term, output, retain_graph=True, allow_unused=True)
    if grad_term is None:
        return torch.zeros((), device=output.device)
    return (grad_term.norm() / (grad_ref.norm() + 1e-12)).detach()


def gradient_ratio_weight(
    loss_ref: torch.Tensor, loss_term: torch.Tensor, output: torch.Tensor, grad_ratio: float, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive λ = min(cap, grad_ratio / r) with r = [`gradient_norm_ratio`], so that the term pushes the output
    with `grad_ratio` times the strength of `loss_ref`; returns `(λ, r)`, detached 0-d tensors (λ = 0 when r = 0)."""
    ratio = gradient_norm_ratio(loss_ref, loss_term, output)
    lam = torch.where(ratio > 0, grad_ratio / ratio.clamp(min=1e-12), torch.zeros_like(ratio)).clamp(max=cap)
    return lam, ratio
