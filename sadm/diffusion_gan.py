"""Diffusion-GAN as a loss (Wang et al., ICLR 2023, arXiv 2206.02262; METHODS.md §2.3).

Both real x and generated x_g pass through the same adaptive forward diffusion before a timestep-dependent
discriminator. The two functions below are used by both training scripts (DiT + adversarial loss, one-step GAN):

    generator:      L_G = softplus(−D(y_g, t))                               (or −D for hinge)
    discriminator:  L_D = softplus(D(y_g, t)) + softplus(−D(y, t)) [+ lazy R1 every r1_interval steps]

R1 is taken w.r.t. the *clean* real x through the noising y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε, as the official code does:
‖∇_x D(y(x), t)‖² = ᾱ_t·‖∇_y D(y, t)‖² per sample (the projected trunk noises its features inside D: w.r.t. the clean
pixels as well).

The caller freezes D for the generator step (`requires_grad_(False)`), detaches x_g for the discriminator step,
gathers the real logits of each discriminator step across processes and calls `diffusion.update(real_logits)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from accelerate.utils import extract_model_from_parallel

from .diffusion_augment import BETA_SCHEDULES, DIFFUSION_GAN_PRESETS, T_TABLES, TS_DISTS, AdaptiveDiffusion
from .losses.adversarial import GAN_LOSS_TYPES, gan_discriminator_loss, gan_generator_loss, r1_penalty
from .models.timestep_discriminator import TimestepDiscriminator

MODES = ("adaptive", "fixed", "none")
TIMESTEP_WEIGHTINGS = ("none", "snr", "threshold")  # the gate w(t) on the DiT trainer's timesteps

# loss and R1 per base GAN (official READMEs: StyleGAN2 `--cfg cifar` γ = 0.01; ProjectedGAN: hinge, no R1)
LOSS_PRESETS: dict[str, dict] = {
    "stylegan2": {"loss_type": "logistic", "r1_gamma": 0.01},
    "projected_gan": {"loss_type": "hinge", "r1_gamma": 0.0},
    "insgen": {"loss_type": "logistic", "r1_gamma": 0.01},
}


@dataclass
class DiffusionGANConfig:
    """Diffusion-GAN settings; fields left as None take the value of `preset` in `__post_init__`."""

    weight: float = field(
        default=0.0,
        metadata={
            "help": "λ_adv: weight of the adversarial generator loss added to the DiT denoising loss; 0 = off (ours: "
            "neutral from scratch on the digits benchmark, docs/BENCHMARKS.md; 0.01 helped a little when fine-tuning, "
            "larger values easily break ε-prediction). Unused by the one-step GAN."
        },
    )
    preset: str = field(
        default="stylegan2",
        metadata={"help": "Defaults of the official code: stylegan2, projected_gan or insgen (METHODS.md §2.2)."},
    )
    beta_schedule: str = field(
        default="linear",
        metadata={"help": f"β schedule re-spaced over the current T: {', '.join(BETA_SCHEDULES)} (paper: linear)."},
    )
    beta_start: float | None = field(default=None, metadata={"help": "First β over the current T (None: preset)."})
    beta_end: float | None = field(default=None, metadata={"help": "Last β over the current T (None: preset)."})
    t_min: int | None = field(default=None, metadata={"help": "Smallest diffusion length T, at p = 0 (None: preset)."})
    t_max: int | None = field(default=None, metadata={"help": "Largest diffusion length T, at p = 1 (None: preset)."})
    noise_std: float | None = field(
        default=None,
        metadata={"help": "σ, the scale of the diffusion noise (None: preset; 0.05 pixels, 0.5 features)."},
    )
    ts_dist: str | None = field(
        default=None, metadata={"help": f"t distribution over 1..T: {', '.join(TS_DISTS)} (None: preset)."}
    )
    target: float | None = field(
        default=None,
        metadata={"help": "d_target for r_d = mean sign of real logits; T grows while r_d exceeds it (None: preset)."},
    )
    ada_interval: int | None = field(
        default=None, metadata={"help": "Discriminator steps between adjustments of p and T (None: preset, 4)."}
    )
    ada_kimg: float | None = field(
        default=None, metadata={"help": "Thousands of real samples for p to travel from 0 to 1 (None: preset, 100)."}
    )
    t_table: str | None = field(
        default=None,
        metadata={
            "help": f"How the 64-slot t-table is filled: {', '.join(T_TABLES)} (stylegan2: half zeros; projected_gan: "
            "noised share min(p, 0.75)) (None: preset)."
        },
    )
    loss_type: str | None = field(
        default=None, metadata={"help": f"GAN loss: {', '.join(GAN_LOSS_TYPES)} (None: preset)."}
    )
    r1_gamma: float | None = field(
        default=None,
        metadata={
            "help": "R1 weight γ; the penalty is γ/2·‖∇_x D(y(x), t)‖², the gradient w.r.t. the clean reals x through "
            "the noising (= γ/2·ᾱ_t·‖∇_y D‖², as the official code), 0 disables (None: preset)."
        },
    )
    r1_interval: int = field(
        default=16,
        metadata={"help": "Lazy R1: applied every this many D steps and scaled by it, as StyleGAN2 (1 = every step)."},
    )
    disc_update_ratio: int = field(
        default=1, metadata={"help": "Discriminator steps per generator step (the official code alternates 1:1)."}
    )
    mode: str = field(
        default="adaptive",
        metadata={
            "help": "adaptive: T follows the discriminator (the paper); fixed: T = t_max and p frozen, the t-table "
            "still re-drawn every ada_interval D steps (ablation); none: no diffusion, y = x and t = 0 (plain GAN "
            "ablation)."
        },
    )
    class_conditional_disc: bool = field(
        default=True,
        metadata={"help": "Pass class labels to the discriminator (projection on a class embedding) when labeled."},
    )
    timestep_weighting: str = field(
        default="threshold",
        metadata={
            "help": "DiT trainer: which denoiser timesteps feed x̂₀ to the term, as a per-sample weight w(t): 'none', "
            "'snr' (min(SNR_t, 5) / 5) or 'threshold' (t < t_threshold); x̂₀ is a blurry posterior mean at high "
            "noise. Unused by the one-step GAN."
        },
    )
    t_threshold: int = field(
        default=250,
        metadata={"help": "DiT trainer: denoiser timesteps t < this feed the term under 'threshold' (ours)."},
    )
    start_step: int = field(
        default=0,
        metadata={
            "help": "DiT trainer: λ_adv is 0 before this global step (the discriminator still trains), then ramps "
            "up over warmup_steps. Unused by the one-step GAN."
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={"help": "DiT trainer: steps of linear warm-up of λ_adv after start_step (0 = none)."},
    )
    grad_ratio: float | None = field(
        default=None,
        metadata={
            "help": "DiT trainer: adaptive λ_adv (diffusers' VQGAN rule): each step λ_adv = min(weight, grad_ratio · "
            "‖∇L_DSM‖ / ‖∇L_adv‖), both gradients at the denoiser's output, so `weight` is the cap. None: λ_adv = "
            "weight. Unused by the one-step GAN."
        },
    )

    def __post_init__(self):
        if self.preset not in DIFFUSION_GAN_PRESETS:
            raise ValueError(f"preset '{self.preset}' is not one of {', '.join(DIFFUSION_GAN_PRESETS)}.")
        for name, value in {**DIFFUSION_GAN_PRESETS[self.preset], **LOSS_PRESETS[self.preset]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.weight < 0:
            raise ValueError(f"weight={self.weight} must be >= 0.")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule '{self.beta_schedule}' is not one of {', '.join(BETA_SCHEDULES)}.")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}."
            )
        if self.t_min < 1:
            raise ValueError(f"t_min={self.t_min} must be >= 1.")
        if self.t_min > self.t_max:
            raise ValueError(f"t_min={self.t_min} must not exceed t_max={self.t_max}.")
        if self.noise_std <= 0:
            raise ValueError(f"noise_std={self.noise_std} must be > 0.")
        if self.ts_dist not in TS_DISTS:
            raise ValueError(f"ts_dist '{self.ts_dist}' is not one of {', '.join(TS_DISTS)}.")
        if not -1 < self.target < 1:
            raise ValueError(f"target={self.target} must be in (-1, 1).")
        if self.ada_interval < 1:
            raise ValueError(f"ada_interval={self.ada_interval} must be >= 1.")
        if self.ada_kimg <= 0:
            raise ValueError(f"ada_kimg={self.ada_kimg} must be > 0.")
        if self.t_table not in T_TABLES:
            raise ValueError(f"t_table '{self.t_table}' is not one of {', '.join(T_TABLES)}.")
        if self.loss_type not in GAN_LOSS_TYPES:
            raise ValueError(f"loss_type '{self.loss_type}' is not one of {', '.join(GAN_LOSS_TYPES)}.")
        if self.r1_gamma < 0:
            raise ValueError(f"r1_gamma={self.r1_gamma} must be >= 0.")
        if self.r1_interval < 1:
            raise ValueError(f"r1_interval={self.r1_interval} must be >= 1.")
        if self.disc_update_ratio < 1:
            raise ValueError(f"disc_update_ratio={self.disc_update_ratio} must be >= 1.")
        if self.mode not in MODES:
            raise ValueError(f"mode '{self.mode}' is not one of {', '.join(MODES)}.")
        if self.timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise ValueError(
                f"timestep_weighting '{self.timestep_weighting}' is not one of {', '.join(TIMESTEP_WEIGHTINGS)}."
            )
        if self.t_threshold < 1:
            raise ValueError(f"t_threshold={self.t_threshold} must be >= 1 (0 would switch the term off).")
        if self.start_step < 0 or self.warmup_steps < 0:
            raise ValueError(f"start_step={self.start_step} and warmup_steps={self.warmup_steps} must be >= 0.")
        if self.grad_ratio is not None and self.grad_ratio <= 0:
            raise ValueError(f"grad_ratio={self.grad_ratio} must be None or > 0.")


def max_p_change(batch: int, d_steps: int, ada_kimg: float) -> float:
    """The most p can move in a run: batch·d_steps/(ada_kimg·1000) (each adjustment moves it by the number of real
    logits since the last one over ada_kimg·1000), with `batch` the global batch of real logits per D step."""
    if ada_kimg <= 0:
        raise ValueError(f"ada_kimg={ada_kimg} must be > 0.")
    return batch * d_steps / (ada_kimg * 1000)


def build_adaptive_diffusion(config: DiffusionGANConfig, seed: int = 0) -> AdaptiveDiffusion:
    """The adaptive diffusion of `config`: `fixed` mode freezes p = 1 (T = t_max) and still re-draws the t-table at
    every adjustment; `none` is never called on data (the loss functions skip it) but still records r_d for logging."""
    return AdaptiveDiffusion(
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        t_min=config.t_min,
        t_max=config.t_max,
        noise_std=config.noise_std,
        ts_dist=config.ts_dist,
        target=config.target,
        ada_interval=config.ada_interval,
        ada_kimg=config.ada_kimg,
        t_table=config.t_table,
        adaptive=config.mode == "adaptive",
        seed=seed,
    )


def build_timestep_discriminator(
    config: DiffusionGANConfig,
    in_channels: int,
    sample_size: int,
    num_classes: int | None,
    trunk: str = "conv",
    base_channels: int = 64,
    num_layers: int = 3,
    minibatch_std_group_size: int = 4,
    spectral_norm: bool = False,
    timm_model_name: str = "resnet18",
    timm_pretrained_path: str | None = None,
    timm_input_size: int | None = None,
    input_adapter: str = "adapt",
) -> TimestepDiscriminator:
    """The timestep discriminator D(y, t[, class]) of both trainers, fitted to `config`: t-conditioned unless the
    trunk is 'projected' (Diffusion-ProjectedGAN gives D no t) or `mode` is 'none' (t is always 0), with a timestep
    table as long as `config.t_max`, class-conditional when the data has classes and `class_conditional_disc`."""
    return TimestepDiscriminator(
        in_channels=in_channels,
        sample_size=sample_size,
        trunk=trunk,
        base_channels=base_channels,
        num_layers=num_layers,
        minibatch_std_group_size=minibatch_std_group_size,
        t_conditioning=trunk != "projected" and config.mode != "none",
        num_classes=num_classes if num_classes and config.class_conditional_disc else None,
        max_timesteps=config.t_max,
        spectral_norm=spectral_norm,
        timm_model_name=timm_model_name,
        timm_pretrained_path=timm_pretrained_path,
        timm_input_size=timm_input_size,
        input_adapter=input_adapter,
    )


def _run_discriminator(
    discriminator: torch.nn.Module,
    diffusion: AdaptiveDiffusion,
    x: torch.Tensor,
    class_labels: torch.Tensor | None,
    config: DiffusionGANConfig,
    generator: torch.Generator | list[torch.Generator] | None,
    requires_grad_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diffuse x and score it: returns `(logits [B], x, t [B])`.

    Pixel trunks see y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε and t; the projected trunk sees clean pixels and noises its own
    feature maps per (sample, channel) (Diffusion-ProjectedGAN). Mode `none`: y = x, t = 0, no feature noise.
    With `requires_grad_input` the returned x is a detached copy that requires grad and the noising runs inside the
    graph, so a gradient w.r.t. it is the official code's R1 input: ∇_x D = √ᾱ_t·∇_y D.
    """
    if requires_grad_input:
        x = x.detach().requires_grad_(True)
    projected = extract_model_from_parallel(discriminator).config.trunk == "projected"
    if config.mode == "none" or projected:
        y, t = x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    else:
        y, t = diffusion(x, generator=generator)
    labels = class_labels if config.class_conditional_disc else None
    feature_diffusion = diffusion if projected and config.mode != "none" else None
    logits = discriminator(
        y, timesteps=t, class_labels=labels, feature_diffusion=feature_diffusion, generator=generator
    ).logits
    return logits, x, t


