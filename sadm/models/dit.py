"""DiT presets (the paper's table plus a CPU-sized `tiny`) and building diffusers' `DiTTransformer2DModel` from them."""

from __future__ import annotations

import functools

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

# Peebles & Xie 2023, Table 1: depth, hidden size (= heads x head dim), heads; the patch size is the "/p" of the name.
DIT_PRESETS: dict[str, dict[str, int]] = {
    # 4 blocks, width 128: ~0.9M parameters, ~50 ms per step at batch 32 on 16x16 on two CPU cores
    "tiny": {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2},
    **{
        f"DiT-{size}/{patch}": {
            "num_layers": depth,
            "num_attention_heads": heads,
            "attention_head_dim": width // heads,
            "patch_size": patch,
        }
        for size, (depth, width, heads) in {
            "S": (12, 384, 6),
            "B": (12, 768, 12),
            "L": (24, 1024, 16),
            "XL": (28, 1152, 16),
        }.items()
        for patch in (2, 4, 8)
    },
}


def disable_label_dropout(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Turn off diffusers' label dropout, which drops labels independently inside every block in train mode.

    The null row of the label table (id = class count) stays; classifier-free-guidance dropout is done once per sample by
    the training loop instead, so a dropped sample is unconditional in every block.
    """
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def float32_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Run every LayerNorm/GroupNorm of `model` in float32 under bf16/fp16 autocast (output float32), in place.

    CUDA's autocast already keeps normalisations in float32; CPU's autocast runs them in bf16. Idempotent.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and "forward" not in vars(module):
            module.forward = _float32_forward(module.forward)  # an instance attribute shadows the class's forward
    return model


def _float32_forward(forward):
    @functools.wraps(forward)
    def float32_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())

    return float32_forward


def build_dit(
    preset: str = "tiny",
    sample_size: int = 16,
    in_channels: int = 1,
    num_classes: int = 10,
    learn_sigma: bool = False,
    seed: int | None = None,
) -> DiTTransformer2DModel:
    """A randomly initialised DiT from a preset.

    Args:
        preset (`str`): a key of `DIT_PRESETS` (`tiny`, `DiT-S/2` ... `DiT-XL/8`).
        sample_size (`int`): spatial size of the model input (pixels, or latents when a VAE is used).
        in_channels (`int`): channels of the model input.
        num_classes (`int`): class count K; the null class used for guidance is id K. 0 means unconditional, stored as a
            single class 0 that is always passed.
        learn_sigma (`bool`): output 2C channels (ε and the variance interpolation v) for the improved-DDPM hybrid loss.
    """
    if preset not in DIT_PRESETS:
        raise ValueError(f"--model '{preset}' is not a preset; choose one of {sorted(DIT_PRESETS)}.")
    shape = DIT_PRESETS[preset]
    if sample_size % shape["patch_size"] != 0:
        raise ValueError(
            f"Input size {sample_size} is not divisible by the patch size {shape['patch_size']} of preset '{preset}'."
        )
    if seed is not None:
        torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        sample_size=sample_size,
        num_embeds_ada_norm=max(num_classes, 1),
        **shape,
    )
    return disable_label_dropout(model)


def check_dit_fits(
    model: DiTTransformer2DModel,
    sample_size: int,
    in_channels: int,
    source: str = "the model",
    inputs: str = "the data",
) -> None:
    """Raise a clear error when a DiT cannot take inputs of the given shape (`inputs` names where they come from)."""
    config = model.config
    if config.in_channels != in_channels:
        raise ValueError(f"{source} has in_channels={config.in_channels} but {inputs} has {in_channels} channels.")
    if config.sample_size != sample_size:
        raise ValueError(
            f"{source} has sample_size={config.sample_size} but {inputs} gives {sample_size}x{sample_size} inputs."
        )
    if sample_size % config.patch_size != 0:
        raise ValueError(
            f"Input size {sample_size} is not divisible by the patch size {config.patch_size} of {source}."
        )
    if config.out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"{source} has out_channels={config.out_channels}; expected {in_channels} or {2 * in_channels}."
        )
