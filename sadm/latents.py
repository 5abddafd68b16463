"""Latent diffusion plumbing: pretrained pipeline folders, the VAE, latent sampling and the on-disk latent cache.

A latent DiT (the `facebook/DiT-XL-2-256` layout: `transformer/`, `vae/`, `scheduler/`, `model_index.json`) trains on
    z₀ = s · (μ_φ(x) + σ_φ(x) · n),  n ~ N(0, I),  s = the VAE config's `scaling_factor` (0.18215 for DiT's VAE),
i.e. a fresh sample of the VAE posterior q_φ(z | x) at every step, and samples are decoded with x = D_φ(z / s).

`--cache_latents` stores the posterior moments (μ, log σ²) of every image instead of a sample, for the image and for its
horizontal flip (a VAE is not flip-equivariant: the moments of a flipped image are not the flipped moments), so a cached
run draws the same flips and the same posterior noise as an uncached one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .models.dit import check_dit_fits

logger = logging.getLogger(__name__)

# DiT's training noise schedule (Peebles & Xie 2023, after ADM): linear β from 1e-4 to 0.02
DIT_BETA_SCHEDULE = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
CONFIG_FILES = {"scheduler": "scheduler_config.json"}  # every other diffusers component has a config.json


# ------------------------------------------------------------------------------------------------- pretrained pipelines
def pretrained_components(name_or_path: str) -> dict[str, str]:
    """The components `model_index.json` of a pipeline lists, as {name: class name}; {} when there is no index.

    A local folder must hold every listed component (a clear error names the missing one) and a `transformer/`.
    """
    local = os.path.isdir(name_or_path)
    if local and not os.path.isfile(os.path.join(name_or_path, "model_index.json")):
        index = {}
    else:
        try:
            index = DiffusionPipeline.load_config(name_or_path)
        except OSError:  # a hub repo (or folder) with a transformer/ but no pipeline index
            index = {}
    components = {
        name: value[1]
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] is not None
    }
    if local:
        for name in sorted(set(components) | {"transformer"}):
            config = os.path.join(name_or_path, name, CONFIG_FILES.get(name, "config.json"))
            if not os.path.isfile(config):
                listed = " (model_index.json lists it)" if name in components else ""
                raise ValueError(
                    f"--pretrained_model_name_or_path {name_or_path} has no {name}/ component{listed}: "
                    f"{config} is missing."
                )
    return components


def check_noise_schedule(name_or_path: str, num_train_timesteps: int) -> None:
    """A pretrained pipeline's `scheduler/` must describe the noise schedule we train with (DiT's linear β, T steps)."""
    config = DDPMScheduler.load_config(name_or_path, subfolder="scheduler")  # reads scheduler_config.json
    expected = {**DIT_BETA_SCHEDULE, "num_train_timesteps": num_train_timesteps}
    found = {key: config.get(key) for key in expected}
    bad = [key for key in expected if found[key] != expected[key]]
    if bad:
        raise ValueError(
            f"{name_or_path}/scheduler was trained with {', '.join(f'{k}={found[k]}' for k in bad)} but sadm trains with "
            f"{', '.join(f'{k}={expected[k]}' for k in bad)} (--num_train_timesteps sets the step count)."
        )


# ---------------------------------------------------------------------------------------------------------------- VAE
def load_vae(vae_name_or_path: str | None, pretrained_name_or_path: str | None, components: dict[str, str]):
    """The frozen VAE of a latent model: `--vae_name_or_path` (a VAE folder or hub id, or a pipeline with a `vae/`),
    else the pretrained pipeline's `vae/`, else None (pixel space). Returns `(vae, source)`."""
    if vae_name_or_path is not None:
        source, subfolder = vae_name_or_path, None
        if os.path.isdir(vae_name_or_path) and not os.path.isfile(os.path.join(vae_name_or_path, "config.json")):
            if not os.path.isfile(os.path.join(vae_name_or_path, "vae", "config.json")):
                raise ValueError(
                    f"--vae_name_or_path {vae_name_or_path} has neither a config.json nor a vae/config.json."
                )
            source, subfolder = os.path.join(vae_name_or_path, "vae"), "vae"
        vae = AutoencoderKL.from_pretrained(vae_name_or_path, subfolder=subfolder)
    elif "vae" in components:
        source = f"{pretrained_name_or_path}/vae"
        vae = AutoencoderKL.from_pretrained(pretrained_name_or_path, subfolder="vae")
    else:
        return None, None
    if vae.config.get("shift_factor") is not None:
        raise ValueError(
            f"The VAE {source} has shift_factor={vae.config.shift_factor}; DiT latents are only scaled (z = s·E(x)), "
            "and neither DiTPipeline nor SADMDiTPipeline would undo a shift."
        )
    vae.requires_grad_(False).eval()
    return vae, source


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: each encoder block but the last halves the resolution."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_vae_fits(vae: AutoencoderKL, source: str, resolution: int, num_channels: int) -> tuple[int, int]:
    """Raise a clear error when the VAE cannot encode the data; returns the latent (channels, size)."""
    factor = vae_downsample_factor(vae)
    if vae.config.in_channels != num_channels:
        raise ValueError(
            f"The VAE {source} encodes {vae.config.in_channels}-channel images but the data has {num_channels} "
            f"channel(s){' (pass --num_channels 3 to read greyscale images as RGB)' if num_channels == 1 else ''}."
        )
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by the VAE's downsampling factor {factor} ({source})."
        )
    return vae.config.latent_channels, resolution // factor


