"""DiffAugment for the discriminators' inputs (Zhao et al., NeurIPS 2020, arXiv 2006.10738): differentiable colour,
translation and cutout, applied with **one draw per sample shared by every tensor passed**, so a real sample and the
denoiser's prediction of it are transformed alike (SADM compares them in pairs; the GAN term sees them as one batch).

    augment = DiffAugment("translation,cutout,color")
    real_aug, fake_aug = augment(real, fake, generator=generator)     # gradients flow into fake

Pure torch; the draws come from `generator` (one, or one per sample for draws that do not depend on the batch split).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("color", "translation", "cutout")


def _uniform(
    batch: int,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """U[0, 1) of shape `[batch, *shape]` on `device`; a list of generators draws sample i from `generator[i]`."""
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch}.")
        return torch.cat([_uniform(1, shape, device, g) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.rand((batch, *shape), generator=generator, device=draw_device).to(device)


class DiffAugment:
    r"""
    The DiffAugment policy: a sequence of differentiable transforms with per-sample parameters.

    - `color`: brightness x + (r − ½), saturation (x − x̄_c)·2r + x̄_c (x̄_c: the mean over channels), contrast
      (x − x̄)·(r + ½) + x̄ (x̄: the mean of the sample), r ~ U[0, 1) each.
    - `translation`: an integer shift of up to ±`translation_ratio`·size along each axis, zeros shifted in.
    - `cutout`: a square of side `cutout_ratio`·size set to zero, centred anywhere (clipped at the border).

    Args:
        policy (`str` or `Sequence[str]`): comma-separated names from `AUGMENTATIONS`, applied in this order.
        translation_ratio (`float`, defaults to 0.125): the paper's 1/8 of the image size.
        cutout_ratio (`float`, defaults to 0.5): the paper's half of the image size.
    """

    def __init__(
        self, policy: str | Sequence[str], translation_ratio: float = 0.125, cutout_ratio: float = 0.5
    ) -> None:
        names = [p.strip() for p in policy.split(",")] if isinstance(policy, str) else list(policy)
        names = [n for n in names if n]
        bad = [n for n in names if n not in AUGMENTATIONS]
        if bad or not names:
            raise ValueError(
                f"DiffAugment policy {policy!r}: choose from {', '.join(AUGMENTATIONS)}, got {bad or 'none'}."
            )
        if not 0 <= translation_ratio < 1:
            raise ValueError(f"translation_ratio={translation_ratio} must be in [0, 1).")
        if not 0 < cutout_ratio <= 1:
            raise ValueError(f"cutout_ratio={cutout_ratio} must be in (0, 1].")
        self.policy = tuple(names)
        self.translation_ratio = float(translation_ratio)
        self.cutout_ratio = float(cutout_ratio)

    def __repr__(self) -> str:
        return f"DiffAugment(policy={','.join(self.policy)!r}, translation_ratio={self.translation_ratio}, cutout_ratio={self.cutout_ratio})"

    def __call__(
        self, *tensors: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Augment every tensor `[B, C, H, W]` (all of one shape) with the same per-sample draw; returns a tuple."""
        if not tensors or any(t.shape != tensors[0].shape or t.ndim != 4 for t in tensors):
            raise ValueError(
                f"DiffAugment needs tensors of one [B, C, H, W] shape, got {[tuple(t.shape) for t in tensors]}."
            )
        batch, _, height, width = tensors[0].shape
        device = tensors[0].device
        for name in self.policy:
            if name == "color":
                r = _uniform(
                    batch, (3, 1, 1, 1), device, generator
                )  # [B, 3, 1, 1, 1]: brightness, saturation, contrast
                tensors = tuple(_color(t, r) for t in tensors)
            elif name == "translation":
                r = _uniform(batch, (2,), device, generator)  # [B, 2]
                tensors = tuple(_translate(t, r, self.translation_ratio) for t in tensors)
            elif name == "cutout":
                r = _uniform(batch, (2,), device, generator)  # [B, 2]
                mask = _cutout_mask(batch, height, width, r, self.cutout_ratio, device)  # [B, 1, H, W]
                tensors = tuple(t * mask.to(t.dtype) for t in tensors)
        return tensors


def _color(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    r = r.to(x.dtype)
    x = x + (r[:, 0] - 0.5)  # brightness
    channel_mean = x.mean(dim=1, keepdim=True)  # [B, 1, H, W]
    x = (x - channel_mean) * (2 * r[:, 1]) + channel_mean  # saturation
    sample_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    return (x - sample_mean) * (r[:, 2] + 0.5) + sample_mean  # contrast


def _translate(x: torch.Tensor, r: torch.Tensor, ratio: float) -> torch.Tensor:
    batch, _, height, width = x.shape
    max_shift = torch.tensor([int(height * ratio + 0.5), int(width * ratio + 0.5)], device=x.device)  # [2]
    shift = (r * (2 * max_shift + 1)).long() - max_shift  # [B, 2], integers in [−s, s]
    pad_h, pad_w = int(max_shift[0]), int(max_shift[1])
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))  # [B, C, H + 2s_h, W + 2s_w], zeros around
    rows = torch.arange(height, device=x.device)[None, :] + pad_h - shift[:, :1]  # [B, H]: output row i reads i − dy
    cols = torch.arange(width, device=x.device)[None, :] + pad_w - shift[:, 1:]  # [B, W]
    index = torch.arange(batch, device=x.device)[:, None, None]  # [B, 1, 1]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]


def _cutout_mask(
    batch: int, height: int, width: int, r: torch.Tensor, ratio: float, device: torch.device
) -> torch.Tensor:
    size_h, size_w = max(int(height * ratio + 0.5), 1), max(int(width * ratio + 0.5), 1)
    top = (r[:, 0] * height).long() - size_h // 2  # [B]: centre on any pixel, the square clipped at the border
    left = (r[:, 1] * width).long() - size_w // 2
    rows = torch.arange(height, device=device)[None, :]  # [1, H]
    cols = torch.arange(width, device=device)[None, :]  # [1, W]
    inside_h = (rows >= top[:, None]) & (rows < top[:, None] + size_h)  # [B, H]
    inside_w = (cols >= left[:, None]) & (cols < left[:, None] + size_w)  # [B, W]
    return (~(inside_h[:, :, None] & inside_w[:, None, :])).float()[:, None]  # [B, 1, H, W], 0 in the square
