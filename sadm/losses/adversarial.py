"""GAN losses as pure functions of raw logits. Each returns a per-sample loss `[B]`; the caller weights and reduces.

logistic: the non-saturating loss of Goodfellow et al. 2014 as in StyleGAN2 (softplus on raw logits);
hinge: Lim & Ye 2017, as in ProjectedGAN. R1: Mescheder et al. 2018, ‖∇_x D(x)‖² on real inputs (Diffusion-GAN: w.r.t.
the clean x, through the noising in front of D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_LOSS_TYPES = ("logistic", "hinge")


# Diffusion-GAN / StyleGAN2 `Gmain` (logistic), ProjectedGAN generator loss (hinge).
def gan_generator_loss(fake_logits: torch.Tensor, loss_type: str = "logistic") -> torch.Tensor:
    """Generator loss on D's logits for generated samples, `[B]`.

    logistic: softplus(−D(y_g)) = −log σ(D(y_g))   (non-saturating)
    hinge:    −D(y_g)
    """
    if loss_type == "logistic":
        return F.softplus(-fake_logits)
    elif loss_type == "hinge":
        return -fake_logits
    else:
        raise ValueError(f"loss_type '{loss_type}' is not one of {', '.join(GAN_LOSS_TYPES)}.")


# Diffusion-GAN / StyleGAN2 `Dmain` (logistic), ProjectedGAN discriminator loss (hinge).
def gan_discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, loss_type: str = "logistic"
) -> torch.Tensor:
    """Discriminator loss, `[B]` (real and fake batches of the same size, paired by index only for the sum).

    logistic: softplus(D(y_g)) + softplus(−D(y)) = −log(1 − σ(D(y_g))) − log σ(D(y))
    hinge:    relu(1 − D(y)) + relu(1 + D(y_g))
    """
    if real_logits.shape != fake_logits.shape:
        raise ValueError(
            f"real_logits {tuple(real_logits.shape)} and fake_logits {tuple(fake_logits.shape)} must match in shape."
        )
    if loss_type == "logistic":
        return F.softplus(fake_logits) + F.softplus(-real_logits)
    elif loss_type == "hinge":
        return F.relu(1 - real_logits) + F.relu(1 + fake_logits)
    else:
        raise ValueError(f"loss_type '{loss_type}' is not one of {', '.join(GAN_LOSS_TYPES)}.")


# R1 regulariser (Mescheder et al. 2018, eq. 9), as StyleGAN2's `Dr1` (without the γ/2 factor).
def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """‖∇_x D(x)‖² per sample, `[B]`, differentiable (create_graph=True) so it can be minimised.

    `real_inputs` must have `requires_grad=True` and be the tensor D was called on or one upstream of it in the graph:
    Diffusion-GAN passes the clean reals x with the noising y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε in between, which gives
    ‖∇_x D(y(x))‖² = ᾱ_t·‖∇_y D(y)‖² per sample (the official code's penalty).
    """
    if not real_inputs.requires_grad:
        raise ValueError(
            "real_inputs must require grad (call .detach().requires_grad_(True) before the noising and D)."
        )
    (grad,) = torch.autograd.grad(outputs=real_logits.sum(), inputs=real_inputs, create_graph=True)
    return grad.square().flatten(1).sum(dim=1)  # [B, ...] -> [B]
