"""SADM structure-guided adversarial training: config and the two adversarial losses (METHODS.md §1.2-1.3).

The denoiser minimises and the structure discriminator E_φ maximises the weighted structural distance between the
real batch {x0_i} and the denoiser's predictions {x̂0_i} of the same samples:

    min_θ max_φ  L_DSM(θ) + λ · mean_i w(t_i) · S_i(E_φ(x0), E_φ(x̂0_θ))

with S_i from [`sadm.losses.structure.structure_loss`] ('paired', the original recipe) or the row shares of an
unbiased MMD² between reverse-step samples ('mmd', [`sadm.losses.structure.mmd_loss`]; consistent with the DSM optimum,
docs/METHODS.md), and w(t) from [`sadm.losses.structure.structure_timestep_weights`]. One denoiser forward gives x̂0;
[`structure_inputs`] turns (x0, x̂0, x_t) into what E_φ compares, once, for both steps:

    inputs = structure_inputs(x0, x̂0, t, ᾱ, config, x_t, generator)
    denoiser step:       L_DSM + λ * structure_denoiser_loss(E_φ, inputs, config)[0].mean()     (E_φ frozen)
    discriminator step:  structure_discriminator_loss(E_φ, inputs, config)[0].mean()            (x̂0 detached, E_φ trained)

with λ = `structure_weight_at(step, config)`, times [`adaptive_structure_weight`] / weight under `config.grad_ratio`.

Global scope (relations over the batch of every process): pass `gather=all_gather_with_grad` and
`process_index=accelerator.process_index` with `StructureConfig(scope="global")`. The relations are then built over
the gathered batch (in process order, equal local batch sizes) and both losses return the per-sample loss of **this
process's rows only** (rows `process_index * B : (process_index + 1) * B`), so the caller reduces with `.mean()` exactly
as in the local case. With a gather whose backward sums the gradients of every process into the owner's slice (as
`torch.distributed.nn.functional.all_gather` does), the columns that other processes' rows take from this process's
embeddings send their gradients here, and DDP's gradient averaging yields the gradient of the global mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from sadm.losses.structure import (
    mmd_loss,
    relation_entropy,
    renoise,
    reverse_step_posterior,
    structure_loss,
    timestep_weights,
)
from sadm.term_weights import gradient_ratio_weight, ramped_weight


@dataclass
class StructureConfig:
    """
    Options of the SADM structure loss and its adversarial schedule (METHODS.md §1.2-1.3; every piece is ours since
    the paper's code is not public). The defaults are deliberately gentle: METHODS.md §1.2 item 7 measured that
    λ >= 0.05, or gating only at t < 500, destroyed digit samples, while λ = 0.01 at t < 100 did not collapse.
    """

    weight: float = field(
        default=0.0,
        metadata={
            "help": "λ, the weight of the structure loss in the denoiser objective (the cap of λ with grad_ratio); 0 "
            "= off. Off: no variant has beaten DSM-only on the digits benchmark (docs/BENCHMARKS.md); for 'paired', "
            "0.01 was the only value of the digits prototype that did not collapse the samples (0.05 and 0.5 did)."
        },
    )
    relation: str = field(
        default="softmax",
        metadata={
            "help": "Relation matrix among a batch: 'softmax' (A_ij = softmax_j(<z_i,z_j>/tau), j != i) or "
            "'distance' (D_ij = ||z_i - z_j|| / mean distance). 'softmax' is the METHODS.md §1.2 default."
        },
    )
    distance: str | None = field(
        default=None,
        metadata={
            "help": "Comparison of row i of the real and fake relations ('paired' only): 'kl' (softmax only), 'l1', 'l2' "
            "or 'huber'. None means 'kl' for 'paired', the natural divergence between the softmax rows (METHODS.md "
            "§1.2 default); 'mmd' compares distributions, not rows, and takes none."
        },
    )
    temperature: float = field(
        default=0.1,
        metadata={
            "help": "tau of the softmax relation. 0.1: the METHODS.md §1.2 default (contrastive-learning scale)."
        },
    )
    huber_delta: float = field(
        default=0.1,
        metadata={
            "help": "delta of the 'huber' comparison. 0.1: distance relations are mean-normalised to O(1) entries, so "
            "differences above 0.1 count as outliers and get a linear penalty."
        },
    )
    timestep_weighting: str = field(
        default="threshold",
        metadata={
            "help": "Per-sample weight w(t): 'none', 'snr' (min(SNR_t, snr_clip) / snr_clip) or 'threshold' "
            "(1 if t < t_threshold else 0). 'threshold': gating to low noise was needed to avoid collapse "
            "(METHODS.md §1.2 items 5, 7)."
        },
    )
    snr_clip: float = field(
        default=5.0,
        metadata={"help": "Clip of the 'snr' weighting. 5.0: the Min-SNR-gamma value (Hang et al., 2023)."},
    )
    t_threshold: int = field(
        default=100,
        metadata={
            "help": "Timesteps t < t_threshold get weight 1 under 'threshold'. 100: t < 500 collapsed digits, "
            "t < 100 did not (METHODS.md §1.2 item 7)."
        },
    )
    warmup_steps: int = field(
        default=500,
        metadata={
            "help": "Steps of linear warm-up of λ from 0 (0 = no warm-up). 500: lets the discriminator learn a "
            "structure before it pushes the denoiser (METHODS.md §1.2 item 7 asks for a warm-up)."
        },
    )
    r1_gamma: float = field(
        default=0.0,
        metadata={
            "help": "gamma of the R1-style penalty gamma/2 * ||d<z_i, v_i>/dx0_i||^2 (v_i ~ N(0, I): a one-sample "
            "estimate of the encoder Jacobian's squared Frobenius norm) on real inputs in the discriminator step; "
            "0 = off. 0: spectral norm already bounds the default encoder, and R1 costs a double backward."
        },
    )
    disc_update_ratio: int = field(
        default=1,
        metadata={
            "help": "Discriminator steps per denoiser step (read by the training script). 1: the 1:1 schedule of "
            "METHODS.md §1.3."
        },
    )
    scope: str = field(
        default="local",
        metadata={
            "help": "'local': relations over each process's batch; 'global': over the batch gathered from every "
            "process (the script passes `gather`). 'local': no communication, identical to 'global' on one process."
        },
    )
    formulation: str = field(
        default="paired",
        metadata={
            "help": "'paired': row i of the relations among E(x0) vs among E(x̂0) (the original recipe; biased at the "
            "DSM optimum, docs/METHODS.md §1.2b); 'mmd': unbiased kernel MMD² between the real and the generated batch "
            "of reverse-step samples x_{t-k} (consistent with the DSM optimum up to O(k²β²)). 'paired': keeps the "
            "published results reproducible; see docs/BENCHMARKS.md for the comparison."
        },
    )
    reverse_step: int = field(
        default=10,
        metadata={
            "help": "k of 'mmd': real x_{t-k} ~ q(x_{t-k} | x_t, x0), fake x_{t-k} ~ p_θ(x_{t-k} | x_t) (x̂0 in the same "
            "closed form, the posterior variance, shared noise); rows with t < k are inactive. 10: on the exact-posterior "
            "toy (tests/test_structure_consistency.py) the bias stays below the noise floor while the fake side "
            "still carries ~10x more of x̂0 than at k = 1."
        },
    )
    mmd_bandwidths: str = field(
        default="0.5,1,2",
        metadata={
            "help": "Comma-separated bandwidths h of the Gaussian kernels of 'mmd' (their mean is the kernel), on unit-norm "
            "embeddings (squared distances in [0, 4]). 0.5,1,2: spans the range of those distances."
        },
    )
    renoise_offset: int | None = field(
        default=None,
        metadata={
            "help": "Re-noise both sides before the encoder to level t + offset (clamped to T-1) with shared noise: "
            "Diffusion-GAN's non-leaking trick, drowning the blur of x̂0 while keeping coarse structure. None: off."
        },
    )
    columns: str = field(
        default="all",
        metadata={
            "help": "'paired' only: 'all' builds relations over the whole batch (the original recipe); 'active' over the "
            "active (w(t) > 0) sub-batch only, so a row is never compared with blurry high-t columns it cannot change. "
            "'mmd' always uses the active sub-batch."
        },
    )
    min_active: int = field(
        default=4,
        metadata={
            "help": "Smallest active sub-batch ('mmd', or columns='active') for which the term is computed; smaller "
            "steps contribute 0. 4: the unbiased MMD² and the relations need pairs, and 2-3 rows are mostly noise."
        },
    )
    grad_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive λ (the rule of diffusers' VQGAN example): each step λ = min(weight, grad_ratio · "
            "‖∇L_DSM‖ / ‖∇L_struct‖), both gradients taken at the denoiser's output, so `weight` is the cap. None: λ = "
            "weight. Useful for 'mmd', whose gradient at x̂0 is scaled by the small reverse-step coefficient."
        },
    )
    gate_fake_gradients: bool = field(
        default=True,
        metadata={
            "help": "In the denoiser step, scale the gradient reaching each fake embedding z_j by its own weight "
            "w(t_j) (values unchanged), so a sample with w = 0 is only a fixed anchor in the other rows. Without it a "
            "low-noise row still pulls on the blurry high-noise x̂0_j through column j (METHODS.md §1.2 item 5)."
        },
    )

    def __post_init__(self):
        if self.formulation not in ("paired", "mmd"):
            raise ValueError(f"`formulation` must be 'paired' or 'mmd', got {self.formulation!r}.")
        if self.weight < 0:
            raise ValueError(f"`weight` must be >= 0, got {self.weight}.")
        if self.relation not in ("softmax", "distance"):
            raise ValueError(f"`relation` must be 'softmax' or 'distance', got {self.relation!r}.")
        if self.formulation == "mmd" and self.distance is not None:
            raise ValueError(
                f"distance={self.distance!r} compares paired rows; formulation='mmd' is an unpaired two-sample distance "
                "with no `distance` option. Drop it, or use formulation='paired'."
            )
        if self.formulation == "paired" and self.distance is None:
            self.distance = "kl"  # the documented default of 'paired'
        if self.formulation == "paired" and self.distance not in ("kl", "l1", "l2", "huber"):
            raise ValueError(f"`distance` must be one of 'kl', 'l1', 'l2', 'huber', got {self.distance!r}.")
        if self.formulation == "paired" and self.distance == "kl" and self.relation != "softmax":
            raise ValueError(
                f"distance='kl' needs relation='softmax', got relation={self.relation!r}; use distance='l1', 'l2' or "
                "'huber' with relation='distance'."
            )
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.huber_delta <= 0:
            raise ValueError(f"`huber_delta` must be > 0, got {self.huber_delta}.")
        if self.timestep_weighting not in ("none", "snr", "threshold"):
            raise ValueError(
                f"`timestep_weighting` must be one of 'none', 'snr', 'threshold', got {self.timestep_weighting!r}."
            )
        if self.snr_clip <= 0:
            raise ValueError(f"`snr_clip` must be > 0, got {self.snr_clip}.")
        if self.t_threshold < 1:
            raise ValueError(f"`t_threshold` must be >= 1 (0 would switch the loss off), got {self.t_threshold}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}.")
        if self.r1_gamma < 0:
            raise ValueError(f"`r1_gamma` must be >= 0, got {self.r1_gamma}.")
        if self.disc_update_ratio < 1:
            raise ValueError(f"`disc_update_ratio` must be >= 1, got {self.disc_update_ratio}.")
        if self.scope not in ("local", "global"):
            raise ValueError(f"`scope` must be 'local' or 'global', got {self.scope!r}.")
        if self.columns not in ("all", "active"):
            raise ValueError(f"`columns` must be 'all' or 'active', got {self.columns!r}.")
        if self.min_active < 2:
            raise ValueError(f"`min_active` must be >= 2 (relations and MMD² need pairs), got {self.min_active}.")
        if self.renoise_offset is not None and self.renoise_offset < 0:
            raise ValueError(
                f"`renoise_offset` must be >= 0 (re-noising goes to t + offset >= t), got {self.renoise_offset}."
            )
        try:
            bandwidths = tuple(float(h) for h in self.mmd_bandwidths.split(","))
        except ValueError:
            raise ValueError(
                f"`mmd_bandwidths` must be comma-separated numbers, got {self.mmd_bandwidths!r}."
            ) from None
        if not bandwidths or min(bandwidths) <= 0:
            raise ValueError(f"`mmd_bandwidths` must be positive numbers, got {self.mmd_bandwidths!r}.")
        self.bandwidths = bandwidths  # parsed once, not a field
        if self.grad_ratio is not None and self.grad_ratio <= 0:
            raise ValueError(f"`grad_ratio` must be None or > 0, got {self.grad_ratio}.")
        if self.formulation == "mmd":
            if self.timestep_weighting == "snr":
                raise ValueError(
                    "formulation='mmd' gates rows (timestep_weighting 'none' or 'threshold'); 'snr' weights would "
                    "make the two-sample estimate biased. Use 'none' or 'threshold'."
                )
            if self.reverse_step < 1:
                raise ValueError(f"`reverse_step` (k) must be >= 1, got {self.reverse_step}.")
            if self.timestep_weighting == "threshold" and self.reverse_step >= self.t_threshold:
                raise ValueError(
                    f"`reverse_step` k={self.reverse_step} needs t >= k, but timestep_weighting='threshold' keeps only "
                    f"t < t_threshold={self.t_threshold}: no row would ever be active. Lower k or raise the threshold."
                )
        if self.columns == "active" and self.formulation != "paired":
            raise ValueError(
                "`columns` applies to formulation='paired' only ('mmd' always uses the active sub-batch)."
            )

    @property
    def noise_conditional(self) -> bool:
        """Whether the encoder sees noised samples and must be conditioned on their level (E_φ(x, s))."""
        return self.formulation == "mmd" or self.renoise_offset is not None

    @property
    def uses_active_subbatch(self) -> bool:
        return self.formulation == "mmd" or self.columns == "active"

    def check_schedule(self, num_train_timesteps: int) -> None:
        """Validate the options that depend on the noise schedule's length T (called by the script before training)."""
        if self.formulation == "mmd" and self.reverse_step > num_train_timesteps - 1:
            raise ValueError(
                f"`reverse_step` k={self.reverse_step} must lie in [1, T-1] = [1, {num_train_timesteps - 1}]."
            )
        if self.renoise_offset is not None:
            top = (self.t_threshold - 1 if self.timestep_weighting == "threshold" else 0) + self.renoise_offset
            if top > num_train_timesteps - 1:
                raise ValueError(
                    f"`renoise_offset` {self.renoise_offset} leaves no room below T={num_train_timesteps}: the active "
                    f"rows would be re-noised up to level {top} > T-1. Lower the offset (or the t_threshold)."
                )


# SADM λ schedule (METHODS.md §1.3): linear warm-up of the structure weight
def structure_weight_at(step: int, config: StructureConfig) -> float:
    """
    λ at a global step: `config.weight * min(1, step / config.warmup_steps)` (0 at step 0), or `config.weight` when
    `config.warmup_steps == 0` (see [`~sadm.term_weights.ramped_weight`]).
    """
    return ramped_weight(step, config.weight, config.warmup_steps)


# adaptive λ from the ratio of gradient norms at the denoiser's output (Esser et al. 2021, eq. 7; diffusers' VQGAN example)
def adaptive_structure_weight(
    loss_dsm: torch.Tensor, loss_struct: torch.Tensor, output: torch.Tensor, config: StructureConfig
) -> torch.Tensor:
    """
    λ = min(config.weight, config.grad_ratio · ‖∂L_DSM/∂output‖ / ‖∂L_struct/∂output‖) as a detached 0-d tensor (no host
    sync): the structure term then pushes the denoiser's output with `grad_ratio` times the strength of the denoising
    loss. `loss_dsm` and `loss_struct` are the scalars of this micro-batch, `output` the model output they depend on.
    """
    return gradient_ratio_weight(loss_dsm, loss_struct, output, config.grad_ratio, config.weight)[0]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate `tensor` `[B, ...]` from every process in rank order -> `[world_size * B, ...]`, with autograd: the
    backward sums every process's gradient for a slice into its owner. Identity without an initialised process group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    if torch.distributed.get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)  # world_size x [B, ...] -> [world_size * B, ...]


def _check_inputs(inputs: StructureInputs, gathered: bool) -> None:
    if inputs.real.shape != inputs.fake.shape:
        raise ValueError(
            f"The real and fake inputs must have the same shape, got {tuple(inputs.real.shape)} and "
            f"{tuple(inputs.fake.shape)}."
        )
    batch = inputs.real.shape[0]
    if inputs.weights.shape != (batch,) or inputs.levels.shape != (batch,):
        raise ValueError(
            f"`weights` and `levels` must have shape [{batch}], got {tuple(inputs.weights.shape)} and "
            f"{tuple(inputs.levels.shape)}."
        )
    if batch < (1 if gathered else 2):
        raise ValueError(
            f"The structure loss needs pairs of samples, got a batch of {batch}; use a batch size >= 2 "
            "(or scope='global' with a gather across processes)."
        )


@dataclass
class StructureInputs:
    """
    What the structure discriminator compares in one training step, built once by [`structure_inputs`] and shared by
    the denoiser step and the discriminator step (which uses `detach()`).

    Args:
        real (`torch.Tensor` of shape `(B, C, H, W)`): The real side: x0, or x_{t-k} ~ q(· | x_t, x0) ('mmd'),
            possibly re-noised.
        fake (`torch.Tensor` of shape `(B, C, H, W)`): The generated side, attached to the graph of x̂0.
        levels (`torch.Tensor` of shape `(B,)`): Integer diffusion level of both sides (−1 = clean); a noise-conditional
            encoder gets `levels + 1` as its timestep (0 = clean).
        weights (`torch.Tensor` of shape `(B,)`): float32 w(t_i); 0 marks a row that takes no part (gated out, or t < k).
    """

    real: torch.Tensor
    fake: torch.Tensor
    levels: torch.Tensor
    weights: torch.Tensor

    def detach(self) -> StructureInputs:
        return StructureInputs(self.real, self.fake.detach(), self.levels, self.weights)


# SADM inputs (docs/METHODS.md §1.2b): clean pairs ('paired'), or reverse-step samples ('mmd'); optional re-noising
def structure_inputs(
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: StructureConfig,
    x_t: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StructureInputs:
    r"""
    Build what the encoder compares from one denoiser forward (no second forward):

    - `'paired'`: real = x0, fake = x̂0, at level −1 (clean).
    - `'mmd'`: with s = t − k, real = μ̃(x_t, x0) + σ̃·n and fake = μ̃(x_t, x̂0) + σ̃·n, the closed-form posterior
      q(x_s | x_t, x0) and the ancestral reverse step p_θ(x_s | x_t) with the posterior variance, with the same noise
      n for both (common random numbers: the marginals are unchanged, the estimate is less noisy). Rows with t < k are
      inactive (weight 0).
    - With `renoise_offset`: both sides are then diffused further to u = min(t + offset, T − 1) with shared noise.

    Args:
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): Real clean samples.
        x0_hat (`torch.Tensor` of shape `(B, C, H, W)`): The denoiser's x̂0, attached to its graph.
        timesteps (`torch.Tensor` of shape `(B,)`): Integer t of the denoiser's inputs.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): ᾱ of the noise schedule.
        config ([`StructureConfig`]): Options.
        x_t (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): The denoiser's noised input; needed by 'mmd'.
        generator (`torch.Generator` or a list of B of them, *optional*): Source of the reverse-step and re-noising
            noise (one generator per sample: draws independent of the batch composition).

    Returns:
        [`StructureInputs`]
    """
    weights = timestep_weights(
        timesteps, alphas_cumprod, config.timestep_weighting, config.snr_clip, config.t_threshold
    )  # w(t), [B]
    real, fake = x0.detach(), x0_hat
    levels = torch.full_like(timesteps, -1)  # clean
    if config.formulation == "mmd":
        if x_t is None:
            raise ValueError("formulation='mmd' builds x_{t-k} from x_t: pass `x_t`.")
        weights = weights * (timesteps >= config.reverse_step)  # x_{t-k} exists only for t >= k
        levels = (timesteps - config.reverse_step).clamp(min=0)  # s = t − k (inactive rows: any valid s)
        mean_real, std = reverse_step_posterior(real, x_t, timesteps, levels, alphas_cumprod)
        mean_fake, _ = reverse_step_posterior(fake, x_t.detach(), timesteps, levels, alphas_cumprod)
        noise = randn_tensor(real.shape, generator, real.device, real.dtype)  # shared by both sides
        real, fake = mean_real + std * noise, mean_fake + std * noise
    if config.renoise_offset is not None:
        target = (timesteps + config.renoise_offset).clamp(max=alphas_cumprod.shape[0] - 1)  # u = t + offset >= s
        noise = randn_tensor(real.shape, generator, real.device, real.dtype)  # shared by both sides
        real = renoise(real, levels, target, alphas_cumprod, noise)
        fake = renoise(fake, levels, target, alphas_cumprod, noise)
        levels = target
    return StructureInputs(real=real, fake=fake, levels=levels, weights=weights)


def _gather_rows(
    tensors: tuple[torch.Tensor, ...],
    config: StructureConfig,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    process_index: int,
) -> tuple[tuple[torch.Tensor, ...], slice]:
    """Gather every tensor `[B, ...]` -> `[N, ...]` and return the slice of this process's rows in the gathered batch."""
    local_batch = tensors[0].shape[0]
    if gather is None:
        return tensors, slice(0, local_batch)
    if config.scope != "global":
        raise ValueError(f"A `gather` was passed but config.scope={config.scope!r}; set scope='global' or drop it.")
    gathered = tuple(gather(t) for t in tensors)
    total = gathered[0].shape[0]
    if total % local_batch != 0:
        raise ValueError(
            f"The gathered batch has {total} rows, not a multiple of the local batch {local_batch}; global scope "
            "needs equal batch sizes on every process."
        )
    if not 0 <= process_index < total // local_batch:
        raise ValueError(f"`process_index` must lie in [0, {total // local_batch - 1}], got {process_index}.")
    return gathered, slice(process_index * local_batch, (process_index + 1) * local_batch)


def _embed_pair(
    discriminator: nn.Module,
    inputs: StructureInputs,
    config: StructureConfig,
    class_labels: torch.Tensor | None,
    real: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Embed real and fake samples in ONE forward, so both see the same network state (spectral-norm power iteration,
    BatchNorm batch): identical inputs then give identical embeddings even in train mode. A noise-conditional encoder
    gets the level of the inputs (`levels + 1`, 0 = clean) as its timestep. `real` replaces `inputs.real` (the R1 leaf).
    """
    real = inputs.real if real is None else real
    batch = real.shape[0]
    labels = None if class_labels is None else torch.cat([class_labels, class_labels])  # [2B]
    x = torch.cat([real.to(inputs.fake.dtype), inputs.fake])  # 2 x [B, C, H, W] -> [2B, C, H, W]
    kwargs = {"timestep": torch.cat([inputs.levels, inputs.levels]) + 1} if config.noise_conditional else {}
    z = discriminator(x, class_labels=labels, **kwargs).embeddings.float()  # [2B, d]
    return z[:batch], z[batch:]  # [2B, d] -> [B, d], [B, d]


def _structure_per_row(
    z_real: torch.Tensor, z_fake: torch.Tensor, weights: torch.Tensor, config: StructureConfig
) -> torch.Tensor:
    """w_i · S_i `[N]` over the (gathered) batch: the paired relation loss, or the MMD² share of row i.

    On the active sub-batch A (w > 0; fixed shapes, no host sync) the rows are scaled by N / |A|, so that their mean
    over all N rows is the mean over A; a sub-batch smaller than `config.min_active` contributes 0."""
    if not config.uses_active_subbatch:
        per_row = structure_loss(
            z_real, z_fake, config.relation, config.distance, config.temperature, config.huber_delta
        )
        return weights * per_row  # w(t_i) * S_i, [N]
    active = weights > 0  # [N]
    if config.formulation == "mmd":
        per_row = mmd_loss(z_real, z_fake, config.bandwidths, mask=active)  # MMD² share of row i over A, [N]
    else:
        per_row = structure_loss(
            z_real, z_fake, config.relation, config.distance, config.temperature, config.huber_delta, mask=active
        )  # S_i over the sub-batch, [N]
    count = active.sum()
    scale = (count >= config.min_active).float() * weights.shape[0] / count.clamp(min=1)  # N / |A|, or 0
    return weights * per_row * scale


# SADM denoiser step (METHODS.md §1.3): minimise λ · w(t) · S(E_φ(real), E_φ(fake_θ)) with φ frozen
def structure_denoiser_loss(
    discriminator: nn.Module,
    inputs: StructureInputs,
    config: StructureConfig,
    class_labels: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    process_index: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    Structure loss of the denoiser step: `w(t_i) * S_i` per sample, gradients flowing only into `inputs.fake`.

    Real and fake samples go through E_φ in one forward (see `_embed_pair`); the real embeddings are detached, so
    the real branch carries no gradient to anything. The caller freezes the discriminator with
    `requires_grad_(False)` (checked here) and multiplies the result by `structure_weight_at(step, config)`. With
    `config.gate_fake_gradients`, the gradient into each fake embedding z_j is scaled by w(t_j) (see
    [`StructureConfig`]). S_i is the paired relation loss, or row i's share of the MMD² ('mmd'; see
    [`sadm.losses.structure.mmd_loss`]).

    Args:
        discriminator (`nn.Module`): The (frozen) [`StructureDiscriminator`], possibly wrapped by accelerate.
        inputs ([`StructureInputs`]): From [`structure_inputs`], `fake` attached to the denoiser's graph.
        config ([`StructureConfig`]): Options.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): Class ids, when the discriminator is conditional.
        gather (`Callable`, *optional*): Gathers `[B, ...]` -> `[N, ...]` across processes with autograd (e.g.
            [`all_gather_with_grad`]); needs `config.scope == "global"`. See the module docstring.
        process_index (`int`, defaults to 0): This process's rank, locating its rows in the gathered batch.

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: the per-sample loss `[B]` (this process's rows) and detached
        0-d statistics `loss_struct`, `struct_real_entropy`, `struct_fake_entropy`, `struct_weight_mean`.
    """
    _check_inputs(inputs, gathered=gather is not None)
    if any(p.requires_grad for p in discriminator.parameters()):
        raise ValueError(
            "structure_denoiser_loss: the discriminator has parameters with requires_grad=True; freeze it with "
            "`discriminator.requires_grad_(False)` for the denoiser step."
        )
    weights = inputs.weights  # w(t), [B]
    z_real, z_fake = _embed_pair(discriminator, inputs, config, class_labels)  # [B, d] each
    z_real = z_real.detach()  # the real branch carries no gradient to anything
    if config.gate_fake_gradients and not config.uses_active_subbatch:
        # same values; d(z_fake_j)/d(x0_hat_j) is scaled by w_j, so samples with w = 0 stay fixed anchors
        z_fake = z_fake.detach() + weights[:, None] * (z_fake - z_fake.detach())

    (z_real, z_fake, weights), rows = _gather_rows((z_real, z_fake, weights), config, gather, process_index)
    loss = _structure_per_row(z_real, z_fake, weights, config)[rows]  # w(t_i) * S_i, [B]

    stats = {
        "loss_struct": loss.detach().mean(),
        "struct_real_entropy": relation_entropy(z_real.detach(), config.temperature),
        "struct_fake_entropy": relation_entropy(z_fake.detach(), config.temperature),
        "struct_weight_mean": weights[rows].detach().mean(),
    }
    return loss, stats


# SADM discriminator step (METHODS.md §1.3): maximise w(t) · S(E_φ(real), E_φ(sg(fake))), optional R1 on real inputs
def structure_discriminator_loss(
    discriminator: nn.Module,
    inputs: StructureInputs,
    config: StructureConfig,
    class_labels: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    process_index: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    Loss of the discriminator step, `−w(t_i) * S_i (+ r1_gamma / 2 * R1_i)` per sample: the discriminator maximises
    the structural distance. Gradients flow only into the discriminator (inputs are detached here).

    R1-style penalty (when `config.r1_gamma > 0`): R1_i = ‖∂⟨z_i, v_i⟩/∂real_i‖² with v_i ~ N(0, I_d) drawn afresh,
    an unbiased one-sample (Hutchinson) estimate of ‖∂z_i/∂real_i‖²_F, the squared Frobenius norm of the encoder's
    Jacobian at the real input; it is the vector-output analogue of R1's ‖∇_x D(x)‖² and bounds how fast the
    embedding moves with the input. (The tempting ‖∇ Σ_i ⟨z_i, sg(z_i)⟩‖² is identically 0 for L2-normalised z.)

    Args:
        discriminator (`nn.Module`): The trainable [`StructureDiscriminator`], possibly wrapped by accelerate.
        inputs ([`StructureInputs`]): From [`structure_inputs`] (detached here anyway).
        config ([`StructureConfig`]): Options.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): Class ids, when the discriminator is conditional.
        gather (`Callable`, *optional*): As in [`structure_denoiser_loss`].
        process_index (`int`, defaults to 0): As in [`structure_denoiser_loss`].

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: the per-sample loss `[B]` (this process's rows) and detached
        0-d statistics `loss_struct` (mean w·S, the value the discriminator raises), `struct_real_entropy`,
        `struct_fake_entropy`, and `struct_r1` when the penalty is on.
    """
    _check_inputs(inputs, gathered=gather is not None)
    inputs = inputs.detach()
    # a leaf of its own, so the caller's tensor never gets a grad
    real = inputs.real.detach().requires_grad_(config.r1_gamma > 0)
    z_real, z_fake = _embed_pair(discriminator, inputs, config, class_labels, real=real)  # [B, d] each, graph into φ

    r1 = None
    if config.r1_gamma > 0:
        probe = torch.randn_like(z_real)  # v_i ~ N(0, I_d), [B, d]
        (grad,) = torch.autograd.grad(
            (z_real * probe).sum(), real, create_graph=True
        )  # ∂Σ_i⟨z_i, v_i⟩/∂real, [B, C, H, W]
        r1 = grad.flatten(1).pow(2).sum(dim=1)  # [B, C, H, W] -> [B, C*H*W] -> R1_i, [B]

    (z_real, z_fake, weights), rows = _gather_rows((z_real, z_fake, inputs.weights), config, gather, process_index)
    structure = _structure_per_row(z_real, z_fake, weights, config)[rows]  # w(t_i) * S_i, [B]
    loss = -structure
    if r1 is not None:
        loss = loss + config.r1_gamma / 2 * r1

    stats = {
        "loss_struct": structure.detach().mean(),
        "struct_real_entropy": relation_entropy(z_real.detach(), config.temperature),
        "struct_fake_entropy": relation_entropy(z_fake.detach(), config.temperature),
    }
    if r1 is not None:
        stats["struct_r1"] = r1.detach().mean()
    return loss, stats
