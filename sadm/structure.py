"""SADM structure-guided adversarial training: config and the two adversarial losses (METHODS.md §1.2-1.3).

The denoiser minimises and the structure discriminator E_φ maximises the weighted structural distance between the
real batch {x0_i} and the denoiser's predictions {x̂0_i} of the same samples:

    min_θ max_φ  L_DSM(θ) + λ · mean_i w(t_i) · S_i(E_φ(x0), E_φ(x̂0_θ))

with S_i from [`sadm.losses.structure.structure_loss`] and w(t) from
[`sadm.losses.structure.structure_timestep_weights`]. One denoiser forward gives x̂0 for both steps:

    denoiser step:       L_DSM + structure_weight_at(step, config) * structure_denoiser_loss(...)[0]   (E_φ frozen)
    discriminator step:  structure_discriminator_loss(...)[0] with x̂0 detached                        (E_φ trained)

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
from torch import nn

from sadm.losses.structure import relation_entropy, structure_loss, structure_timestep_weights


@dataclass
class StructureConfig:
    """
    Options of the SADM structure loss and its adversarial schedule (METHODS.md §1.2-1.3; every piece is ours since
    the paper's code is not public). The defaults are deliberately gentle: METHODS.md §1.2 item 7 measured that
    λ >= 0.05, or gating only at t < 500, destroyed digit samples, while λ = 0.01 at t < 100 did not collapse.
    """

    weight: float = field(
        default=0.01,
        metadata={
            "help": "λ, the weight of the structure loss in the denoiser objective. 0.01: the only value in the "
            "digits prototype (METHODS.md §1.2 item 7) that did not collapse the samples; 0.05 and 0.5 did."
        },
    )
    relation: str = field(
        default="softmax",
        metadata={
            "help": "Relation matrix among a batch: 'softmax' (A_ij = softmax_j(<z_i,z_j>/tau), j != i) or "
            "'distance' (D_ij = ||z_i - z_j|| / mean distance). 'softmax' is the METHODS.md §1.2 default."
        },
    )
    distance: str = field(
        default="kl",
        metadata={
            "help": "Comparison of row i of the real and fake relations: 'kl' (softmax only), 'l1', 'l2' or 'huber'. "
            "'kl' is the natural divergence between the softmax rows (METHODS.md §1.2 default)."
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
    gate_fake_gradients: bool = field(
        default=True,
        metadata={
            "help": "In the denoiser step, scale the gradient reaching each fake embedding z_j by its own weight "
            "w(t_j) (values unchanged), so a sample with w = 0 is only a fixed anchor in the other rows. Without it a "
            "low-noise row still pulls on the blurry high-noise x̂0_j through column j (METHODS.md §1.2 item 5)."
        },
    )

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"`weight` must be >= 0, got {self.weight}.")
        if self.relation not in ("softmax", "distance"):
            raise ValueError(f"`relation` must be 'softmax' or 'distance', got {self.relation!r}.")
        if self.distance not in ("kl", "l1", "l2", "huber"):
            raise ValueError(f"`distance` must be one of 'kl', 'l1', 'l2', 'huber', got {self.distance!r}.")
        if self.distance == "kl" and self.relation != "softmax":
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


# SADM λ schedule (METHODS.md §1.3): linear warm-up of the structure weight
def structure_weight_at(step: int, config: StructureConfig) -> float:
    """
    λ at a global step: `config.weight * min(1, step / config.warmup_steps)` (0 at step 0), or `config.weight` when
    `config.warmup_steps == 0`.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if config.warmup_steps == 0:
        return config.weight
    return config.weight * min(1.0, step / config.warmup_steps)


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


def _check_inputs(x0: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor, gathered: bool) -> None:
    if x0.shape != x0_hat.shape:
        raise ValueError(
            f"`x0` and `x0_hat` must have the same shape, got {tuple(x0.shape)} and {tuple(x0_hat.shape)}."
        )
    if timesteps.shape != (x0.shape[0],):
        raise ValueError(f"`timesteps` must have shape [{x0.shape[0]}], got {tuple(timesteps.shape)}.")
    if x0.shape[0] < (1 if gathered else 2):
        raise ValueError(
            f"The structure loss needs pairs of samples, got a batch of {x0.shape[0]}; use a batch size >= 2 "
            "(or scope='global' with a gather across processes)."
        )


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
    discriminator: nn.Module, x0: torch.Tensor, x0_hat: torch.Tensor, class_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Embed real and fake samples in ONE forward, so both see the same network state (spectral-norm power iteration,
    BatchNorm batch): identical inputs then give identical embeddings even in train mode.
    """
    batch = x0.shape[0]
    labels = None if class_labels is None else torch.cat([class_labels, class_labels])  # [2B]
    x = torch.cat([x0.to(x0_hat.dtype), x0_hat])  # 2 x [B, C, H, W] -> [2B, C, H, W]
    z = discriminator(x, class_labels=labels).embeddings.float()  # [2B, d]
    return z[:batch], z[batch:]  # [2B, d] -> [B, d], [B, d]


# SADM denoiser step (METHODS.md §1.3): minimise λ · w(t) · S(E_φ(x0), E_φ(x̂0_θ)) with φ frozen
def structure_denoiser_loss(
    discriminator: nn.Module,
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: StructureConfig,
    class_labels: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    process_index: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    Structure loss of the denoiser step: `w(t_i) * S_i` per sample, gradients flowing only into `x0_hat`.

    Real and fake samples go through E_φ in one forward (see `_embed_pair`); the real embeddings are detached, so
    the real branch carries no gradient to anything. The caller freezes the discriminator with
    `requires_grad_(False)` (checked here) and multiplies the result by `structure_weight_at(step, config)`. With
    `config.gate_fake_gradients`, the gradient into each fake embedding z_j is scaled by w(t_j) (see
    [`StructureConfig`]).

    Args:
        discriminator (`nn.Module`): The (frozen) [`StructureDiscriminator`], possibly wrapped by accelerate.
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): Real clean samples.
        x0_hat (`torch.Tensor` of shape `(B, C, H, W)`): The denoiser's predictions of `x0`, attached to its graph.
        timesteps (`torch.Tensor` of shape `(B,)`): Integer diffusion timesteps of the samples.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): ᾱ of the noise schedule.
        config ([`StructureConfig`]): Options.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): Class ids, when the discriminator is conditional.
        gather (`Callable`, *optional*): Gathers `[B, ...]` -> `[N, ...]` across processes with autograd (e.g.
            [`all_gather_with_grad`]); needs `config.scope == "global"`. See the module docstring.
        process_index (`int`, defaults to 0): This process's rank, locating its rows in the gathered batch.

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: the per-sample loss `[B]` (this process's rows) and detached
        0-d statistics `loss_struct`, `struct_real_entropy`, `struct_fake_entropy`, `struct_weight_mean`.
    """
    _check_inputs(x0, x0_hat, timesteps, gathered=gather is not None)
    if any(p.requires_grad for p in discriminator.parameters()):
        raise ValueError(
            "structure_denoiser_loss: the discriminator has parameters with requires_grad=True; freeze it with "
            "`discriminator.requires_grad_(False)` for the denoiser step."
        )
    weights = structure_timestep_weights(
        timesteps, alphas_cumprod, config.timestep_weighting, config.snr_clip, config.t_threshold
    )  # w(t), [B]
    z_real, z_fake = _embed_pair(discriminator, x0.detach(), x0_hat, class_labels)  # [B, d] each
    z_real = z_real.detach()  # the real branch carries no gradient to anything
    if config.gate_fake_gradients:
        # same values; d(z_fake_j)/d(x0_hat_j) is scaled by w_j, so samples with w = 0 stay fixed anchors
        z_fake = z_fake.detach() + weights[:, None] * (z_fake - z_fake.detach())

    (z_real, z_fake, weights), rows = _gather_rows((z_real, z_fake, weights), config, gather, process_index)
    per_row = structure_loss(
        z_real, z_fake, config.relation, config.distance, config.temperature, config.huber_delta
    )  # S_i, [N]
    loss = weights[rows] * per_row[rows]  # w(t_i) * S_i, [B]

    stats = {
        "loss_struct": loss.detach().mean(),
        "struct_real_entropy": relation_entropy(z_real.detach(), config.temperature),
        "struct_fake_entropy": relation_entropy(z_fake.detach(), config.temperature),
        "struct_weight_mean": weights[rows].detach().mean(),
    }
    return loss, stats


# SADM discriminator step (METHODS.md §1.3): maximise w(t) · S(E_φ(x0), E_φ(sg(x̂0))), optional R1 on real inputs
def structure_discriminator_loss(
    discriminator: nn.Module,
    x0: torch.Tensor,
    x0_hat_detached: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: StructureConfig,
    class_labels: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    process_index: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    Loss of the discriminator step, `−w(t_i) * S_i (+ r1_gamma / 2 * R1_i)` per sample: the discriminator maximises
    the structural distance. Gradients flow only into the discriminator (inputs are detached here).

    R1-style penalty (when `config.r1_gamma > 0`): R1_i = ‖∂⟨z_i, v_i⟩/∂x0_i‖² with v_i ~ N(0, I_d) drawn afresh,
    an unbiased one-sample (Hutchinson) estimate of ‖∂z_i/∂x0_i‖²_F, the squared Frobenius norm of the encoder's
    Jacobian at the real input; it is the vector-output analogue of R1's ‖∇_x D(x)‖² and bounds how fast the
    embedding moves with the input. (The tempting ‖∇ Σ_i ⟨z_i, sg(z_i)⟩‖² is identically 0 for L2-normalised z.)

    Args:
        discriminator (`nn.Module`): The trainable [`StructureDiscriminator`], possibly wrapped by accelerate.
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): Real clean samples.
        x0_hat_detached (`torch.Tensor` of shape `(B, C, H, W)`): The denoiser's predictions (detached here anyway).
        timesteps (`torch.Tensor` of shape `(B,)`): Integer diffusion timesteps of the samples.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): ᾱ of the noise schedule.
        config ([`StructureConfig`]): Options.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): Class ids, when the discriminator is conditional.
        gather (`Callable`, *optional*): As in [`structure_denoiser_loss`].
        process_index (`int`, defaults to 0): As in [`structure_denoiser_loss`].

    Returns:
        `tuple[torch.Tensor, dict[str, torch.Tensor]]`: the per-sample loss `[B]` (this process's rows) and detached
        0-d statistics `loss_struct` (mean w·S, the value the discriminator raises), `struct_real_entropy`,
        `struct_fake_entropy`, and `struct_r1` when the penalty is on.
    """
    _check_inputs(x0, x0_hat_detached, timesteps, gathered=gather is not None)
    weights = structure_timestep_weights(
        timesteps, alphas_cumprod, config.timestep_weighting, config.snr_clip, config.t_threshold
    )  # w(t), [B]
    x0 = x0.detach().requires_grad_(config.r1_gamma > 0)  # a leaf of its own: the caller's x0 never gets a grad
    z_real, z_fake = _embed_pair(
        discriminator, x0, x0_hat_detached.detach(), class_labels
    )  # [B, d] each, graph into φ

    r1 = None
    if config.r1_gamma > 0:
        probe = torch.randn_like(z_real)  # v_i ~ N(0, I_d), [B, d]
        (grad,) = torch.autograd.grad(
            (z_real * probe).sum(), x0, create_graph=True
        )  # ∂Σ_i⟨z_i, v_i⟩/∂x0, [B, C, H, W]
        r1 = grad.flatten(1).pow(2).sum(dim=1)  # [B, C, H, W] -> [B, C*H*W] -> R1_i, [B]

    (z_real, z_fake, weights), rows = _gather_rows((z_real, z_fake, weights), config, gather, process_index)
    per_row = structure_loss(
        z_real, z_fake, config.relation, config.distance, config.temperature, config.huber_delta
    )  # S_i, [N]
    structure = weights[rows] * per_row[rows]  # w(t_i) * S_i, [B]
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
