"""One training step of the DiT trainer: the denoising objective, the adversarial terms, and the guarded optimizer steps.

[`DenoiserTrainStep`] is the loop body of `scripts/train_sadm.py`, as an object the tests and the speed benchmark
call as they are:

    batch → x₀ (pixels, or z₀ = s·(μ + σn) from the VAE's posterior moments) → objective.noise → DiT → objective.loss
    → [x̂₀ through the frozen decoder (`--disc_input pixel`), clamped to ±x0_clip] → term.begin_step for every term
    → Σ term.generator_loss
    → backward, denoiser step → term.discriminator_step for every term

Each model is stepped inside `accelerator.accumulate` of the denoiser (the discriminators follow its window with
`no_sync`); EMA, logging and checkpoints stay in the script.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers import AutoencoderKL

from .disc_augment import DiffAugment
from .latents import decode_latents, encode_moments, sample_latents
from .objective import DenoisingObjective
from .term_weights import gradient_norm_ratio
from .terms import AdversarialBatch, AdversarialTerm, SampleStreams

logger = logging.getLogger(__name__)


def step_if_finite(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    lr_scheduler=None,
) -> tuple[bool, torch.Tensor]:
    """Clip the gradients, then step only when their norm is finite; returns `(finite, grad_norm)`. One host sync.

    A non-finite step changes nothing: no optimizer or LR-scheduler step, the gradients are zeroed. With fp16 loss
    scaling (`accelerator.scaler`) the optimizer step is still called: the scaler skips it itself (it saw the inf when
    unscaling for the clip) and lowers the scale; without that call the scale would never back off and every later
    step would overflow again. Only this optimizer's gradients are unscaled: accelerate's `clip_grad_norm_` unscales
    every optimizer's, which would unscale a discriminator's gradients while they are still being accumulated (scaled)
    over micro-batches.
    """
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    if accelerator.scaler is not None and accelerator.distributed_type != DistributedType.FSDP:
        accelerator.unscale_gradients(optimizer=optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    finite = bool(torch.isfinite(grad_norm))
    if finite or accelerator.scaler is not None:
        optimizer.step()
    if finite and lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


class BadStepCounter:
    """Skipped (non-finite) optimizer steps per model: `consecutive` stops the run at `max_bad_steps` in a row of any
    one model, `total` is logged as `bad_steps_<model>`. Saved in `train_state.json` for an exact resume."""

    def __init__(self, max_bad_steps: int, state: dict | int | None = None):
        self.max_bad_steps = max_bad_steps
        self.consecutive: dict[str, int] = {}
        self.total: dict[str, int] = {}
        if isinstance(state, int):  # checkpoints written before per-model counts: the denoiser's consecutive count
            self.consecutive["transformer"] = state
        elif state:
            self.consecutive, self.total = dict(state["consecutive"]), dict(state["total"])

    def update(self, model_name: str, finite: bool, step: int) -> None:
        """Count one optimizer step of `model_name`; raise `FloatingPointError` after `max_bad_steps` bad ones in a row."""
        self.total.setdefault(model_name, 0)
        if finite:
            self.consecutive[model_name] = 0
            return
        self.total[model_name] += 1
        count = self.consecutive[model_name] = self.consecutive.get(model_name, 0) + 1
        logger.warning(f"Non-finite {model_name} gradient at step {step}: step skipped ({count} in a row).")
        if count >= self.max_bad_steps:
            raise FloatingPointError(
                f"{count} consecutive non-finite {model_name} steps (--max_bad_steps {self.max_bad_steps}); stopping. "
                "Lower the learning rate(s) or --max_grad_norm, or resume from an earlier checkpoint."
            )

    def stats(self) -> dict[str, int]:
        return {f"bad_steps_{name}": count for name, count in self.total.items()}

    def state_dict(self) -> dict:
        return {"consecutive": dict(self.consecutive), "total": dict(self.total)}


class GuardedOptimizerStep:
    """Clip, then step only on finite gradients: a bad step is skipped, counted per model and logged (see
    [`~sadm.step.step_if_finite`] and [`~sadm.step.BadStepCounter`]).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        max_grad_norm (`float`): clipping norm; 0 disables clipping.
        bad_steps ([`~sadm.step.BadStepCounter`]): raises after `max_bad_steps` bad steps of one model in a row.
    """

    def __init__(self, accelerator: Accelerator, max_grad_norm: float, bad_steps: BadStepCounter):
        self.accelerator, self.max_grad_norm, self.bad_steps = accelerator, max_grad_norm, bad_steps

    def __call__(
        self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, lr_scheduler=None
    ) -> tuple[bool, torch.Tensor]:
        finite, grad_norm = step_if_finite(self.accelerator, model, optimizer, self.max_grad_norm, lr_scheduler)
        self.bad_steps.update(name, finite, step)  # raises after --max_bad_steps in a row
        return finite, grad_norm


class DenoiserTrainStep:
    r"""The denoiser step plus the adversarial terms' discriminator steps on one micro-batch.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator (gradient accumulation, DDP).
        model (`torch.nn.Module`): the (prepared) DiT.
        optimizer (`torch.optim.Optimizer`): its optimizer.
        lr_scheduler: its LR scheduler (stepped with every finite denoiser step).
        objective ([`~sadm.objective.DenoisingObjective`]): noise, timesteps, L_DSM, x̂₀.
        terms (`list[AdversarialTerm]`): the adversarial terms, in the order they are added and stepped.
        optimizer_step ([`GuardedOptimizerStep`]): how every model is stepped.
        vae (`AutoencoderKL`, *optional*): the frozen VAE of a latent model (batches of pixels are encoded with it).
        decode_for_discriminators (`bool`, defaults to False): the discriminators see VAE-decoded x₀ and x̂₀ (the
            decoder is frozen, gradients flow through it into x̂₀).
        x0_clip (`float`, defaults to 0): clamp what the discriminators see to [−c, c]; 0 disables it.
        seed (`int`, defaults to 0): seed of the per-sample streams.
        per_sample_noise (`bool`, defaults to False): draw every sample's randomness from generators seeded by (seed,
            sample key) (batches then carry `sample_keys`), so a run is the same on any process count or accumulation.
        disc_augment ([`~sadm.disc_augment.DiffAugment`], *optional*): DiffAugment of what the discriminators see, one
            draw per sample shared by real and fake (per-sample stream 4); each term applies it to its own view.
        grad_ratio_steps (`int`, defaults to 0): on the micro-batches of every this many-th optimizer step, log each
            term's push relative to the denoising loss's, `grad_ratio_<term>` = ‖∂(λ·L_term)/∂out‖ / ‖∂L_DSM/∂out‖ at
            the model output (one extra backward through the discriminator's loss); 0 disables it.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        objective: DenoisingObjective,
        terms: list[AdversarialTerm],
        optimizer_step: GuardedOptimizerStep,
        vae: AutoencoderKL | None = None,
        decode_for_discriminators: bool = False,
        x0_clip: float = 0.0,
        seed: int = 0,
        per_sample_noise: bool = False,
        disc_augment: DiffAugment | None = None,
        grad_ratio_steps: int = 0,
    ):
        if decode_for_discriminators and vae is None:
            raise ValueError("decode_for_discriminators needs the VAE whose decoder maps latents to pixels.")
        self.accelerator, self.model, self.optimizer, self.lr_scheduler = accelerator, model, optimizer, lr_scheduler
        self.objective, self.terms, self.optimizer_step = objective, terms, optimizer_step
        self.vae, self.decode_for_discriminators, self.x0_clip = vae, decode_for_discriminators, x0_clip
        self.seed, self.per_sample_noise, self.disc_augment = seed, per_sample_noise, disc_augment
        self.grad_ratio_steps = grad_ratio_steps
        self.stats: dict[str, torch.Tensor | float] = {}  # the latest value of every statistic, logged by the caller

    def clean_samples(self, batch: dict) -> torch.Tensor:
        """x₀ `[B, C, H, W]`: the pixels in [-1, 1], or a fresh posterior sample z₀ = s·(μ + σ·n) every step, from the
        cached moments (`latent_moments`) or from the pixels encoded now."""
        if self.vae is None:
            return batch["pixel_values"]
        moments = (
            batch["latent_moments"] if "latent_moments" in batch else encode_moments(self.vae, batch["pixel_values"])
        )
        return sample_latents(moments, self.vae.config.scaling_factor)  # [B, c, h, w]

    def discriminator_view(self, x0: torch.Tensor, x0_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the discriminators compare: x₀ and x̂₀, decoded by the frozen VAE and clamped when asked."""
        real, fake = x0, x0_hat
        if self.decode_for_discriminators:  # through the frozen decoder, into x̂₀
            with torch.no_grad():
                real = decode_latents(self.vae, x0)
            fake = decode_latents(self.vae, x0_hat)
        if self.x0_clip > 0:
            real, fake = real.clamp(-self.x0_clip, self.x0_clip), fake.clamp(-self.x0_clip, self.x0_clip)
        return real, fake

    def __call__(self, batch: dict, step: int) -> bool:
        """Train on one micro-batch at global step `step`; returns whether the optimizers stepped (`sync_gradients`).
        The statistics are in `self.stats` (detached tensors: no host sync)."""
        accelerator, stats = self.accelerator, self.stats
        x0 = self.clean_samples(batch)
        keys = batch["sample_keys"] if self.per_sample_noise else None
        streams = SampleStreams(self.seed, keys, x0.device)
        noised = self.objective.noise(x0, batch["class_labels"], streams.get(0))

        # ---- denoiser step: L_DSM (+ hybrid VLB) + Σ terms, discriminators frozen
        with accelerator.accumulate(self.model):
            output = self.model(noised.x_t, timestep=noised.timesteps, class_labels=noised.model_labels).sample
            result = self.objective.loss(output, noised, return_x0=bool(self.terms))  # output [B, C or 2C, H, W]
            loss = result.loss.mean()
            stats["loss_dsm"] = result.loss.detach().mean()
            stats.update(self.objective.loss_by_timestep_bucket(result.loss, noised.timesteps))
            adversarial = None
            if self.terms:
                real, fake = self.discriminator_view(x0, result.x0_hat)
                adversarial = AdversarialBatch(
                    noised,
                    result,
                    real,
                    fake,
                    self.objective.alphas_cumprod,
                    step,
                    streams=streams,
                    augment=self.disc_augment,
                )
                for term in self.terms:  # draws both phases share, before any term's loss
                    term.begin_step(adversarial)
                measure = self.grad_ratio_steps > 0 and (step + 1) % self.grad_ratio_steps == 0  # logged after it
                for term in self.terms:
                    term_loss, term_stats = term.generator_loss(adversarial)
                    loss = loss + term_loss
                    stats.update(term_stats)
                    if measure and term_loss.requires_grad:
                        stats[f"grad_ratio_{term.name}"] = gradient_norm_ratio(result.loss.mean(), term_loss, output)
            stats["loss"] = loss.detach()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                _, stats["grad_norm"] = self.optimizer_step(
                    "transformer", self.model, self.optimizer, step, self.lr_scheduler
                )
            else:
                self.optimizer.zero_grad(set_to_none=True)

        # ---- discriminator steps on the same batch, x̂₀ detached (no second denoiser forward). They follow the
        # denoiser's accumulation window: one `accumulate` per micro-batch only (accelerate counts every call), so the
        # discriminators skip the DDP all-reduce with `no_sync` and step exactly when the denoiser does.
        sync = accelerator.sync_gradients
        for term in self.terms:
            stats.update(term.discriminator_step(adversarial, sync, self.optimizer_step))
        return sync
