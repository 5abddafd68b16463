"""Denoising losses as pure functions of tensors. Each returns a per-sample loss `[B]`; the caller weights and reduces.

Notation (DDPM, Ho et al. 2020): x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, SNR(t) = ᾱ_t / (1 − ᾱ_t).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast to the shape of `like`: [B] -> [B, 1, 1, 1]."""
    out = values.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t), `[B]`."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


@dataclass(frozen=True)
class Parameterization:
    """What a prediction type means, in one place: the regression target, x̂₀ from the output, and the Min-SNR-γ
    weight of the regressed quantity. Each entry takes ᾱ_t broadcast to the sample shape (or SNR(t) `[B]`)."""

    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x₀, ε, ᾱ_t) -> target
    x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (output, x_t, ᾱ_t) -> x̂₀
    min_snr_weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (SNR, min(SNR, γ)) -> weight


# ε (DDPM), v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022), x₀; Min-SNR-γ weights from Hang et al. 2023.
# The ε form of x̂₀ divides by √ᾱ_t and amplifies errors at large t; adversarial terms weight or gate those timesteps.
PARAMETERIZATIONS: dict[str, Parameterization] = {
    "epsilon": Parameterization(
        target=lambda x0, noise, a: noise,
        x0=lambda output, x_t, a: (x_t - (1 - a).sqrt() * output) / a.sqrt(),
        min_snr_weight=lambda s, clipped: clipped / s,
    ),
    "v_prediction": Parameterization(
        target=lambda x0, noise, a: a.sqrt() * noise - (1 - a).sqrt() * x0,
        x0=lambda output, x_t, a: a.sqrt() * x_t - (1 - a).sqrt() * output,
        min_snr_weight=lambda s, clipped: clipped / (s + 1),
    ),
    "sample": Parameterization(
        target=lambda x0, noise, a: x0,
        x0=lambda output, x_t, a: output,
        min_snr_weight=lambda s, clipped: clipped,
    ),
}


def parameterization(prediction_type: str) -> Parameterization:
    if prediction_type not in PARAMETERIZATIONS:
        raise ValueError(f"prediction_type '{prediction_type}' is not one of {', '.join(PARAMETERIZATIONS)}.")
    return PARAMETERIZATIONS[prediction_type]


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network regresses: ε, v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022), or x₀ itself."""
    kind = parameterization(prediction_type)
    a = _gather(alphas_cumprod, timesteps, x0) if prediction_type == "v_prediction" else None
    return kind.target(x0, noise, a)


def predict_x0(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Clean-sample prediction x̂₀ used by every adversarial term (METHODS.md §0).

    ε:  x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
    v:  x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂
    x₀: x̂₀ = model output
    """
    kind = parameterization(prediction_type)
    return kind.x0(model_output, x_t, _gather(alphas_cumprod, timesteps, x_t))


def denoising_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample MSE ‖target − output‖² averaged over pixels, `[B]`, optionally Min-SNR-γ weighted (Hang et al. 2023).

    With ε-prediction and no weighting this is DiT's L_simple, i.e. L_DSM with w(λ_t) = SNR(t) in x₀ space.
    Min-SNR-γ weights, expressed for the regressed quantity: ε: min(SNR, γ)/SNR; v: min(SNR, γ)/(SNR + 1); x₀: min(SNR, γ).
    """
    kind = parameterization(prediction_type)
    mse = (model_output.float() - target.float()).pow(2).mean(dim=tuple(range(1, model_output.ndim)))
    if snr_gamma is None:
        return mse
    s = snr(alphas_cumprod, timesteps)
    return mse * kind.min_snr_weight(s, torch.clamp(s, max=snr_gamma))


def _normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    # KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) = ½(−1 + log σ₂² − log σ₁² + σ₁²/σ₂² + (μ₁ − μ₂)²/σ₂²), elementwise
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))), as in improved-DDPM / DiT
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of data in [-1, 1] discretised into 256 bins of width 2/255 under N(means, exp(log_scales)²)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def vlb_loss(
    model_var_values: torch.Tensor,
    eps_pred: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    betas: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The variational-bound term L_t of the improved-DDPM hybrid loss (Nichol & Dhariwal 2021, Eq. 16), `[B]` in bits/dim.

    The network's variance output v ∈ [−1, 1] interpolates log Σ_θ = ((v+1)/2)·log β_t + (1 − (v+1)/2)·log β̃_t. As in DiT,
    the mean uses a *detached* ε̂ so this term only trains the variance. L_t = KL(q(x_{t−1}|x_t, x₀) ‖ p_θ(x_{t−1}|x_t)) for
    t > 0 and the discretised decoder NLL −log p_θ(x₀|x₁) at t = 0. The hybrid loss L_simple + 0.001·L_vlb with
    L_vlb = Σ_t L_t ≈ T·E_t[L_t] equals L_simple + (T/1000)·L_t per sample, so the caller adds `vlb_loss · T / 1000`.
    """
    betas = betas.to(device=x0.device, dtype=torch.float64)
    alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=torch.float64)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    # q(x_{t-1} | x_t, x_0) = N(c₁·x₀ + c₂·x_t, β̃_t), β̃_t = β_t(1 − ᾱ_{t−1})/(1 − ᾱ_t)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))  # β̃₀ = 0: clip
    coef_x0 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
    coef_xt = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    def at(values: torch.Tensor) -> torch.Tensor:
        return _gather(values.float(), timesteps, x0)

    x0, x_t, eps_pred, v = x0.float(), x_t.float(), eps_pred.detach().float(), model_var_values.float()
    true_mean = at(coef_x0) * x0 + at(coef_xt) * x_t
    true_log_variance = at(posterior_log_variance)
    # p_θ: mean from the frozen ε̂ through x̂₀, variance interpolated between β̃_t and β_t
    a = at(alphas_cumprod)
    x0_pred = (x_t - (1 - a).sqrt() * eps_pred) / a.sqrt()
    model_mean = at(coef_x0) * x0_pred + at(coef_xt) * x_t
    frac = (v + 1.0) / 2.0
    model_log_variance = frac * at(torch.log(betas)) + (1.0 - frac) * true_log_variance

    reduce_dims = tuple(range(1, x0.ndim))
    kl = _normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).mean(dim=reduce_dims) / math.log(2.0)
    decoder_nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).mean(dim=reduce_dims)
    decoder_nll = decoder_nll / math.log(2.0)
    return torch.where(timesteps == 0, decoder_nll, kl)
