"""The SADM structure discriminator: an encoder from clean samples to L2-normalised embeddings.

SADM (Yang et al., CVPR 2024, arXiv 2402.17563) compares the pair-wise relations among real samples with those among
the denoiser's predictions in the feature space of an encoder that is trained adversarially to *maximise* the
structural distance. The paper's encoder is not public; this module follows METHODS.md §1.2 item 1: embeddings are
L2-normalised (the maximising player could otherwise inflate distances without limit), the default backbone is a
small conv net trained from scratch with spectral norm, and `vit`, `timm` and `transformers` backbones are options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.nn.utils.parametrizations import orthogonal
from torch.nn.utils.parametrizations import spectral_norm as spectral_norm_

from .pretrained_trunks import (
    check_input_adapter,
    check_trunk_input,
    create_timm_backbone,
    freeze_trunk,
    load_transformers_backbone,
    reinit_stem_name,
)

BACKBONES = ("conv", "vit", "timm", "transformers")  # the `dit` backbone is `DiTStructureEncoder` (dit_trunk.py)
HEADS = ("linear", "orthonormal")
TIME_PROJ_DIM = 128  # width of the sinusoidal level embedding of a noise-conditional encoder


@dataclass
class StructureDiscriminatorOutput(BaseOutput):
    """
    Output of [`StructureDiscriminator`].

    Args:
        embeddings (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
            L2-normalised float32 embeddings z of the input samples (every row has unit norm).
    """

    embeddings: torch.FloatTensor


def _maybe_spectral_norm(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm_(module) if enabled else module


def _config_dict(config) -> dict:
    """A transformers config as the `transformers_config` dict that `AutoConfig.for_model` rebuilds it from."""
    keep = config.to_diff_dict()
    keep.pop("transformers_version", None)
    keep.pop("architectures", None)
    keep.pop("_name_or_path", None)
    keep["model_type"] = config.model_type
    return keep


def _trunk_name(backbone: str, kwargs: dict) -> str:
    if backbone == "timm":
        path = kwargs["timm_pretrained_path"]
        return f"timm '{kwargs['timm_model_name']}'" + (f" (timm_pretrained_path '{path}')" if path else "")
    path = kwargs["transformers_path"]
    return f"The transformers backbone (transformers_path '{path}')" if path else "The transformers backbone"


class StructureDiscriminator(ModelMixin, ConfigMixin):
    r"""
    Structure discriminator E_φ of SADM: maps clean samples x0 `[B, C, H, W]` (pixels in [-1, 1], or latents) to
    unit-norm embeddings z `[B, embed_dim]` whose pair-wise relations define the batch structure.

    Backbones (`backbone`):
        - `"conv"` (default): `num_layers` stride-2 3x3 convs (channels `base_channels * 2**i`, LeakyReLU 0.2, spectral
          norm when `spectral_norm=True`), global average pooling, linear head. Kernel 3 / stride 2 / padding 1 never
          shrinks a side below 1, so 8x8 inputs work with any depth.
        - `"vit"`: timm's `VisionTransformer` (`img_size=sample_size`, `patch_size`, `embed_dim=base_channels`,
          `depth=num_layers`, `num_heads`), mean-pooled tokens, linear head.
        - `"timm"`: `timm.create_model(timm_model_name, pretrained=False, num_classes=0, in_chans=in_channels)` (pooled
          features) + linear head. With `timm_pretrained_path` the weights are read from that local file (classifier
          dropped, every other weight checked against the architecture, the stem fitted to `in_channels` by
          `input_adapter`: `sadm/models/pretrained_trunks.py`); nothing is ever downloaded.
        - `"transformers"`: `AutoModel.from_pretrained(transformers_path)` of a local transformers vision model folder
          (ViT, Dinov2, ConvNext, ...; stem fitted by `input_adapter`), or `AutoModel.from_config` of
          `transformers_config` (random init), pooled by `transformers_pooling` + linear head.
    A pretrained or random timm / transformers backbone is run once on a zero batch at construction, so a trunk that
    cannot take `[B, in_channels, sample_size, sample_size]` (e.g. a ViT built for another image size) fails here.
    With `spectral_norm=True`, non-conv backbones get spectral norm on their linear head only.

    Heads (`head_type`): `"linear"` (default) is a linear layer with bias (spectral norm when `spectral_norm=True`);
    `"orthonormal"` is a linear projection without bias whose rows stay orthonormal (W Wᵀ = I, torch's `orthogonal`
    parametrisation; 1-Lipschitz, so no spectral norm), the low-capacity adversarial head over frozen features
    (`freeze_backbone=True`, docs/METHODS.md); it needs `embed_dim` <= the backbone's feature width.

    Args:
        in_channels (`int`, defaults to 1): Channels of the input samples.
        sample_size (`int`, defaults to 16): Height and width of the input samples (used by the `vit` backbone).
        backbone (`str`, defaults to `"conv"`): One of `"conv"`, `"vit"`, `"timm"`, `"transformers"`.
        embed_dim (`int`, defaults to 128): Dimension d of the embeddings.
        base_channels (`int`, defaults to 64): Width of the first conv layer (`conv`) or the token width (`vit`).
        num_layers (`int`, defaults to 3): Number of strided conv layers (`conv`) or transformer blocks (`vit`).
        spectral_norm (`bool`, defaults to `True`): Spectral norm on the convs and the head (Lipschitz control).
        num_classes (`int`, *optional*): If set, a learned class embedding is added to the head output before the
            L2 normalisation, and `forward` requires `class_labels`.
        patch_size (`int`, defaults to 4): Patch size of the `vit` backbone; must divide `sample_size`.
        num_heads (`int`, defaults to 4): Attention heads of the `vit` backbone; must divide `base_channels`.
        timm_model_name (`str`, defaults to `"resnet18"`): timm architecture for the `timm` backbone.
        timm_pretrained_path (`str`, *optional*): Local weights file (`.safetensors`, or a torch file read with
            `weights_only=True`) for the `timm` backbone. To reload a saved discriminator where this file is absent,
            pass `timm_pretrained_path=None` to `from_pretrained` (the saved weights replace it anyway).
        transformers_config (`dict`, *optional*): Config dict of the `transformers` backbone (must contain
            `model_type`; its `num_channels` must equal `in_channels`). An R1 penalty needs a double backward
            through attention, which fused SDPA kernels lack: add `"_attn_implementation": "eager"` to the dict.
        transformers_path (`str`, *optional*): Local folder of a transformers vision model (`save_pretrained`) for the
            `transformers` backbone; its config is recorded as `transformers_config`, so a saved discriminator reloads
            with `transformers_path=None` where the folder is absent (the saved weights replace the folder's anyway).
        input_adapter (`str`, defaults to `"adapt"`): How a pretrained stem with other input channels than
            `in_channels` is fitted: `"adapt"` (timm's `adapt_input_conv`: RGB filters summed for 1 channel, repeated
            and rescaled for others, e.g. 4 latent channels — a heuristic, not a latent-trained stem), `"strict"` (an
            error) or `"reinit"` (an untrained stem, trainable even with `freeze_backbone`).
        head_type (`str`, defaults to `"linear"`): `"linear"` or `"orthonormal"` (see above).
        transformers_pooling (`str`, defaults to `"cls"`): `"cls"` takes the first token of `last_hidden_state`,
            `"mean"` averages all tokens (or all positions of a `[B, C, H, W]` feature map).
        freeze_backbone (`bool`, defaults to `False`): Freeze the backbone (only the head and class embedding train);
            a frozen backbone also stays in eval mode and stays frozen through `requires_grad_(True)`.
        num_timesteps (`int`, *optional*): If set, the encoder is noise-conditional, E_φ(x, s): a sinusoidal embedding
            of the level `timestep` ∈ [0, num_timesteps] (0 = clean) through an MLP is added to the pooled features,
            and `forward` requires `timestep`. Needed when it compares noised samples of mixed levels (SADM 'mmd',
            re-noising).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 16,
        backbone: str = "conv",
        embed_dim: int = 128,
        base_channels: int = 64,
        num_layers: int = 3,
        spectral_norm: bool = True,
        num_classes: int | None = None,
        patch_size: int = 4,
        num_heads: int = 4,
        timm_model_name: str = "resnet18",
        timm_pretrained_path: str | None = None,
        transformers_config: dict | None = None,
        transformers_pooling: str = "cls",
        freeze_backbone: bool = False,
        num_timesteps: int | None = None,
        transformers_path: str | None = None,
        input_adapter: str = "adapt",
        head_type: str = "linear",
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"`in_channels` must be >= 1, got {in_channels}.")
        if embed_dim < 1:
            raise ValueError(f"`embed_dim` must be >= 1, got {embed_dim}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"`num_classes` must be None or >= 1, got {num_classes}.")
        if timm_pretrained_path is not None and backbone != "timm":
            raise ValueError(f"`timm_pretrained_path` is only used by backbone='timm', got backbone={backbone!r}.")
        if transformers_path is not None and backbone != "transformers":
            raise ValueError(
                f"`transformers_path` is only used by backbone='transformers', got backbone={backbone!r}."
            )
        if head_type not in HEADS:
            raise ValueError(f"`head_type` must be one of {', '.join(HEADS)}, got {head_type!r}.")
        check_input_adapter(input_adapter)

        if backbone == "conv":
            if num_layers < 1:
                raise ValueError(f"`num_layers` must be >= 1 for backbone='conv', got {num_layers}.")
            layers = []
            channels = in_channels
            for i in range(num_layers):
                out_channels = base_channels * 2**i
                # each layer halves H and W (rounding up): [B, channels, H, W] -> [B, out_channels, ceil(H/2), ceil(W/2)]
                layers.append(
                    _maybe_spectral_norm(nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), spectral_norm)
                )
                layers.append(nn.LeakyReLU(0.2))
                channels = out_channels
            layers.append(nn.AdaptiveAvgPool2d(1))  # [B, channels, h, w] -> [B, channels, 1, 1]
            layers.append(nn.Flatten())  # [B, channels, 1, 1] -> [B, channels]
            self.encoder = nn.Sequential(*layers)
            num_features = channels
        elif backbone == "vit":
            from timm.models.vision_transformer import VisionTransformer

            if sample_size % patch_size != 0:
                raise ValueError(
                    f"`patch_size`={patch_size} must divide `sample_size`={sample_size} for backbone='vit'."
                )
            if base_channels % num_heads != 0:
                raise ValueError(
                    f"`num_heads`={num_heads} must divide `base_channels`={base_channels} for backbone='vit'."
                )
            self.encoder = VisionTransformer(
                img_size=sample_size,
                patch_size=patch_size,
                in_chans=in_channels,
                num_classes=0,
                global_pool="avg",
                embed_dim=base_channels,
                depth=num_layers,
                num_heads=num_heads,
                class_token=False,
            )
            for block in self.encoder.blocks:
                # plain attention maths: fused SDPA kernels have no double backward, which the R1 penalty needs
                block.attn.fused_attn = False
            num_features = self.encoder.num_features
        elif backbone == "timm":
            self.encoder = create_timm_backbone(
                timm_model_name, in_channels, timm_pretrained_path, input_adapter, source="timm_pretrained_path"
            )
            num_features = self.encoder.num_features
        elif backbone == "transformers":
            from transformers import AutoConfig, AutoModel

            if transformers_pooling not in ("cls", "mean"):
                raise ValueError(f"`transformers_pooling` must be 'cls' or 'mean', got {transformers_pooling!r}.")
            if transformers_path is not None:
                self.encoder = load_transformers_backbone(
                    transformers_path, in_channels, input_adapter, source="transformers_path"
                )
                backbone_config = self.encoder.config
                # the architecture, so that a saved discriminator rebuilds without the folder
                self.register_to_config(transformers_config=_config_dict(backbone_config))
            else:
                if transformers_config is None or "model_type" not in transformers_config:
                    raise ValueError(
                        "backbone='transformers' needs `transformers_path` (a local model folder) or "
                        "`transformers_config`, a config dict with a 'model_type' key (e.g. "
                        f"Dinov2Config(...).to_dict()), got {transformers_config!r}."
                    )
                config_kwargs = dict(transformers_config)
                backbone_config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
                if getattr(backbone_config, "num_channels", in_channels) != in_channels:
                    raise ValueError(
                        f"`transformers_config` has num_channels={backbone_config.num_channels} but "
                        f"`in_channels`={in_channels}."
                    )
                self.encoder = AutoModel.from_config(backbone_config)
            if hasattr(backbone_config, "hidden_size"):
                num_features = backbone_config.hidden_size
            elif hasattr(backbone_config, "hidden_sizes"):
                num_features = backbone_config.hidden_sizes[-1]
            else:
                raise ValueError(
                    f"`transformers_config` of model_type={backbone_config.model_type!r} has neither `hidden_size` "
                    "nor `hidden_sizes`; cannot size the head."
                )
        else:
            raise ValueError(f"`backbone` must be one of {', '.join(map(repr, BACKBONES))}, got {backbone!r}.")

        self.time_embedding = None
        if num_timesteps is not None:
            if num_timesteps < 1:
                raise ValueError(f"`num_timesteps` must be None or >= 1, got {num_timesteps}.")
            self.time_proj = Timesteps(TIME_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(TIME_PROJ_DIM, num_features)
        if backbone in ("timm", "transformers"):
            check_trunk_input(self._features, self.encoder, in_channels, sample_size, _trunk_name(backbone, locals()))
        if head_type == "orthonormal":
            if embed_dim > num_features:
                raise ValueError(
                    f"head_type='orthonormal' needs embed_dim <= the backbone's feature width {num_features} (orthonormal "
                    f"rows), got embed_dim={embed_dim}."
                )
            # W [embed_dim, F], W Wᵀ = I: a product of Householder reflections of the stored parameter; without
            # torch's trivialisation buffer, which diffusers' empty-weights `from_pretrained` would not restore
            linear = nn.Linear(num_features, embed_dim, bias=False)
            self.head = orthogonal(linear, orthogonal_map="householder", use_trivialization=False)
        else:
            self.head = _maybe_spectral_norm(nn.Linear(num_features, embed_dim), spectral_norm)
        self.class_embedding = nn.Embedding(num_classes, embed_dim) if num_classes is not None else None
        # input_adapter='reinit' on a pretrained trunk: its fresh stem trains even when the rest is frozen
        pretrained = timm_pretrained_path is not None or transformers_path is not None
        self._trainable_stem = reinit_stem_name(self.encoder, pretrained, input_adapter)
        if freeze_backbone:
            self.requires_grad_(True)
            self.encoder.eval()

    def train(self, mode: bool = True) -> StructureDiscriminator:
        # a frozen backbone keeps its eval-mode behaviour (BatchNorm statistics, dropout) while the head trains
        super().train(mode)
        if self.config.freeze_backbone:
            self.encoder.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> StructureDiscriminator:
        # `freeze_backbone` survives the `requires_grad_(False)` / `requires_grad_(True)` toggling of adversarial steps
        super().requires_grad_(requires_grad)
        if self.config.freeze_backbone:
            freeze_trunk(self.encoder, self._trainable_stem, requires_grad)
        return self

    def _features(self, sample: torch.Tensor) -> torch.Tensor:
        if self.config.backbone != "transformers":
            return self.encoder(sample)  # [B, C, H, W] -> [B, num_features]
        hidden = self.encoder(pixel_values=sample).last_hidden_state
        if hidden.ndim == 4:  # conv-like models: [B, F, h, w]
            if self.config.transformers_pooling == "cls":
                raise ValueError(
                    "transformers_pooling='cls' needs a token sequence, but the backbone returned a feature map of "
                    f"shape {tuple(hidden.shape)}; use transformers_pooling='mean'."
                )
            return hidden.mean(dim=(2, 3))  # [B, F, h, w] -> [B, F]
        if self.config.transformers_pooling == "cls":
            return hidden[:, 0]  # [B, tokens, F] -> [B, F]
        return hidden.mean(dim=1)  # [B, tokens, F] -> [B, F]

    def forward(
        self,
        sample: torch.Tensor,
        class_labels: torch.LongTensor | None = None,
        timestep: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> StructureDiscriminatorOutput | tuple:
        r"""
        Embed a batch of clean samples.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Clean samples x0 (real) or denoiser predictions x̂0 (fake), in any float dtype.
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class ids; required exactly when the model was built with `num_classes`.
            timestep (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Noise level of each sample in [0, num_timesteps] (0 = clean); required exactly when the model was built
                with `num_timesteps`.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`StructureDiscriminatorOutput`] instead of a plain tuple.

        Returns:
            [`StructureDiscriminatorOutput`] or `tuple`: float32 embeddings `[batch_size, embed_dim]` with unit-norm
            rows (the first tuple element when `return_dict=False`).
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`sample` must have shape [B, {self.config.in_channels}, H, W], got {tuple(sample.shape)}."
            )
        if self.class_embedding is None and class_labels is not None:
            raise ValueError("`class_labels` were given but the discriminator was built with num_classes=None.")
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                f"The discriminator was built with num_classes={self.config.num_classes}; pass `class_labels`."
            )

        if (self.time_embedding is None) != (timestep is None):
            raise ValueError(
                f"`timestep` must be given exactly when the discriminator is noise-conditional (num_timesteps="
                f"{self.config.num_timesteps}), got timestep={'None' if timestep is None else 'a tensor'}."
            )

        features = self._features(sample.to(self.dtype))  # [B, num_features]
        if self.time_embedding is not None:
            t_emb = self.time_proj(timestep.reshape(-1)).to(features.dtype)  # [B] -> [B, TIME_PROJ_DIM]
            features = features + self.time_embedding(t_emb)  # [B, num_features]
        h = self.head(features)  # [B, num_features] -> [B, embed_dim]
        if self.class_embedding is not None:
            h = h + self.class_embedding(class_labels)  # [B, embed_dim]
        # L2 normalisation bounds the maximising player (METHODS.md §1.2 item 1)
        embeddings = F.normalize(h.float(), dim=-1)  # [B, embed_dim], unit rows

        if not return_dict:
            return (embeddings,)
        return StructureDiscriminatorOutput(embeddings=embeddings)