# Diffusion-GAN generator objective: the GAN value on diffused samples (eq. 2), gradients through y_g to x_g.
def diffusion_gan_generator_loss(
    discriminator: torch.nn.Module,
    diffusion: AdaptiveDiffusion,
    x_fake: torch.Tensor,
    class_labels: torch.Tensor | None,
    config: DiffusionGANConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adversarial loss of the generator (or of the DiT's x̂₀), `[B]`, and its statistics.

    Args:
        discriminator (`torch.nn.Module`): a [`TimestepDiscriminator`] (possibly wrapped), frozen by the caller.
        diffusion ([`AdaptiveDiffusion`]): the shared adaptive diffusion.
        x_fake (`torch.Tensor` of shape `[B, C, H, W]`): generated samples, attached to the generator's graph.
        class_labels (`torch.LongTensor` of shape `[B]`, *optional*): their classes.
        config ([`DiffusionGANConfig`]): loss type and mode.
        generator (`torch.Generator` or one per sample, *optional*): drives t and the noise.

    Returns:
        `(loss [B], stats)` with stats `g_adv_loss`, `g_fake_logit_mean` (detached 0-d tensors: call `.item()` only
        when logging, so a training step needs no host sync).
    """
    fake_logits, _, _ = _run_discriminator(discriminator, diffusion, x_fake, class_labels, config, generator)
    loss = gan_generator_loss(fake_logits, config.loss_type)
    stats = {"g_adv_loss": loss.detach().mean(), "g_fake_logit_mean": fake_logits.detach().mean()}  # no host sync
    return loss, stats


# Diffusion-GAN discriminator objective (eq. 2) on diffused reals and fakes, with StyleGAN2's lazy R1.
def diffusion_gan_discriminator_loss(
    discriminator: torch.nn.Module,
    diffusion: AdaptiveDiffusion,
    x_real: torch.Tensor,
    x_fake_detached: torch.Tensor,
    class_labels: torch.Tensor | None,
    config: DiffusionGANConfig,
    d_step: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Discriminator loss `[B]`, its statistics and the real logits (for `diffusion.update` after gathering).

    On D steps with `d_step % r1_interval == 0` (and r1_gamma > 0) the loss includes
    γ/2·‖∇_x D(y(x_real), t)‖²·r1_interval, the R1 penalty w.r.t. the *clean* real inputs through the noising
    (= γ/2·ᾱ_t·‖∇_y D(y_real, t)‖² per sample, as the official code; for the projected trunk, whose feature noise is
    inside D, w.r.t. the clean pixels too), scaled by the interval as StyleGAN2's lazy regularisation.

    Args:
        discriminator (`torch.nn.Module`): a [`TimestepDiscriminator`] (possibly wrapped), trainable.
        diffusion ([`AdaptiveDiffusion`]): the shared adaptive diffusion.
        x_real (`torch.Tensor` of shape `[B, C, H, W]`): real samples.
        x_fake_detached (`torch.Tensor` of shape `[B, C, H, W]`): generated samples, detached.
        class_labels (`torch.LongTensor` of shape `[B]`, *optional*): classes of both batches.
        config ([`DiffusionGANConfig`]): loss type, R1 and mode.
        d_step (`int`): index of this discriminator step (counts from 0; R1 runs when it is a multiple of
            `r1_interval`).
        generator (`torch.Generator` or one per sample, *optional*): drives t and the noise.

    Returns:
        `(loss [B], stats, real_logits [B] detached)`; stats `d_loss`, `d_real_acc` (share of real logits > 0),
        `d_fake_acc` (share of fake logits < 0), `d_real_logit_mean`, `d_fake_logit_mean`, `r1` (the mean
        ‖∇_x D‖², without γ/2 and the interval; NaN on steps without R1), all detached 0-d tensors.
    """
    do_r1 = config.r1_gamma > 0 and d_step % config.r1_interval == 0
    real_logits, x_real_input, _ = _run_discriminator(
        discriminator, diffusion, x_real.detach(), class_labels, config, generator, requires_grad_input=do_r1
    )
    fake_logits, _, _ = _run_discriminator(
        discriminator, diffusion, x_fake_detached.detach(), class_labels, config, generator
    )
    loss = gan_discriminator_loss(real_logits, fake_logits, config.loss_type)
    r1 = None
    if do_r1:
        r1 = r1_penalty(real_logits, x_real_input)  # w.r.t. the clean reals, through the noising
        loss = loss + r1 * (config.r1_gamma / 2) * config.r1_interval
    real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
    stats = {  # detached 0-d tensors on the logits' device: no host sync until the caller logs them
        "d_loss": loss.detach().mean(),
        "d_real_acc": (real_logits > 0).float().mean(),
        "d_fake_acc": (fake_logits < 0).float().mean(),
        "d_real_logit_mean": real_logits.mean(),
        "d_fake_logit_mean": fake_logits.mean(),
        "r1": r1.detach().mean() if r1 is not None else torch.full((), math.nan, device=real_logits.device),
    }
    return loss, stats, real_logits
