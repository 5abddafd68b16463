"""Diffusion-GAN's timestep-dependent discriminator D(y, t, class) -> raw logits `[B]` (Wang et al., ICLR 2023, §3).

The official code feeds t (with the class) through StyleGAN2's mapping network and takes the logit as the projection
⟨φ(y), c_map⟩/√dim; here t becomes a sinusoidal embedding + MLP (METHODS.md §2.2, [ours]):

    c = W_c·SiLU(MLP(sin_emb(t)) + E[class]),   logit = ⟨φ(y), c⟩/√dim + w·φ(y) + b

Four trunks φ: a small conv net (`conv`), a residual net in the shape of StyleGAN2's small-image discriminator
(`resnet`: residual blocks down to 4x4, a minibatch-std channel, a conv and a fully connected layer over the whole
4x4 map instead of average pooling), a small ViT (`vit`), and a ProjectedGAN-style `projected` trunk (a frozen
random-init or locally loaded `timm` backbone, feature maps noised per (sample, channel) by the adaptive diffusion,
light trainable heads per scale, logits averaged over scales; D gets no t, as Diffusion-ProjectedGAN).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..diffusion_augment import AdaptiveDiffusion
from .pretrained_trunks import (
    check_input_adapter,
    check_trunk_input,
    create_timm_backbone,
    freeze_trunk,
    reinit_stem_name,
)

TRUNKS = ("conv", "resnet", "vit", "projected")
# the resnet trunk ends on a 4x4 map (StyleGAN2's epilogue resolution)
RESNET_FINAL_RESOLUTION = 4


@dataclass
class TimestepDiscriminatorOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `[B]`): raw logits (no sigmoid); positive means "real".
    """

    logits: torch.Tensor


class _ViTBlock(nn.Module):
    """Pre-norm transformer block with explicit attention maths (double-backward safe, for R1)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # [B, N, 3, h, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, d]
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # [B, h, N, N]
        out = (attn @ v).transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


# StyleGAN2 (Karras et al., 2020, appendix / `MinibatchStdLayer`): one extra channel, the feature std within groups.
def minibatch_std(x: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """Append the mean over (channels, pixels) of the per-feature std across each group of `group_size` samples
    (the largest size <= `group_size` that divides the batch); samples of one group share the value."""
    B, C, H, W = x.shape
    group = max(g for g in range(1, min(group_size, B) + 1) if B % g == 0)
    y = x.reshape(group, B // group, C, H, W)  # [G, B/G, C, H, W]; sample i is in group i mod B/G
    std = (y.var(dim=0, unbiased=False) + eps).sqrt()  # [B/G, C, H, W]
    std = std.mean(dim=(1, 2, 3))[:, None, None, None]  # [B/G, 1, 1, 1]
    std = std.repeat(group, 1, H, W)  # [B, 1, H, W]
    return torch.cat([x, std], dim=1)  # [B, C + 1, H, W]


class _ResidualDownBlock(nn.Module):
    """StyleGAN2's resnet D block: (Conv3x3 -> LReLU -> Conv3x3 -> LReLU -> AvgPool2) + (AvgPool2 -> Conv1x1), / √2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        skip = self.skip(F.avg_pool2d(h, 2))  # [B, C_out, r/2, r/2]
        h = F.leaky_relu(self.conv1(h), 0.2)  # [B, C_in, r, r]
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)  # [B, C_out, r/2, r/2]
        return (h + skip) / math.sqrt(2)


