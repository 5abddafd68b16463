"""Discriminators on the features of a frozen pretrained DiT: the `dit` trunk of both adversarial terms.

As LADD (Sauer et al. 2024; diffusers' SANA-Sprint research example) and DMD2 (Yin et al. 2024) judge with the
diffusion network itself, a frozen copy of a pretrained `DiTTransformer2DModel` runs on the discriminator's (noised)
latents with its own timestep τ and the class label; the token maps of chosen blocks feed light spectral-norm heads:

    DiTTimestepDiscriminator:  logit = Σ_b mean_{h,w} head_b(LN(F_b(c·y, τ, class)))      (Diffusion-GAN's D(y, t))
    DiTStructureEncoder:       z = normalize(MLP([mean_N LN(F_b(x, τ, class))]_b))         (SADM's E_φ(x[, s]))

The trunk is passed in at construction and is **not a submodule**: it is outside `parameters()`, `state_dict()`,
`save_pretrained`, the optimizer and DDP, always frozen (`requires_grad=False`) and in eval mode; `.to()` moves it with
the heads. A saved discriminator holds its heads only; rebuild it with the same trunk, then load the heads (as the
training script's checkpoint hook does: `from_pretrained` without a trunk, then `load_state_dict`).

The trunk builds an autograd graph only when its input requires grad (the fake side of the denoiser step, or the real
side under R1): discriminator steps on detached inputs and the real side of the GAN term run without one. With
`enable_gradient_checkpointing()` the trunk's blocks are recomputed in backward.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import orthogonal
from torch.nn.utils.parametrizations import spectral_norm as spectral_norm_

from ..diffusion_augment import AdaptiveDiffusion
from .structure_discriminator import StructureDiscriminatorOutput
from .timestep_discriminator import TimestepDiscriminatorOutput


def default_trunk_blocks(num_layers: int) -> tuple[int, ...]:
    """Blocks at a quarter and at half of the depth (0-based): DiT-S/2 → (2, 5), DiT-XL/2 → (6, 13), tiny → (0, 1).

    The trunk runs only up to the deepest chosen block, so stopping at half depth halves its cost, and the middle of a
    diffusion transformer holds its most linearly separable features (REPA aligns SiT-XL's block 8 of 28; DDAE finds
    the middle layers best for linear probing)."""
    return tuple(sorted({max(num_layers // 4 - 1, 0), max(num_layers // 2 - 1, 0)}))


def load_dit_trunk(path: str, flag: str = "--disc_trunk_path") -> DiTTransformer2DModel:
    """A `DiTTransformer2DModel` from a pipeline folder (its `transformer/`) or a transformer folder, frozen.

    Raises a `ValueError` naming `flag` and `path` when nothing loadable is there."""
    subfolder = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else None
    try:
        dit = DiTTransformer2DModel.from_pretrained(path, subfolder=subfolder)
    except Exception as error:  # missing folder, config or weights; corrupt safetensors
        where = os.path.join(path, subfolder) if subfolder else path
        raise ValueError(f"{flag} {path}: no DiTTransformer2DModel could be loaded from {where} ({error}).") from error
    return freeze_dit_trunk(dit)


def freeze_dit_trunk(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A frozen copy of `dit` (no tensor shared with it): `requires_grad=False`, eval mode, diffusers' label dropout off."""
    trunk = copy.deepcopy(dit).requires_grad_(False).eval()
    for module in trunk.modules():
        if hasattr(module, "dropout_prob"):  # LabelEmbedding: never drop labels inside the trunk
            module.dropout_prob = 0.0
    return trunk