def describe_latents(source: str, vae: AutoencoderKL, resolution: int) -> str:
    """How error messages name the latent inputs a DiT must take."""
    factor = vae_downsample_factor(vae)
    return (
        f"the VAE {source} (latent_channels={vae.config.latent_channels}, downsampling {factor}x: "
        f"--resolution {resolution} -> {resolution // factor}x{resolution // factor} latents)"
    )


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """Posterior moments of images in [-1, 1]: `[B, C, H, W]` -> `[B, 2c, h, w]` = (μ, log σ²) along channels."""
    posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    # posterior.logvar is clamped to [-30, 20], as diffusers samples it. Contiguous: CPU convolutions may return
    # channels-last tensors, and `randn_like` of a differently laid out tensor draws other numbers (cached != uncached)
    return torch.cat([posterior.mean, posterior.logvar], dim=1).float().contiguous()


def sample_latents(
    moments: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z₀ = s · (μ + σ·n), n ~ N(0, I) from `generator` (the global RNG by default, so a resumed run draws the same n)."""
    mean, logvar = moments.chunk(2, dim=1)  # [B, c, h, w] each
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (scaling_factor * (mean + torch.exp(0.5 * logvar) * noise)).contiguous()


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """x = D(z / s) in about [-1, 1]. Differentiable in `latents` (the decoder's own weights stay frozen)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.to(latents.dtype)


# ------------------------------------------------------------------------------------------------------- latent cache
class LatentCacheDataset(Dataset):
    """Cached posterior moments of an `ImageLabelDataset`, flips included; items `{"latent_moments", "class_labels"?}`.

    `moments` is `[N, 2, 2c, h, w]`: index 1 along dim 1 holds the moments of the horizontally flipped image. Keys are
    those of `EpochShuffleSampler` (`epoch * N + index`) and the flip is drawn exactly as `ImageLabelDataset` draws it.
    """

    def __init__(self, moments: torch.Tensor, images):
        self.moments = moments
        self.images = images  # the pixel dataset: labels, flip rule, augment seed
        self.labels, self.id2label, self.num_classes = images.labels, images.id2label, images.num_classes
        self.random_flip = images.random_flip
        self.augment_seed = images.augment_seed

    def __len__(self) -> int:
        return self.moments.shape[0]

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        index = key % len(self)
        flipped = self.random_flip and self.images.draw_flip(key, seed=self.augment_seed)
        item = {"latent_moments": self.moments[index, int(flipped)].clone()}
        if self.labels is not None:
            item["class_labels"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


def collate_latents(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    moments = torch.stack([e["latent_moments"] for e in examples])
    labels = torch.stack([e["class_labels"] for e in examples]) if "class_labels" in examples[0] else None
    return {"latent_moments": moments, "class_labels": labels}


def cache_fingerprint(images, vae: AutoencoderKL) -> str:
    """What the cached moments depend on: the image list (names, sizes, mtimes), the transform and the VAE weights."""
    digest = hashlib.sha256()
    files = []
    for index in range(len(images)):
        name = images.describe(index)
        stat = os.stat(name) if os.path.isfile(name) else None
        files.append([name, stat.st_size, stat.st_mtime_ns] if stat else [name])
    settings = {
        "files": files,
        "resolution": images.resolution,
        "center_crop": images.center_crop,
        "num_channels": images.num_channels,
        "vae_config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_latent_cache(
    images, vae: AutoencoderKL, cache_dir: str | os.PathLike, batch_size: int = 32, disable_progress: bool = False
) -> Path:
    """Encode every image and its flip once into `<cache_dir>/latents-<fingerprint>.pt` (reused when it exists),
    `2 * batch_size` images per encoder call.

    The file is written under a temporary name and renamed into place, so a killed run never leaves a partial cache.
    Random crops cannot be cached (a cached latent cannot be re-cropped): an image that would be randomly cropped
    stops the build, naming it.
    """
    path = Path(cache_dir) / f"latents-{cache_fingerprint(images, vae)}.pt"
    if path.exists():
        logger.info(f"Reusing the latent cache {path}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    moments = []
    for start in tqdm(range(0, len(images), batch_size), desc="caching latents", disable=disable_progress):
        pixels = torch.stack([images.pixels(index) for index in range(start, min(start + batch_size, len(images)))])
        both = torch.cat([pixels, pixels.flip(-1)])  # [2B, C, H, W]: images, then their mirror images
        plain, flipped = encode_moments(vae, both).cpu().chunk(2)
        moments.append(torch.stack([plain, flipped], dim=1))  # [B, 2, 2c, h, w]
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    torch.save(torch.cat(moments), tmp)
    os.replace(tmp, path)
    logger.info(f"Wrote the latent cache {path}")
    return path


def load_latent_cache(path: str | os.PathLike, images) -> LatentCacheDataset:
    moments = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return LatentCacheDataset(moments, images)


def check_transformer_fits_latents(
    model: DiTTransformer2DModel, vae: AutoencoderKL, vae_source: str, resolution: int, source: str
) -> None:
    """A DiT for latents must take exactly the VAE's latents of `--resolution` images (names both components)."""
    latent_channels, latent_size = vae.config.latent_channels, resolution // vae_downsample_factor(vae)
    check_dit_fits(model, latent_size, latent_channels, source, inputs=describe_latents(vae_source, vae, resolution))