class TimestepDiscriminator(ModelMixin, ConfigMixin):
    r"""
    Timestep- and class-conditional discriminator for Diffusion-GAN; `forward` returns raw logits `[B]`.

    Args:
        in_channels (`int`): channels of the (noised) inputs.
        sample_size (`int`): height = width of the inputs.
        trunk (`str`, defaults to `"conv"`): `conv`, `resnet`, `vit` or `projected` (frozen `timm` features + light
            heads).
        base_channels (`int`, defaults to 64): width of the first conv layer (conv: doubled per downsampling, capped
            at 8x; resnet: doubled once, at the first block), of the ViT tokens, and of the projected heads.
        num_layers (`int`, defaults to 3): conv layers (the first keeps the resolution, each next one halves it) or
            ViT blocks; unused by the resnet trunk (one residual block per halving down to 4x4: 1 at 8 pixels, 2 at
            16) and by the projected trunk.
        minibatch_std_group_size (`int`, defaults to 4): resnet trunk: group size of the minibatch-std channel
            (StyleGAN2: 4; 1 makes the channel a constant, i.e. no cross-sample statistic).
        t_conditioning (`bool`, defaults to `True`): condition on t; False ignores t (ProjectedGAN setting, and the
            only choice with `trunk="projected"`, whose t is per (sample, channel)).
        num_classes (`int`, *optional*): class count for a class-conditional D (projection on a class embedding).
        max_timesteps (`int`, defaults to 1000): t is rescaled by 1000/max_timesteps before the sinusoidal embedding.
        embed_dim (`int`, defaults to 128): width of the t / class embedding.
        spectral_norm (`bool`, defaults to `False`): spectral norm on every trainable conv / linear layer.
        patch_size (`int`, defaults to 2): ViT patch size; must divide `sample_size`.
        num_heads (`int`, defaults to 4): ViT attention heads; must divide `base_channels`.
        timm_model_name (`str`, defaults to `"resnet18"`): backbone of the projected trunk, built with
            `timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels)` and frozen.
        timm_pretrained_path (`str`, *optional*): local weights (safetensors or torch file) for that backbone, saved
            from the classifier model (`timm.create_model(timm_model_name)`, classifier dropped) or from the same
            `features_only` model; every weight is checked (`sadm/models/pretrained_trunks.py`). Pass
            `timm_pretrained_path=None` to `from_pretrained` to reload elsewhere (saved weights include the backbone).
        input_adapter (`str`, defaults to `"adapt"`): how a pretrained stem with other input channels than
            `in_channels` is fitted: `"adapt"` (timm's `adapt_input_conv`; for 4 latent channels a heuristic, not a
            latent-trained stem), `"strict"` (an error) or `"reinit"` (an untrained stem, which trains with the heads).
        timm_out_indices (`tuple[int]`, *optional*): which backbone scales get a head (timm's `out_indices`; all when
            None).
        timm_input_size (`int`, *optional*): bilinear resize of the input before the backbone (ProjectedGAN: 224).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int,
        sample_size: int,
        trunk: str = "conv",
        base_channels: int = 64,
        num_layers: int = 3,
        minibatch_std_group_size: int = 4,
        t_conditioning: bool = True,
        num_classes: int | None = None,
        max_timesteps: int = 1000,
        embed_dim: int = 128,
        spectral_norm: bool = False,
        patch_size: int = 2,
        num_heads: int = 4,
        timm_model_name: str = "resnet18",
        timm_pretrained_path: str | None = None,
        timm_out_indices: tuple[int, ...] | list[int] | None = None,
        timm_input_size: int | None = None,
        input_adapter: str = "adapt",
    ):
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"trunk '{trunk}' is not one of {', '.join(TRUNKS)}.")
        if trunk == "projected" and t_conditioning:
            raise ValueError(
                "t_conditioning=True is not supported with trunk='projected': Diffusion-ProjectedGAN noises the "
                "feature maps with one t per (sample, channel) and gives D no t; pass t_conditioning=False."
            )
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 or None.")
        if trunk == "resnet" and (sample_size < 2 * RESNET_FINAL_RESOLUTION or sample_size & (sample_size - 1)):
            raise ValueError(
                f"trunk='resnet' needs a power-of-two sample_size >= {2 * RESNET_FINAL_RESOLUTION} (it halves the "
                f"image down to {RESNET_FINAL_RESOLUTION}x{RESNET_FINAL_RESOLUTION}), got sample_size={sample_size}."
            )
        if minibatch_std_group_size < 1:
            raise ValueError(f"minibatch_std_group_size={minibatch_std_group_size} must be >= 1.")
        if max_timesteps < 1:
            raise ValueError(f"max_timesteps={max_timesteps} must be >= 1.")
        if trunk == "vit" and sample_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide sample_size={sample_size}.")
        if trunk == "vit" and base_channels % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide base_channels={base_channels}.")
        if timm_pretrained_path is not None and not os.path.isfile(timm_pretrained_path):
            raise FileNotFoundError(f"timm_pretrained_path '{timm_pretrained_path}' is not a file.")
        if timm_pretrained_path is not None and trunk != "projected":
            raise ValueError(f"timm_pretrained_path is only used by trunk='projected', not trunk='{trunk}'.")
        check_input_adapter(input_adapter)

        if trunk == "conv":
            layers, channels = [], in_channels
            for i in range(num_layers):
                out_channels = base_channels * min(2**i, 8)
                stride = 1 if i == 0 else 2
                layers += [nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2)]
                channels = out_channels
            self.conv_trunk = nn.Sequential(*layers)
            self.feature_dim = channels
        elif trunk == "resnet":
            num_blocks = (sample_size // RESNET_FINAL_RESOLUTION).bit_length() - 1  # log2(sample_size / 4)
            widths = [base_channels] + [2 * base_channels] * num_blocks
            self.from_image = nn.Conv2d(in_channels, base_channels, 1)
            self.res_blocks = nn.ModuleList([_ResidualDownBlock(widths[i], widths[i + 1]) for i in range(num_blocks)])
            # epilogue: minibatch std, a 3x3 conv, then a fully connected layer over the whole 4x4 map
            self.epilogue_conv = nn.Conv2d(widths[-1] + 1, widths[-1], 3, padding=1)
            self.epilogue_fc = nn.Linear(widths[-1] * RESNET_FINAL_RESOLUTION**2, widths[-1])
            self.feature_dim = widths[-1]
        elif trunk == "vit":
            num_tokens = (sample_size // patch_size) ** 2
            self.patch_embed = nn.Conv2d(in_channels, base_channels, patch_size, stride=patch_size)
            self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, base_channels) * 0.02)
            self.blocks = nn.ModuleList([_ViTBlock(base_channels, num_heads) for _ in range(num_layers)])
            self.norm = nn.LayerNorm(base_channels)
            self.feature_dim = base_channels
        else:
            self.backbone = create_timm_backbone(
                timm_model_name,
                in_channels,
                timm_pretrained_path,
                input_adapter,
                features_only=True,
                out_indices=timm_out_indices,
                source="timm_pretrained_path",
            )
            size = timm_input_size or sample_size
            name = f"timm '{timm_model_name}'" + (f" ({timm_pretrained_path})" if timm_pretrained_path else "")
            check_trunk_input(self.backbone, self.backbone, in_channels, size, name)
            # input_adapter='reinit' on pretrained weights: the fresh stem trains with the heads
            self._trainable_stem = reinit_stem_name(self.backbone, timm_pretrained_path is not None, input_adapter)
            freeze_trunk(self.backbone, self._trainable_stem)
            self.backbone.eval()
            # light trainable heads per scale: 1x1 channel mixing, 3x3 conv, global average pool
            self.heads = nn.ModuleList(
                [
                    nn.Sequential(
                        nn.Conv2d(c, base_channels, 1),
                        nn.LeakyReLU(0.2),
                        nn.Conv2d(base_channels, base_channels, 3, padding=1),
                        nn.LeakyReLU(0.2),
                    )
                    for c in self.backbone.feature_info.channels()
                ]
            )
            self.feature_dim = base_channels

        num_scales = len(self.heads) if trunk == "projected" else 1
        self.out = nn.ModuleList([nn.Linear(self.feature_dim, 1) for _ in range(num_scales)])  # w·φ + b per scale
        self.time_proj = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0) if t_conditioning else None
        self.time_embedding = TimestepEmbedding(embed_dim, embed_dim) if t_conditioning else None
        self.class_embedding = nn.Embedding(num_classes, embed_dim) if num_classes is not None else None
        conditioned = t_conditioning or num_classes is not None
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, self.feature_dim)) if conditioned else None

        if spectral_norm:
            trainable = [m for name, m in self.named_modules() if not name.startswith("backbone")]
            for module in trainable:
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(module)

    def requires_grad_(self, requires_grad: bool = True) -> TimestepDiscriminator:
        """The frozen backbone stays frozen through the adversarial steps' `requires_grad_(True)` (its stem follows
        `requires_grad` with `input_adapter='reinit'`)."""
        super().requires_grad_(requires_grad)
        if self.config.trunk == "projected":
            freeze_trunk(self.backbone, self._trainable_stem, requires_grad)
        return self

    def train(self, mode: bool = True) -> TimestepDiscriminator:
        """The frozen backbone always stays in eval mode (its normalisation statistics never move)."""
        super().train(mode)
        if self.config.trunk == "projected":
            self.backbone.eval()
        return self

    def _features(
        self,
        sample: torch.Tensor,
        feature_diffusion: AdaptiveDiffusion | None,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> list[torch.Tensor]:
        """φ(y) per scale, each `[B, feature_dim]`."""
        trunk = self.config.trunk
        if trunk == "conv":
            return [self.conv_trunk(sample).mean(dim=(2, 3))]  # [B, C, h, w] -> [B, C]
        elif trunk == "resnet":
            h = F.leaky_relu(self.from_image(sample), 0.2)  # [B, C_0, H, W]
            for block in self.res_blocks:
                h = block(h)  # [B, C, r, r] -> [B, C', r/2, r/2], down to 4x4
            h = minibatch_std(h, self.config.minibatch_std_group_size)  # [B, C + 1, 4, 4]
            h = F.leaky_relu(self.epilogue_conv(h), 0.2)  # [B, C, 4, 4]
            return [F.leaky_relu(self.epilogue_fc(h.flatten(1)), 0.2)]  # [B, C·16] -> [B, C]
        elif trunk == "vit":
            tokens = self.patch_embed(sample).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, N, D]
            tokens = tokens + self.pos_embed
            for block in self.blocks:
                tokens = block(tokens)
            return [self.norm(tokens).mean(dim=1)]  # [B, N, D] -> [B, D]
        if self.config.timm_input_size is not None:
            size = self.config.timm_input_size
            sample = F.interpolate(sample, size=(size, size), mode="bilinear", align_corners=False)
        features = self.backbone(sample)  # list of [B, C_s, H_s, W_s]; gradients reach the input, not the backbone
        if feature_diffusion is not None:
            features = [feature_diffusion.noise_feature_maps(f, generator=generator)[0] for f in features]
        return [head(f).mean(dim=(2, 3)) for head, f in zip(self.heads, features)]  # [B, C_s, h, w] -> [B, D]

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
            sample (`torch.Tensor` of shape `[B, C, H, W]`): diffused inputs y (clean pixels for the projected trunk).
            timesteps (`torch.LongTensor` of shape `[B]`, *optional*): diffusion steps t; required when
                `t_conditioning`, ignored otherwise.
            class_labels (`torch.LongTensor` of shape `[B]`, *optional*): required iff `num_classes` is set.
            feature_diffusion ([`AdaptiveDiffusion`], *optional*): projected trunk only; noises each backbone feature
                map with one t per (sample, channel) from its t-table (Diffusion-ProjectedGAN). None: no noise.
            generator (`torch.Generator`, *optional*): drives the feature noise.
            return_dict (`bool`, defaults to `True`): return a [`TimestepDiscriminatorOutput`] or a tuple.

        Returns:
            [`TimestepDiscriminatorOutput`] or `tuple` whose first element is the logits `[B]`.
        """
        if feature_diffusion is not None and self.config.trunk != "projected":
            raise ValueError(f"feature_diffusion is only used by trunk='projected', not trunk='{self.config.trunk}'.")
        if self.config.t_conditioning and timesteps is None:
            raise ValueError("timesteps are required: this discriminator has t_conditioning=True.")
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                f"class_labels must be given iff num_classes is set; num_classes={self.config.num_classes}, "
                f"class_labels {'missing' if class_labels is None else 'given'}."
            )
        features = self._features(sample, feature_diffusion, generator)

        cond = None
        if self.cond_proj is not None:
            embedding = 0
            if self.config.t_conditioning:
                t = timesteps.to(sample.device).reshape(-1).float() * (1000.0 / self.config.max_timesteps)  # [B]
                embedding = self.time_embedding(self.time_proj(t).to(sample.dtype))  # [B, embed_dim]
            if self.class_embedding is not None:
                embedding = embedding + self.class_embedding(class_labels.to(sample.device).reshape(-1))
            cond = self.cond_proj(embedding)  # [B, feature_dim]

        logits = []
        for out, phi in zip(self.out, features):
            logit = out(phi).squeeze(1)  # [B, 1] -> [B]
            if cond is not None:
                logit = logit + (phi * cond).sum(dim=1) / math.sqrt(self.feature_dim)  # ⟨φ(y), c⟩/√dim
            logits.append(logit)
        logits = torch.stack(logits, dim=0).mean(dim=0)  # [S, B] -> [B], mean over scales

        if not return_dict:
            return (logits,)
        return TimestepDiscriminatorOutput(logits=logits)