def check_dit_trunk(
    dit: DiTTransformer2DModel,
    in_channels: int,
    sample_size: int,
    num_classes: int,
    blocks: tuple[int, ...] | list[int],
    source: str,
    inputs: str = "the discriminator input",
) -> None:
    """Raise a clear error when the trunk cannot judge the discriminator's inputs.

    Args:
        num_classes (`int`): the data's class count K (0: unlabeled); the trunk's label table must have K rows (1 when
            unlabeled, the DiT's single class 0).
        source (`str`): names the trunk in the message (the flag and the folder).
    """
    config = dit.config
    if config.in_channels != in_channels:
        raise ValueError(f"{source} takes in_channels={config.in_channels} but {inputs} has {in_channels} channels.")
    if config.sample_size != sample_size:
        raise ValueError(
            f"{source} takes sample_size={config.sample_size} but {inputs} is {sample_size}x{sample_size}."
        )
    if config.num_embeds_ada_norm != max(num_classes, 1):
        raise ValueError(
            f"{source} has {config.num_embeds_ada_norm} classes but the data has {num_classes or 'no'} classes "
            f"(the trunk needs {max(num_classes, 1)}): use a trunk trained on these labels."
        )
    if not blocks:
        raise ValueError(f"{source}: no trunk blocks chosen.")
    bad = [b for b in blocks if not 0 <= b < config.num_layers]
    if bad:
        raise ValueError(
            f"--disc_trunk_blocks {','.join(map(str, blocks))}: {source} has blocks 0..{config.num_layers - 1}, "
            f"not {','.join(map(str, bad))}."
        )


def trunk_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str):
    """ᾱ_τ, τ = 0..T−1, of the schedule the trunk was trained on (diffusers' DDPMScheduler maths), float32 `[T]`."""
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
    )
    return scheduler.alphas_cumprod.float()


