"""Adversarial terms of the DiT trainer: one class per method, each owning its discriminator and its two phases.

A term is added to the denoiser's loss in the denoiser step and trains its own discriminator right after, on the same
micro-batch with x̂₀ detached (no second denoiser forward). Each term owns its config, its discriminator and optimizer
(prepared by accelerate), the generator-side loss, the discriminator step(s), the state it needs in `train_state.json`,
what it writes next to the exported pipeline, and the statistics it logs. [`sadm.step.DenoiserTrainStep`] composes
them; a further method (e.g. a REPA-style alignment term) is one subclass of [`AdversarialTerm`] registered with
[`register_adversarial_term`].

    loss = objective(...) + Σ_terms term.generator_loss(batch)[0]     (discriminators frozen)
    backward, denoiser step
    for term in terms: term.discriminator_step(batch, sync, optimizer_step)

With a [`~sadm.disc_augment.DiffAugment`] on the batch, each term augments what its discriminator sees, real and fake
with one draw per sample, the same for both phases: the timestep discriminator's view in `begin_step` (before any
term's loss), the structure encoder's inputs once they are built (after the reverse step of 'mmd').

Both phases follow the denoiser's accumulation window: the discriminator steps skip DDP's all-reduce with `no_sync`
on accumulating micro-batches and step exactly when the denoiser does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from .checkpointing import register_state_hooks
from .diffusion_augment import AdaptiveDiffusion
from .diffusion_gan import DiffusionGANConfig, diffusion_gan_discriminator_loss, diffusion_gan_generator_loss
from .disc_augment import DiffAugment
from .losses.structure import timestep_weights
from .objective import DenoisingResult, NoisedBatch
from .randomness import sample_generators
from .structure import (
    StructureConfig,
    StructureInputs,
    all_gather_with_grad,
    structure_denoiser_loss,
    structure_discriminator_loss,
    structure_inputs,
    structure_weight_at,
)
from .term_weights import gradient_ratio_weight, ramped_weight

# (model name, model, optimizer, global step, LR scheduler) -> (finite, gradient norm): clip, step if finite, count
OptimizerStep = Callable[..., tuple[bool, torch.Tensor]]


class SampleStreams:
    """The per-sample random streams of one micro-batch, made on first use (`--per_sample_noise`).

    Stream 0: label dropout, t and ε (the objective); 1: the Diffusion-GAN term's denoiser side; 2: its discriminator
    side; 3: the structure term's reverse-step and re-noising noise; 4: DiffAugment's draws (`--disc_augment`). Without
    sample keys every stream is None (the global RNG).

    Args:
        seed (`int`): the run's seed.
        sample_keys (`torch.LongTensor` of shape `[B]`, *optional*): each sample's key (`EpochShuffleSampler`).
        device (`torch.device`): where the generators draw.
    """

    def __init__(self, seed: int, sample_keys: torch.Tensor | None, device: torch.device | str):
        self.seed, self.sample_keys, self.device = seed, sample_keys, device
        self._made: dict[int, list[torch.Generator]] = {}

    def get(self, stream: int) -> list[torch.Generator] | None:
        """One generator per sample for `stream` (see `sadm.randomness.sample_generators`), or None (global RNG)."""
        if self.sample_keys is None:
            return None
        if stream not in self._made:
            self._made[stream] = sample_generators(self.seed, self.sample_keys, stream, self.device)
        return self._made[stream]


@dataclass
class AdversarialBatch:
    """What every adversarial term sees of one micro-batch, built once by the train step.

    Args:
        noised ([`~sadm.objective.NoisedBatch`]): x₀, the true labels, t, ε, x_t.
        result ([`~sadm.objective.DenoisingResult`]): L_DSM `[B]`, the model output and x̂₀.
        real (`torch.Tensor` of shape `[B, C, H, W]`): what the discriminators see of x₀ (decoded, clamped).
        fake (`torch.Tensor` of shape `[B, C, H, W]`): the same view of x̂₀, attached to the denoiser's graph.
        alphas_cumprod (`torch.Tensor` of shape `[T]`): ᾱ of the denoiser's noise schedule.
        step (`int`): the global step (λ warm-up).
        streams ([`SampleStreams`]): the per-sample random streams (all None: the global RNG).
        augment ([`~sadm.disc_augment.DiffAugment`], *optional*): DiffAugment of what the discriminators see (stream 4).
    """

    noised: NoisedBatch
    result: DenoisingResult
    real: torch.Tensor
    fake: torch.Tensor
    alphas_cumprod: torch.Tensor
    step: int
    streams: SampleStreams
    augment: DiffAugment | None = None

    def generators(self, stream: int) -> list[torch.Generator] | None:
        return self.streams.get(stream)

    def augmented(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(real, fake)` through DiffAugment with one draw per sample shared by both (stream 4), or as they are."""
        if self.augment is None:
            return real, fake
        return self.augment(real, fake, generator=self.generators(4))


