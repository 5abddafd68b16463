"""The denoising objective of the DiT trainer as one object, in the manner of EDM's `loss_fn(net, images, labels)`.

[`DenoisingObjective`] owns everything between a clean batch and the denoiser's per-sample loss: classifier-free label
dropout, the noise and timestep draws (from the global RNG, or from one generator per sample with
`--per_sample_noise`), x_t, the regression target of the prediction type, L_DSM with optional Min-SNR-γ, the
improved-DDPM VLB term when σ is learned, and x̂₀ for the adversarial terms. The maths lives in
[`sadm.losses.denoising`]; this module only composes it:

    noised = objective.noise(x0, labels, generators)                 # t, ε, x_t, the labels the DiT sees
    output = model(noised.x_t, timestep=noised.timesteps, class_labels=noised.model_labels).sample
    result = objective.loss(output, noised)                          # L_DSM [B] (+ VLB), x̂₀ on request
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .losses import denoising_loss, predict_x0, training_target, vlb_loss
from .losses.denoising import PARAMETERIZATIONS
from .randomness import draw_timesteps, draw_uniform

PREDICTION_TYPES = tuple(PARAMETERIZATIONS)
TIMESTEP_BUCKETS = 4  # the denoising loss is also logged per quarter of the timesteps (`loss_dsm_t<lo>-<hi>`)


@dataclass
class NoisedBatch:
    """One micro-batch after the forward process q(x_t | x₀).

    Args:
        x0 (`torch.Tensor` of shape `[B, C, H, W]`): the clean samples (pixels, or latents z₀).
        labels (`torch.LongTensor` of shape `[B]`, *optional*): their true classes (None: unlabeled data).
        model_labels (`torch.LongTensor` of shape `[B]`): what the DiT is conditioned on: the labels after dropout to
            the null id, or the single class 0 of an unconditional model.
        noise (`torch.Tensor` of shape `[B, C, H, W]`): ε.
        timesteps (`torch.LongTensor` of shape `[B]`): t.
        x_t (`torch.Tensor` of shape `[B, C, H, W]`): √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.
    """

    x0: torch.Tensor
    labels: torch.Tensor | None
    model_labels: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    x_t: torch.Tensor


@dataclass
class DenoisingResult:
    """What [`DenoisingObjective.loss`] returns: the per-sample loss and the pieces the adversarial terms build on.

    Args:
        loss (`torch.Tensor` of shape `[B]`): L_DSM (Min-SNR-weighted when asked) + the scaled VLB term with learned σ.
        output (`torch.Tensor` of shape `[B, C or 2C, H, W]`): the raw model output (the gradient-norm λ is taken
            here).
        prediction (`torch.Tensor` of shape `[B, C, H, W]`): its first C channels, in the prediction type's space.
        x0_hat (`torch.Tensor` of shape `[B, C, H, W]`, *optional*): x̂₀, attached to the graph (None unless asked).
    """

    loss: torch.Tensor
    output: torch.Tensor
    prediction: torch.Tensor
    x0_hat: torch.Tensor | None = None


class DenoisingObjective:
    r"""
    DDPM denoising score matching for a DiT (DiT, Peebles & Xie 2023; improved DDPM, Nichol & Dhariwal 2021).

    Args:
        noise_scheduler ([`~diffusers.DDPMScheduler`]): the forward process (its ᾱ and β).
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"sample"`.
        channels (`int`): C, the channels of x₀ (the model outputs C, or 2C with learned σ).
        learn_sigma (`bool`): add the VLB term on the variance channels (iDDPM's hybrid loss).
        snr_gamma (`float`, *optional*): Min-SNR-γ weighting of L_DSM; None disables it.
        vlb_weight (`float`, defaults to 0.001): λ of L_simple + λ·L_vlb (iDDPM); the VLB term is scaled by T·λ.
        class_dropout_prob (`float`, defaults to 0.1): probability of replacing a label by `null_class` (CFG).
        null_class (`int`, *optional*): the null row of the label table (its id is the class count).
        device (`torch.device`, *optional*): where the schedule tensors live.
    """

    def __init__(
        self,
        noise_scheduler: DDPMScheduler,
        prediction_type: str,
        channels: int,
        learn_sigma: bool = False,
        snr_gamma: float | None = None,
        vlb_weight: float = 0.001,
        class_dropout_prob: float = 0.1,
        null_class: int | None = None,
        device: torch.device | str | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}.")
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)  # ᾱ, [T]
        self.betas = noise_scheduler.betas.to(device)  # β, [T]
        self.prediction_type, self.channels, self.learn_sigma = prediction_type, channels, learn_sigma
        self.snr_gamma, self.vlb_weight = snr_gamma, vlb_weight
        self.class_dropout_prob, self.null_class = class_dropout_prob, null_class

    def noise(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        generators: list[torch.Generator] | None = None,
    ) -> NoisedBatch:
        """Drop labels, draw ε and t, and diffuse: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.

        The draws come in this order (the exact-resume and equivalence tests rely on it): the label-dropout uniforms,
        ε, t. `generators` (one per sample, stream 0 of `sample_generators`) replaces the global RNG."""
        batch, device = x0.shape[0], x0.device
        if labels is not None:  # classifier-free guidance: drop the label once per sample (all blocks see the null id)
            drop = draw_uniform(batch, device, generators) < self.class_dropout_prob
            model_labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        else:
            model_labels = torch.zeros(batch, dtype=torch.long, device=device)  # unconditional: the single class 0
        noise = randn_tensor(x0.shape, generators, device, x0.dtype) if generators else torch.randn_like(x0)
        timesteps = draw_timesteps(batch, self.num_train_timesteps, device, generators)
        x_t = self.noise_scheduler.add_noise(x0, noise, timesteps)
        return NoisedBatch(x0=x0, labels=labels, model_labels=model_labels, noise=noise, timesteps=timesteps, x_t=x_t)

    def predict_x0(self, prediction: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """x̂₀ from the model's prediction (of any type), attached to its graph."""
        return predict_x0(prediction, noised.x_t, noised.timesteps, self.alphas_cumprod, self.prediction_type)

    def predict_noise(self, prediction: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """ε̂ from any parameterisation (the VLB term needs ε̂): ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t)."""
        if self.prediction_type == "epsilon":
            return prediction
        x0_hat = self.predict_x0(prediction, noised)
        a = self.alphas_cumprod[noised.timesteps].float().reshape(-1, 1, 1, 1)  # ᾱ_t, [B] -> [B, 1, 1, 1]
        return (noised.x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()

    def loss(self, output: torch.Tensor, noised: NoisedBatch, return_x0: bool = False) -> DenoisingResult:
        """L_DSM per sample `[B]` (+ T·λ_vlb·L_vlb with learned σ), and x̂₀ when `return_x0`."""
        prediction, var_values = output[:, : self.channels], output[:, self.channels :]  # [B, C, H, W] each
        t, a = noised.timesteps, self.alphas_cumprod
        target = training_target(noised.x0, noised.noise, t, a, self.prediction_type)
        loss = denoising_loss(prediction, target, t, a, self.prediction_type, self.snr_gamma)
        if self.learn_sigma:
            eps_pred = self.predict_noise(prediction, noised)
            loss_vlb = vlb_loss(var_values, eps_pred, noised.x0, noised.x_t, t, self.betas, a)
            loss = loss + loss_vlb * (self.num_train_timesteps * self.vlb_weight)
        x0_hat = self.predict_x0(prediction, noised) if return_x0 else None
        return DenoisingResult(loss=loss, output=output, prediction=prediction, x0_hat=x0_hat)

    def loss_by_timestep_bucket(
        self, loss: torch.Tensor, timesteps: torch.Tensor, buckets: int = TIMESTEP_BUCKETS
    ) -> dict[str, torch.Tensor]:
        """The mean of the per-sample `loss` `[B]` over each of `buckets` equal ranges of t, as detached 0-d tensors
        named `loss_dsm_t<lo>-<hi>` (NaN for a range with no sample in this micro-batch); no host sync."""
        loss = loss.detach().float()
        index = (timesteps * buckets // self.num_train_timesteps).clamp(max=buckets - 1)  # [B]
        sums = torch.zeros(buckets, device=loss.device).index_add_(0, index, loss)
        counts = torch.zeros(buckets, device=loss.device).index_add_(0, index, torch.ones_like(loss))
        means = sums / counts  # 0/0 = NaN where empty
        width = self.num_train_timesteps // buckets
        return {f"loss_dsm_t{i * width}-{(i + 1) * width - 1}": means[i] for i in range(buckets)}