def dit_timestep_for_alpha_bar(alpha_bar: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The trunk timestep τ (float) whose noise level is ᾱ: log-SNR interpolated between the trunk's integer steps.

    Exact at the trunk's own ᾱ_τ (τ integer); between two steps the log-SNR λ = log(ᾱ/(1−ᾱ)) is interpolated
    linearly (the DiT's sinusoidal timestep embedding is smooth in τ). ᾱ above ᾱ_0 (e.g. 1, clean) gives τ = 0,
    below ᾱ_{T−1} gives τ = T−1.
    """
    log_snr = torch.logit(alphas_cumprod.double().to(alpha_bar.device))  # [T], decreasing in τ
    target = torch.logit(alpha_bar.double().clamp(max=1.0))  # [B], +inf for ᾱ = 1
    descending = -log_snr  # increasing: searchsorted needs ascending order
    upper = torch.searchsorted(descending, -target).clamp(1, log_snr.numel() - 1)  # [B], first τ with λ_τ <= target
    lower = upper - 1
    fraction = (log_snr[lower] - target) / (log_snr[lower] - log_snr[upper])
    tau = lower.double() + fraction.clamp(0.0, 1.0)
    return tau.clamp(0, log_snr.numel() - 1).float()


def diffusion_gan_input_for_dit(
    y: torch.Tensor, alpha_bar: torch.Tensor, noise_std: float, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-GAN's y = √ᾱ·x + σ√(1−ᾱ)·ε as the trunk's own forward process: `(c·y, τ)`.

    With c = 1/√(ᾱ + σ²(1−ᾱ)), c·y = √ᾱ'·x + √(1−ᾱ')·ε exactly, for ᾱ' = c²ᾱ = ᾱ/(ᾱ + σ²(1−ᾱ)) (same signal-to-noise
    ratio ᾱ/(σ²(1−ᾱ)), unit total variance): the input the DiT was trained on at the step τ with ᾱ_τ = ᾱ'
    ([`dit_timestep_for_alpha_bar`]). t = 0 (ᾱ = 1) gives c = 1 and τ = 0.
    """
    alpha_bar = alpha_bar.float()
    scale = (alpha_bar + noise_std**2 * (1 - alpha_bar)).rsqrt()  # c, [B]
    tau = dit_timestep_for_alpha_bar(alpha_bar * scale**2, alphas_cumprod)  # ᾱ' = c²ᾱ
    return y * scale.reshape(-1, *([1] * (y.ndim - 1))).to(y.dtype), tau


class _FrozenTrunkMixin:
    """Holds the frozen DiT outside the module tree (not in parameters(), state_dict() or the optimizer) and runs it."""

    def _attach_trunk(self, dit: DiTTransformer2DModel | None, blocks: tuple[int, ...]) -> None:
        if dit is not None:
            config = self.config
            check_dit_trunk(
                dit, config.in_channels, config.sample_size, config.trunk_num_classes, blocks, "the dit trunk"
            )
            if dit.config.num_attention_heads * dit.config.attention_head_dim != self.config.trunk_hidden_size:
                raise ValueError(
                    f"the dit trunk has width {dit.inner_dim}, the heads were built for {self.config.trunk_hidden_size}."
                )
            if any(p.requires_grad for p in dit.parameters()) or dit.training:
                raise ValueError("the dit trunk must be frozen: pass `freeze_dit_trunk(dit)` (a frozen copy).")
        object.__setattr__(self, "dit", dit)  # a plain attribute, not a registered submodule

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # heads
        if self.dit is not None:
            self.dit._apply(fn, recurse)  # the trunk follows .to()/.cuda()/.half(); it stays frozen
        return self

    def _trunk_labels(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """The label of each sample, or the trunk's null class (id K, unconditional) without labels (0 when K = 1)."""
        if class_labels is not None:
            return class_labels.to(device).reshape(-1)
        classes = self.config.trunk_num_classes
        return torch.full((batch,), classes if classes > 1 else 0, dtype=torch.long, device=device)

    def _block_features(
        self, sample: torch.Tensor, tau: torch.Tensor, class_labels: torch.Tensor
    ) -> list[torch.Tensor]:
        """Token maps of the chosen blocks, each `[B, N, D]`, layer-normalised (no affine) so blocks share one scale.

        A graph is built only if `sample` requires grad; double-backward-safe attention (plain maths) when the heads
        also train on a graph-carrying input (R1)."""
        if self.dit is None:
            raise ValueError(f"{type(self).__name__} has no trunk: build it with `dit=freeze_dit_trunk(...)`.")
        dit, blocks = self.dit, tuple(self.config.trunk_blocks)
        needs_graph = torch.is_grad_enabled() and sample.requires_grad
        double_backward = needs_graph and any(p.requires_grad for p in self.parameters())
        checkpoint = needs_graph and self.gradient_checkpointing
        features = []
        with torch.set_grad_enabled(needs_graph):
            tokens = dit.pos_embed(sample.to(dit.dtype))  # [B, C, H, W] -> [B, N, D]
            for index, block in enumerate(dit.transformer_blocks[: max(blocks) + 1]):
                if checkpoint:  # recomputed in backward with the same attention kernel
                    tokens = torch.utils.checkpoint.checkpoint(
                        _run_block, block, tokens, tau, class_labels, double_backward, use_reentrant=False
                    )
                else:
                    tokens = _run_block(block, tokens, tau, class_labels, double_backward)  # [B, N, D]
                if index in blocks:
                    features.append(F.layer_norm(tokens, tokens.shape[-1:]))
        return features


def _run_block(
    block: nn.Module, tokens: torch.Tensor, tau: torch.Tensor, class_labels: torch.Tensor, math_attention: bool
) -> torch.Tensor:
    """One DiT block; `math_attention` uses plain-maths attention, which has a double backward (fused kernels do not)."""
    with sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext():
        return block(tokens, timestep=tau, class_labels=class_labels)  # [B, N, D] -> [B, N, D]


def _maybe_spectral_norm(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm_(module) if enabled else module


class DiTTimestepDiscriminator(_FrozenTrunkMixin, ModelMixin, ConfigMixin):
    r"""
    Diffusion-GAN's D(y, t, class) on a frozen DiT: raw logits `[B]`, the sum over the chosen blocks of a light
    spectral-norm conv head's mean patch logit (LADD / StyleGAN-T style heads; t and the class enter through the trunk).

    The GAN noise y = √ᾱ_t·x + σ√(1−ᾱ_t)·ε of `diffusion` (its current T) is turned into the trunk's own forward
    process by [`diffusion_gan_input_for_dit`] (rescale c, matched step τ); without `diffusion`, `timesteps` are taken
    as the trunk's own steps τ and `sample` as its input.

    Args:
        in_channels (`int`): channels of the inputs (the trunk's `in_channels`: latents, no VAE decode).
        sample_size (`int`): height = width of the inputs (the trunk's `sample_size`).
        trunk_hidden_size (`int`): the trunk's width D (heads are built from it, so the heads load without the trunk).
        trunk_patch_size (`int`): the trunk's patch size (token map side = sample_size / patch).
        trunk_num_classes (`int`): the trunk's class count K; labels lie in [0, K), the null class K is used without.
        trunk_blocks (`list[int]`): 0-based block indices whose outputs get a head; the trunk runs to the deepest.
        head_channels (`int`, defaults to 64): width of each head.
        spectral_norm (`bool`, defaults to `True`): spectral norm on every head layer.
        num_train_timesteps, beta_start, beta_end, beta_schedule: the trunk's training schedule (DiT's by default).
        trunk (`str`, defaults to `"dit"`): the trunk's name, read by the Diffusion-GAN losses (`config.trunk`).
        dit ([`DiTTransformer2DModel`], *optional*, keyword only): the frozen trunk ([`freeze_dit_trunk`]); not saved.
        diffusion ([`AdaptiveDiffusion`], *optional*, keyword only): the GAN's adaptive diffusion whose current ᾱ and σ
            define y (not saved: its state is the training script's).
    """

    ignore_for_config = ["dit", "diffusion"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int,
        sample_size: int,
        trunk_hidden_size: int,
        trunk_patch_size: int,
        trunk_num_classes: int,
        trunk_blocks: tuple[int, ...] | list[int],
        head_channels: int = 64,
        spectral_norm: bool = True,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trunk: str = "dit",
        *,
        dit: DiTTransformer2DModel | None = None,
        diffusion: AdaptiveDiffusion | None = None,
    ):
        super().__init__()
        if trunk != "dit":
            raise ValueError(f"trunk '{trunk}' must be 'dit' for DiTTimestepDiscriminator.")
        if sample_size % trunk_patch_size:
            raise ValueError(f"trunk_patch_size={trunk_patch_size} must divide sample_size={sample_size}.")
        self.gradient_checkpointing = False
        self.heads = nn.ModuleList(
            [
                nn.Sequential(
                    _maybe_spectral_norm(nn.Conv2d(trunk_hidden_size, head_channels, 1), spectral_norm),
                    nn.LeakyReLU(0.2),
                    _maybe_spectral_norm(nn.Conv2d(head_channels, head_channels, 3, padding=1), spectral_norm),
                    nn.LeakyReLU(0.2),
                    _maybe_spectral_norm(nn.Conv2d(head_channels, 1, 1), spectral_norm),  # a logit per patch
                )
                for _ in trunk_blocks
            ]
        )
        alphas = trunk_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.register_buffer("alphas_cumprod", alphas, persistent=False)  # [T] of the trunk, derived from the config
        object.__setattr__(self, "diffusion", diffusion)
        self._attach_trunk(dit, tuple(trunk_blocks))

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        feature_diffusion: AdaptiveDiffusion | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> TimestepDiscriminatorOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor` of shape `[B, C, H, W]`): diffused inputs y of the GAN's adaptive diffusion.
            timesteps (`torch.LongTensor` of shape `[B]`): the GAN's t (or the trunk's τ when built without
                `diffusion`).
            class_labels (`torch.LongTensor` of shape `[B]`, *optional*): classes; None runs the trunk unconditionally.
            feature_diffusion: must be None (the projected trunk's feature noise; the GAN noise is on the input here).
            generator: unused (no randomness in D); accepted for the Diffusion-GAN losses' calling convention.
            return_dict (`bool`, defaults to `True`): return a [`TimestepDiscriminatorOutput`] or a tuple.
        """
        if feature_diffusion is not None:
            raise ValueError("feature_diffusion is only used by trunk='projected', not trunk='dit'.")
        if timesteps is None:
            raise ValueError("timesteps are required: the dit trunk is conditioned on the noise level.")
        batch, (height, width) = sample.shape[0], sample.shape[-2:]
        timesteps = timesteps.to(sample.device).reshape(-1)
        if self.diffusion is not None:
            alpha_bar = self.diffusion.alphas_cumprod.to(sample.device)[timesteps]  # ᾱ_t of the current T, [B]
            sample, tau = diffusion_gan_input_for_dit(sample, alpha_bar, self.diffusion.noise_std, self.alphas_cumprod)
        else:
            tau = timesteps.float()
        labels = self._trunk_labels(class_labels, batch, sample.device)
        patch = self.config.trunk_patch_size
        logits = 0
        for head, tokens in zip(self.heads, self._block_features(sample, tau, labels)):
            grid = tokens.transpose(1, 2).reshape(
                batch, -1, height // patch, width // patch
            )  # [B, N, D] -> [B, D, h, w]
            logits = logits + head(grid.to(self.dtype)).mean(dim=(1, 2, 3))  # [B, 1, h, w] -> [B], summed over blocks

        if not return_dict:
            return (logits,)
        return TimestepDiscriminatorOutput(logits=logits)


class DiTStructureEncoder(_FrozenTrunkMixin, ModelMixin, ConfigMixin):
    r"""
    SADM's structure encoder E_φ(x[, s]) on a frozen DiT: token-pooled features of the chosen blocks (each layer-
    normalised), concatenated, through a trainable spectral-norm MLP, L2-normalised. Same calling convention and output
    as [`StructureDiscriminator`].

    The trunk sees clean samples at τ = 0, or, noise-conditional (`num_timesteps`, SADM 'mmd' / re-noising), samples at
    level s given as `timestep = s + 1` (0 = clean) at τ = s: the levels are on the run's DDPM schedule, which must be
    the trunk's own (the training script checks it), so τ = s is exact.

    Args:
        in_channels, sample_size, trunk_hidden_size, trunk_num_classes, trunk_blocks: as [`DiTTimestepDiscriminator`].
        embed_dim (`int`, defaults to 128): dimension d of the embeddings.
        hidden_dim (`int`, defaults to 256): width of the projection MLP.
        spectral_norm (`bool`, defaults to `True`): spectral norm on the projection.
        num_classes (`int`, *optional*): class-conditional: `forward` requires `class_labels` (passed to the trunk);
            must equal `trunk_num_classes`. None: the trunk runs with its null class.
        num_timesteps (`int`, *optional*): noise-conditional: `forward` requires `timestep` in [0, num_timesteps].
        backbone (`str`, defaults to `"dit"`): the backbone's name.
        head_type (`str`, defaults to `"mlp"`): `"mlp"` (the projection above) or `"orthonormal"`: one bias-free linear
            projection with orthonormal rows (W Wᵀ = I; no spectral norm, it is 1-Lipschitz), the low-capacity
            adversarial head over the frozen trunk's features; needs `embed_dim` <= k·D.
        dit ([`DiTTransformer2DModel`], *optional*, keyword only): the frozen trunk ([`freeze_dit_trunk`]); not saved.
    """

    ignore_for_config = ["dit"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int,
        sample_size: int,
        trunk_hidden_size: int,
        trunk_num_classes: int,
        trunk_blocks: tuple[int, ...] | list[int],
        embed_dim: int = 128,
        hidden_dim: int = 256,
        spectral_norm: bool = True,
        num_classes: int | None = None,
        num_timesteps: int | None = None,
        backbone: str = "dit",
        head_type: str = "mlp",
        *,
        dit: DiTTransformer2DModel | None = None,
    ):
        super().__init__()
        if head_type not in ("mlp", "orthonormal"):
            raise ValueError(f"`head_type` must be 'mlp' or 'orthonormal' for DiTStructureEncoder, got {head_type!r}.")
        if backbone != "dit":
            raise ValueError(f"backbone '{backbone}' must be 'dit' for DiTStructureEncoder.")
        if num_classes is not None and num_classes != trunk_num_classes:
            raise ValueError(f"num_classes={num_classes} must equal the trunk's class count {trunk_num_classes}.")
        if num_timesteps is not None and num_timesteps < 1:
            raise ValueError(f"`num_timesteps` must be None or >= 1, got {num_timesteps}.")
        self.gradient_checkpointing = False
        num_features = len(trunk_blocks) * trunk_hidden_size
        if head_type == "orthonormal":
            if embed_dim > num_features:
                raise ValueError(
                    f"head_type='orthonormal' needs embed_dim <= the pooled feature width {num_features}, got "
                    f"embed_dim={embed_dim}."
                )
            linear = nn.Linear(num_features, embed_dim, bias=False)  # W [embed_dim, k·D], W Wᵀ = I
            self.projection = orthogonal(linear, orthogonal_map="householder", use_trivialization=False)
        else:
            self.projection = nn.Sequential(
                _maybe_spectral_norm(nn.Linear(num_features, hidden_dim), spectral_norm),
                nn.LeakyReLU(0.2),
                _maybe_spectral_norm(nn.Linear(hidden_dim, embed_dim), spectral_norm),
            )
        self._attach_trunk(dit, tuple(trunk_blocks))

    def forward(
        self,
        sample: torch.Tensor,
        class_labels: torch.LongTensor | None = None,
        timestep: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> StructureDiscriminatorOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(B, in_channels, H, W)`): x0 / x̂0, or samples at level s.
            class_labels (`torch.LongTensor` of shape `(B,)`, *optional*): required exactly when `num_classes` is set.
            timestep (`torch.Tensor` of shape `(B,)`, *optional*): s + 1 (0 = clean); required exactly when
                `num_timesteps` is set.
            return_dict (`bool`, defaults to `True`): return a [`StructureDiscriminatorOutput`] or a tuple.
        """
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(f"`sample` must have shape [B, {config.in_channels}, H, W], got {tuple(sample.shape)}.")
        if (class_labels is None) != (config.num_classes is None):
            raise ValueError(
                f"`class_labels` must be given exactly when num_classes is set (num_classes={config.num_classes})."
            )
        if (timestep is None) != (config.num_timesteps is None):
            raise ValueError(
                f"`timestep` must be given exactly when the encoder is noise-conditional (num_timesteps="
                f"{config.num_timesteps}), got timestep={'None' if timestep is None else 'a tensor'}."
            )
        batch = sample.shape[0]
        if timestep is None:
            tau = torch.zeros(batch, device=sample.device)  # clean samples: the trunk's first step
        else:
            tau = (timestep.to(sample.device).reshape(-1).float() - 1).clamp(min=0)  # level s = timestep − 1
        labels = self._trunk_labels(class_labels, batch, sample.device)
        pooled = [tokens.mean(dim=1) for tokens in self._block_features(sample, tau, labels)]  # [B, N, D] -> [B, D]
        h = self.projection(torch.cat(pooled, dim=1).to(self.dtype))  # [B, k·D] -> [B, embed_dim]
        embeddings = F.normalize(h.float(), dim=-1)  # [B, embed_dim], unit rows

        if not return_dict:
            return (embeddings,)
        return StructureDiscriminatorOutput(embeddings=embeddings)
