"""A compact one-step generator for the Diffusion-GAN trainer: z (+ class) -> image in [-1, 1].

DCGAN-sized, StyleGAN-like in structure (a mapping network whose output modulates every block):

    w = MLP([z/rms(z), E[class]/rms(E[class])])                     mapping network (StyleGAN2, normalize_2nd_moment)
    h = reshape(Linear(w))                                          [B, C_0, 4, 4]
    h = LeakyReLU(GroupNorm(Conv3x3(Up2x(h)))·(1 + γ(w)) + β(w))    `layers_per_block` blocks per resolution 4, 8, ...
    x = tanh(Conv3x3(h))                                            [B, C, H, W] in [-1, 1]

The first resolution keeps 4x4; each next one doubles the resolution (in its first block) and halves the width (from
min(2^k, 8)·base_channels down to base_channels); further blocks of a resolution keep its size and width (StyleGAN2
has two convolutions per resolution). This file imports only torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class GANGeneratorOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `[B, C, H, W]`): generated images in [-1, 1].
    """

    sample: torch.Tensor


# StyleGAN2 `normalize_2nd_moment`: x / sqrt(mean(x²) + ε) over the feature dimension.
def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class _ModulatedBlock(nn.Module):
    """(Up2x) -> Conv3x3 -> GroupNorm without affine -> ·(1 + γ(w)) + β(w) -> LeakyReLU(0.2): AdaIN over groups."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, num_groups: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(num_groups, out_channels, affine=False)
        self.modulation = nn.Linear(w_dim, 2 * out_channels)  # -> (γ, β)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")  # [B, C, r, r] -> [B, C, 2r, 2r]
        h = self.norm(self.conv(h))  # [B, C_out, r, r]
        gamma, beta = self.modulation(w)[:, :, None, None].chunk(2, dim=1)  # [B, 2·C_out] -> 2 x [B, C_out, 1, 1]
        return F.leaky_relu(h * (1 + gamma) + beta, 0.2)


class GANGenerator(ModelMixin, ConfigMixin):
    r"""
    One-step image generator z (+ class label) -> image in [-1, 1] for Diffusion-GAN training; `forward` returns the
    tanh output.

    Args:
        out_channels (`int`): image channels (1 greyscale, 3 RGB).
        sample_size (`int`): height = width of the images; a power of two >= 4 (4, 8, 16, 32, 64, ...).
        latent_dim (`int`, defaults to 64): size of z and of the mapped code w.
        base_channels (`int`, defaults to 64): width of the last (full-resolution) block; each lower resolution doubles
            it, capped at 8x.
        num_classes (`int`, *optional*): class count of a class-conditional generator (a learned embedding joins z in
            the mapping network); `None` for an unconditional one.
        norm_num_groups (`int`, defaults to 8): GroupNorm groups; must divide `base_channels`.
        layers_per_block (`int`, defaults to 1): modulated 3x3 convolutions per resolution (StyleGAN2: 2).
    """

    @register_to_config
    def __init__(
        self,
        out_channels: int,
        sample_size: int,
        latent_dim: int = 64,
        base_channels: int = 64,
        num_classes: int | None = None,
        norm_num_groups: int = 8,
        layers_per_block: int = 1,
    ):
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels={out_channels} must be >= 1.")
        if sample_size < 4 or sample_size & (sample_size - 1):
            raise ValueError(f"sample_size={sample_size} must be a power of two >= 4 (4, 8, 16, 32, 64, ...).")
        if latent_dim < 1:
            raise ValueError(f"latent_dim={latent_dim} must be >= 1.")
        if base_channels < 1 or norm_num_groups < 1 or base_channels % norm_num_groups:
            raise ValueError(
                f"base_channels={base_channels} must be a positive multiple of norm_num_groups={norm_num_groups}."
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 or None.")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block={layers_per_block} must be >= 1.")

        num_upsamples = sample_size.bit_length() - 3  # log2(sample_size / 4)
        widths = [base_channels * min(2 ** (num_upsamples - level), 8) for level in range(num_upsamples + 1)]

        self.class_embedding = nn.Embedding(num_classes, latent_dim) if num_classes is not None else None
        mapping_in = 2 * latent_dim if num_classes is not None else latent_dim
        self.mapping = nn.Sequential(
            nn.Linear(mapping_in, latent_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(latent_dim, latent_dim),
            nn.LeakyReLU(0.2),
        )
        self.input = nn.Linear(latent_dim, widths[0] * 4 * 4)
        self.blocks = nn.ModuleList(
            [
                _ModulatedBlock(
                    widths[max(level - 1, 0)] if layer == 0 else widths[level],
                    widths[level],
                    latent_dim,
                    norm_num_groups,
                    upsample=level > 0 and layer == 0,
                )
                for level in range(num_upsamples + 1)
                for layer in range(layers_per_block)
            ]
        )
        self.to_image = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # every conv / linear: He-normal for the LeakyReLU(0.2) that follows, zero bias
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        # modulation starts at γ = β = 0: each block begins as a plain GroupNorm + LeakyReLU
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
        # output layer: unit-gain (no activation before tanh), so the first images are not saturated
        nn.init.kaiming_normal_(self.to_image.weight, nonlinearity="linear")
        # class embedding: unit normal rows (normalised again in forward)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=1.0)

    def forward(
        self,
        z: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GANGeneratorOutput | tuple:
        r"""
        Args:
            z (`torch.Tensor` of shape `[B, latent_dim]`): latent codes, usually N(0, I).
            class_labels (`torch.LongTensor` of shape `[B]`, *optional*): required iff `num_classes` is set.
            return_dict (`bool`, defaults to `True`): return a [`GANGeneratorOutput`] or a tuple.

        Returns:
            [`GANGeneratorOutput`] or `tuple` whose first element is the images `[B, C, H, W]` in [-1, 1].
        """
        latent_dim = self.config.latent_dim
        if z.ndim != 2 or z.shape[1] != latent_dim:
            raise ValueError(f"z must have shape [B, {latent_dim}], got {tuple(z.shape)}.")
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                f"class_labels must be given iff num_classes is set; num_classes={self.config.num_classes}, "
                f"class_labels {'missing' if class_labels is None else 'given'}."
            )
        code = normalize_2nd_moment(z)  # [B, latent_dim]
        if self.class_embedding is not None:
            embedding = self.class_embedding(class_labels.to(z.device).reshape(-1))  # [B, latent_dim]
            code = torch.cat([code, normalize_2nd_moment(embedding)], dim=1)  # [B, 2·latent_dim]
        w = self.mapping(code)  # [B, latent_dim]
        h = self.input(w).reshape(z.shape[0], -1, 4, 4)  # [B, C_0·16] -> [B, C_0, 4, 4]
        for block in self.blocks:
            h = block(h, w)  # [B, C_l, 4·2^l, 4·2^l] at resolution level l
        sample = torch.tanh(self.to_image(h))  # [B, C, H, W] in [-1, 1]

        if not return_dict:
            return (sample,)
        return GANGeneratorOutput(sample=sample)