class AdversarialTerm:
    """Base class of a term: a discriminator with its optimizer and config, and the two phases of one step.

    Subclasses set `name` (the registry key and the config's name in the tracker) and `model_name` (the subfolder of
    the discriminator in checkpoints and exports), and implement `generator_loss` and `discriminator_step`.
    """

    name: str = ""
    model_name: str = ""

    def __init__(self, config, discriminator: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator):
        if config.weight <= 0:
            raise ValueError(f"{type(self).__name__} needs config.weight > 0, got {config.weight} (0 means: no term).")
        self.config, self.discriminator, self.optimizer, self.accelerator = (
            config,
            discriminator,
            optimizer,
            accelerator,
        )
        self.lr_scheduler = None  # set by `prepare`
        self.window: list = []  # records of the open accumulation window (ratio > 1 with accumulation only)

    def prepare(self, lr_scheduler=None) -> None:
        """`accelerate.prepare` the discriminator, its optimizer and its optional LR scheduler (stepped with every
        finite discriminator step; its state goes into the checkpoints), and register any extra checkpoint state."""
        if lr_scheduler is None:
            self.discriminator, self.optimizer = self.accelerator.prepare(self.discriminator, self.optimizer)
        else:
            self.discriminator, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
                self.discriminator, self.optimizer, lr_scheduler
            )

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.discriminator)

    def begin_step(self, batch: AdversarialBatch) -> None:
        """Called for every term, in order, before any term's `generator_loss`: per-micro-batch draws that both phases
        share (the default draws nothing)."""

    def generator_loss(self, batch: AdversarialBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The weighted scalar added to the denoiser's loss, with its discriminator frozen, and named statistics."""
        raise NotImplementedError

    def discriminator_record(self, batch: AdversarialBatch):
        """What one discriminator pass needs of this micro-batch, detached from the denoiser's graph."""
        raise NotImplementedError

    def discriminator_pass(self, record) -> dict[str, torch.Tensor | float]:
        """Forward and `accelerator.backward` of the discriminator's loss on one record; returns statistics."""
        raise NotImplementedError

    def after_discriminator_step(self, finite: bool, grad_norm: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """Called after each optimizer step of the discriminator (skipped or not); returns statistics."""
        return {}

    def discriminator_step(
        self, batch: AdversarialBatch, sync: bool, optimizer_step: OptimizerStep
    ) -> dict[str, torch.Tensor | float]:
        """Train the discriminator on the batch with x̂₀ detached: `config.disc_update_ratio` optimizer steps per
        denoiser step, each over the denoiser's whole accumulation window.

        Without accumulation (or at ratio 1) each micro-batch's passes run now and the optimizer steps when `sync`.
        With accumulation and ratio > 1 the micro-batches' records are kept until the window closes, then every one of
        the ratio steps accumulates over all of them (DDP's all-reduce on the last only), so ratio k with accumulation
        A equals ratio k on the A-times larger batch.
        """
        self.unwrapped.requires_grad_(True)
        record = self.discriminator_record(batch)
        records = [record]
        if self.config.disc_update_ratio > 1 and self.accelerator.gradient_accumulation_steps > 1:
            self.window.append(record)
            if not sync:
                return {}
            records, self.window = self.window, []
        stats: dict[str, torch.Tensor | float] = {}
        for _ in range(self.config.disc_update_ratio):
            for i, rec in enumerate(records):
                with self._accumulating(sync and i == len(records) - 1):
                    stats.update(self.discriminator_pass(rec))
            if sync:
                finite, grad_norm = optimizer_step(
                    self.model_name, self.discriminator, self.optimizer, batch.step, self.lr_scheduler
                )
                stats.update(self.after_discriminator_step(finite, grad_norm))
        return stats

    def state_dict(self) -> dict:
        """JSON-serialisable state for `train_state.json` (model and optimizer states go through accelerate)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_pretrained(self, folder: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the discriminator (and what it needs) next to an exported pipeline; `state`: its weights gathered
        beforehand (`sadm.checkpointing.full_state_dict`, FSDP with several processes), else the module's own."""
        if state is None:
            self.unwrapped.save_pretrained(os.path.join(folder, self.model_name))
        else:
            from sadm.checkpointing import save_pretrained_state

            save_pretrained_state(self.unwrapped, state, os.path.join(folder, self.model_name))

    def _accumulating(self, sync: bool):
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.discriminator)


ADVERSARIAL_TERMS: dict[str, type[AdversarialTerm]] = {}


def register_adversarial_term(cls: type[AdversarialTerm]) -> type[AdversarialTerm]:
    """Class decorator: make a term known by its `name` (its checkpoint subfolder must be unique too)."""
    if not cls.name or not cls.model_name:
        raise ValueError(f"{cls.__name__} must set `name` and `model_name`.")
    taken = {c.model_name: n for n, c in ADVERSARIAL_TERMS.items() if n != cls.name}
    if cls.model_name in taken:
        raise ValueError(
            f"{cls.__name__}.model_name {cls.model_name!r} is already used by term {taken[cls.model_name]!r}."
        )
    ADVERSARIAL_TERMS[cls.name] = cls
    return cls


@register_adversarial_term
class StructureTerm(AdversarialTerm):
    r"""SADM's structure term (METHODS.md §1.2-1.3): λ·mean_i w(t_i)·S_i(E_φ(x₀), E_φ(x̂₀)) for the denoiser, and the
    structure discriminator E_φ trained on −S (+ R1) with the same inputs, x̂₀ detached.

    Args:
        config ([`~sadm.structure.StructureConfig`]): the options (λ, warm-up, formulation, ...).
        discriminator ([`~sadm.models.structure_discriminator.StructureDiscriminator`]): E_φ.
        optimizer (`torch.optim.Optimizer`): E_φ's optimizer.
        accelerator (`accelerate.Accelerator`): the run's accelerator (global scope gathers over its processes).
        class_conditional (`bool`, defaults to False): pass the true labels to E_φ.
    """

    name = "structure"
    model_name = "discriminator"

    def __init__(
        self,
        config: StructureConfig,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        class_conditional: bool = False,
    ):
        super().__init__(config, discriminator, optimizer, accelerator)
        self.class_conditional = class_conditional
        self.gather = all_gather_with_grad if config.scope == "global" else None
        self.inputs: StructureInputs | None = None  # built in the denoiser phase, reused by the discriminator phase

    def _labels(self, batch: AdversarialBatch) -> torch.Tensor | None:
        return batch.noised.labels if self.class_conditional else None

    def generator_loss(self, batch: AdversarialBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        cfg, noised = self.config, batch.noised
        frozen = self.unwrapped.requires_grad_(False)  # unwrapped: no DDP hooks in the denoiser step
        inputs = structure_inputs(
            batch.real, batch.fake, noised.timesteps, batch.alphas_cumprod, cfg, noised.x_t, batch.generators(3)
        )  # what E_φ compares, built once for both phases
        if batch.augment is not None:  # on what E_φ compares (after the reverse step of 'mmd')
            real, fake = batch.augmented(inputs.real, inputs.fake)
            inputs = dataclasses.replace(inputs, real=real, fake=fake)
        self.inputs = inputs
        loss_struct, s_stats = structure_denoiser_loss(
            frozen, self.inputs, cfg, self._labels(batch), self.gather, self.accelerator.process_index
        )
        lam = structure_weight_at(batch.step, cfg)  # λ, warm-up included
        stats = {"loss_struct": loss_struct.detach().mean()}
        if cfg.grad_ratio is not None:  # warm-up share of the gradient-norm λ (capped by weight)
            ratio_lam, stats["struct_grad_ratio"] = gradient_ratio_weight(
                batch.result.loss.mean(), loss_struct.mean(), batch.result.output, cfg.grad_ratio, cfg.weight
            )
            lam = lam / cfg.weight * ratio_lam
        stats["struct_lambda"] = lam
        stats.update(
            {f"{k}_fake_side" if k == "loss_struct" else k: v for k, v in s_stats.items() if k != "loss_struct"}
        )
        return lam * loss_struct.mean(), stats

    def discriminator_record(self, batch: AdversarialBatch) -> tuple[StructureInputs, torch.Tensor | None]:
        return self.inputs.detach(), self._labels(batch)

    def discriminator_pass(self, record) -> dict[str, torch.Tensor | float]:
        inputs, labels = record
        loss_d, d_stats = structure_discriminator_loss(
            self.discriminator, inputs, self.config, labels, self.gather, self.accelerator.process_index
        )
        self.accelerator.backward(loss_d.mean())  # divided by the accumulation steps, like the denoiser's
        return {"loss_struct_disc": loss_d.detach().mean(), **{f"disc_{k}": v for k, v in d_stats.items()}}

    def after_discriminator_step(self, finite: bool, grad_norm: torch.Tensor) -> dict[str, torch.Tensor | float]:
        return {"struct_disc_grad_norm": grad_norm}


@register_adversarial_term
class DiffusionGANTerm(AdversarialTerm):
    r"""The Diffusion-GAN term (arXiv 2206.02262) on x̂₀: λ_adv·mean_i w(t_i)·L_G(D(y(x̂₀_i), τ_i)) for the denoiser
    (λ_adv after `config.start_step`, warm-up and the optional gradient-norm rule, `sadm.term_weights`),
        the timestep discriminator D trained on diffused x₀ vs x̂₀ (+ lazy R1), and `AdaptiveDiffusion.update` on the
        gathered real logits of every finite discriminator step (r_d → p → T).

        w(t) is the gate `config.timestep_weighting` / `config.t_threshold` on the denoiser's timesteps (x̂₀ is a blurry
        posterior mean at high noise).

        Args:
            config ([`~sadm.diffusion_gan.DiffusionGANConfig`]): the options (λ_adv, preset, loss, R1, the gate).
            discriminator ([`~sadm.models.timestep_discriminator.TimestepDiscriminator`]): D(y, t[, class]).
            optimizer (`torch.optim.Optimizer`): D's optimizer.
            accelerator (`accelerate.Accelerator`): the run's accelerator.
            diffusion ([`~sadm.diffusion_augment.AdaptiveDiffusion`]): the adaptive forward diffusion, on the device.
    """

    name = "diffusion_gan"
    model_name = "timestep_discriminator"
    state_name = "adaptive_diffusion"

    def __init__(
        self,
        config: DiffusionGANConfig,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        diffusion: AdaptiveDiffusion,
    ):
        super().__init__(config, discriminator, optimizer, accelerator)
        self.diffusion = diffusion
        self.d_step = 0  # discriminator optimizer steps so far (the lazy R1 runs when d_step % r1_interval == 0)
        self.pending_real_logits: list[torch.Tensor] = []  # gathered real logits of the current D optimizer step
        self.weights: torch.Tensor | None = None  # w(t) of this micro-batch, shared by both phases
        self.view: tuple[torch.Tensor, torch.Tensor] | None = None  # D's (real, fake) of this micro-batch (augmented)
        self.last_r1: torch.Tensor | None = None

    def prepare(self, lr_scheduler=None) -> None:
        super().prepare(lr_scheduler)
        register_state_hooks(self.accelerator, {self.state_name: self.diffusion})

    def begin_step(self, batch: AdversarialBatch) -> None:
        self.view = batch.augmented(batch.real, batch.fake)  # DiffAugment drawn before the other terms' losses

    def generator_loss(self, batch: AdversarialBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        cfg = self.config
        frozen = self.unwrapped.requires_grad_(False)
        self.weights = timestep_weights(
            batch.noised.timesteps, batch.alphas_cumprod, cfg.timestep_weighting, t_threshold=cfg.t_threshold
        )  # [B]
        loss_g, g_stats = diffusion_gan_generator_loss(
            frozen, self.diffusion, self.view[1], batch.noised.labels, cfg, batch.generators(1)
        )
        loss_adv = (loss_g * self.weights).mean()
        stats = {"loss_gan_g": loss_adv.detach(), **g_stats}
        lam = ramped_weight(batch.step, cfg.weight, cfg.warmup_steps, cfg.start_step)  # start step and warm-up
        if cfg.grad_ratio is not None and lam > 0:  # that share of the gradient-norm λ_adv (capped by weight)
            ratio_lam, stats["gan_grad_ratio"] = gradient_ratio_weight(
                batch.result.loss.mean(), loss_adv, batch.result.output, cfg.grad_ratio, cfg.weight
            )
            lam = lam / cfg.weight * ratio_lam
        stats["gan_lambda"] = lam
        return lam * loss_adv, stats

    def discriminator_record(self, batch: AdversarialBatch):
        real, fake = self.view
        return real, fake.detach(), batch.noised.labels, self.weights, batch.generators(2)

    def discriminator_pass(self, record) -> dict[str, torch.Tensor | float]:
        real, fake, labels, weights, generators = record
        loss_d, stats, real_logits = diffusion_gan_discriminator_loss(
            self.discriminator, self.diffusion, real, fake, labels, self.config, self.d_step, generators
        )
        self.accelerator.backward((loss_d * weights).mean())
        self.pending_real_logits.append(self.accelerator.gather(real_logits))
        r1 = stats.pop("r1")  # NaN on D steps without the lazy R1: log the last computed value
        if self.config.r1_gamma > 0:
            self.last_r1 = r1 if self.last_r1 is None else torch.where(r1.isnan(), self.last_r1, r1)
            stats["r1"] = self.last_r1
        return stats

    def after_discriminator_step(self, finite: bool, grad_norm: torch.Tensor) -> dict[str, torch.Tensor | float]:
        self.d_step += 1
        if finite:  # r_d of a skipped step measures nothing the next step starts from
            self.diffusion.update(torch.cat(self.pending_real_logits))  # once per D step, global batch
        self.pending_real_logits.clear()
        return {"gan_disc_grad_norm": grad_norm, **{f"ada_{k}": v for k, v in self.diffusion.stats().items()}}

    def state_dict(self) -> dict:
        return {"d_step": self.d_step}

    def load_state_dict(self, state: dict) -> None:
        self.d_step = state["d_step"]

    def save_pretrained(self, folder: str, state: dict[str, torch.Tensor] | None = None) -> None:
        super().save_pretrained(folder, state)
        torch.save(self.diffusion.state_dict(), os.path.join(folder, self.model_name, f"{self.state_name}.pt"))
