"""Latent diffusion plumbing: pretrained pipeline folders, the VAE, latent sampling and the on-disk latent cache.

A latent DiT (the `facebook/DiT-XL-2-256` layout: `transformer/`, `vae/`, `scheduler/`, `model_index.json`) trains on
    z₀ = s · (μ_φ(x) + σ_φ(x) · n),  n ~ N(0, I),  s = the VAE config's `scaling_factor` (0.18215 for DiT's VAE),
i.e. a fresh sample of the VAE posterior q_φ(z | x) at every step, and samples are decoded with x = D_φ(z / s).

`--cache_latents` stores the posterior moments (μ, log σ²) of every image instead of a sample, for the image and for its
horizontal flip (a VAE is not flip-equivariant: the moments of a flipped image are not the flipped moments), so a cached
run draws the same flips and the same posterior noise as an uncached one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
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
CACHE_FORMAT = 1
CACHE_DTYPES = ("float32", "float16", "bfloat16")
# how each storage dtype is written to .npy (numpy has no bfloat16: its bit pattern is stored as int16)
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2")}


def _to_storage(moments: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return moments.to(torch.bfloat16).view(torch.int16).numpy()
    return moments.to(getattr(torch, dtype)).numpy()


def _from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))  # a copy: the memory map stays read-only
    return (tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor).float()


class ShardedMoments:
    """The moments of a sharded latent cache: `[N, 2, 2c, h, w]` float32 items read from memory-mapped `.npy` shards.

    `moments[index, flip]` reads one `[2c, h, w]` entry (stored in float32, float16 or bfloat16, returned as float32);
    nothing but the shard headers is read up front, and each process (DataLoader workers included) maps the files itself.
    """

    def __init__(self, files: list[Path], starts: list[int], num_images: int, dtype: str, item_shape: tuple):
        self.files, self.starts, self.dtype = files, starts, dtype
        self.shape = (num_images, *item_shape)
        self._arrays = None

    @property
    def arrays(self) -> list[np.memmap]:
        if self._arrays is None:
            self._arrays = [np.load(file, mmap_mode="r") for file in self.files]
        return self._arrays

    def __getstate__(self) -> dict:  # workers started by spawn re-map the files instead of pickling their contents
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, flip = key
        shard = bisect.bisect_right(self.starts, index) - 1
        return _from_storage(self.arrays[shard][index - self.starts[shard], flip], self.dtype)


class LatentCacheDataset(Dataset):
    """Cached posterior moments of an `ImageLabelDataset`, flips included; items `{"latent_moments", "class_labels"?}`.

    `moments` is `[N, 2, 2c, h, w]` (a tensor, or the `ShardedMoments` of a sharded cache): index 1 along dim 1 holds
    the moments of the horizontally flipped image. Keys are those of `EpochShuffleSampler` (`epoch * N + index`) and the
    flip is drawn exactly as `ImageLabelDataset` draws it. Items are float32 whatever the storage dtype.
    """

    items_are_cheap = True  # a memory-map read: DataLoader workers would only add their copies (`resolve_num_workers`)

    def __init__(self, moments: torch.Tensor | ShardedMoments, images):
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
        item = {"latent_moments": self.moments[index, int(flipped)].to(torch.float32, copy=True)}
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


def shard_range(num_images: int, batch_size: int, rank: int, world_size: int) -> range:
    """The images process `rank` of `world_size` encodes: a contiguous run of whole `batch_size` batches, so that every
    encoder call sees the same images whatever the number of processes (and the cache is the same, bit for bit)."""
    num_batches = math.ceil(num_images / batch_size)
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return range(first * batch_size, min(last * batch_size, num_images))


def _shard_stem(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop:09d}"


def _read_manifests(folder: Path, fingerprint: str | None, num_images: int, dtype: str | None) -> list[dict]:
    """The finished shards of a cache folder (those with a manifest), checked against the settings of this run.

    A shard written with other settings, or whose data file does not match its manifest, stops the run naming it;
    nothing is removed. A data file without a manifest is an unfinished shard: it is not listed (and gets rebuilt).
    """
    found = []
    for manifest in sorted(folder.glob("shard-*.json")):
        try:
            info = json.loads(manifest.read_text())
            why = None if isinstance(info, dict) else "not a JSON object"
        except json.JSONDecodeError as error:
            why = f"JSONDecodeError: {error}"
        if why is None and (missing := {"start", "stop", "item_shape", "file", "dtype"} - set(info)):
            why = f"no {', '.join(sorted(missing))}"
        elif why is None and info["dtype"] not in CACHE_DTYPES:
            why = f"dtype {info['dtype']!r}"
        if why is not None:
            raise ValueError(
                f"The latent cache manifest {manifest} cannot be read ({why}): it is damaged. Delete {folder} to "
                "rebuild the cache."
            )
        expected = {"format": CACHE_FORMAT, "num_images": num_images}
        if fingerprint is not None:
            expected["fingerprint"] = fingerprint
        if dtype is not None:
            expected["dtype"] = dtype
        bad = [f"{k}={info.get(k)!r} (this run: {v!r})" for k, v in expected.items() if info.get(k) != v]
        if bad:
            only_dtype = dtype is not None and len(bad) == 1 and info.get("dtype") != dtype
            hint = f"pass --latent_cache_dtype {info.get('dtype')} to use it, or " if only_dtype else ""
            raise ValueError(
                f"The latent cache shard {manifest} was written with other settings: {', '.join(bad)}. Nothing was "
                f"removed: {hint}delete {folder} (or pass another --data_cache_dir) to rebuild it."
            )
        data = folder / info["file"]
        shape = [info["stop"] - info["start"], *info["item_shape"]]
        try:
            array = np.load(data, mmap_mode="r")
            ok = list(array.shape) == shape and array.dtype == _NUMPY_DTYPES[info["dtype"]]
        except (OSError, ValueError) as error:
            ok, shape = False, f"{shape} ({type(error).__name__}: {error})"
        if not ok:
            raise ValueError(
                f"The latent cache shard {data} does not match its manifest {manifest} (expected {info['dtype']} "
                f"moments of shape {shape}): it is damaged. Delete {folder} to rebuild the cache."
            )
        found.append({**info, "path": data})
    return found


def _tiling(shards: list[dict], num_images: int) -> list[dict] | None:
    """Shards that cover images 0..N-1 exactly once, in order, or None; shards of several process counts may lie side by
    side (fewest shards first where there is a choice)."""
    step = {num_images: None}  # position -> the shard to take there on a path that reaches N
    for position in sorted({s["start"] for s in shards if s["stop"] <= num_images}, reverse=True):
        reaching = [s for s in shards if s["start"] == position and s["stop"] in step and s["stop"] > position]
        if reaching:
            step[position] = max(reaching, key=lambda s: s["stop"])
    if 0 not in step:
        return None
    chosen, position = [], 0
    while position < num_images:
        chosen.append(step[position])
        position = step[position]["stop"]
    return chosen


def build_latent_cache(
    images,
    vae: AutoencoderKL,
    cache_dir: str | os.PathLike,
    batch_size: int = 32,
    disable_progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    dtype: str = "float32",
) -> Path:
    """Encode every image and its flip once into the folder `<cache_dir>/latents-<fingerprint>/` and return it.

    Process `rank` of `world_size` encodes its shard (`shard_range`, `2 * batch_size` images per encoder call) into
    `shard-<start>-<stop>.npy`, written batch by batch (peak memory: one batch, whatever the dataset size), then its
    manifest `shard-<start>-<stop>.json` (fingerprint, dtype, shape). The data file is renamed into place before the
    manifest is written, so a killed run leaves no shard that looks finished: a shard without a manifest is rebuilt.
    A cache that is complete already (from any number of processes) is reused; finished shards are never rewritten.
    Call it on every process, then wait for all of them (`accelerator.wait_for_everyone()`) before `load_latent_cache`.

    Args:
        dtype (`str`): how the moments are stored: "float32", or "float16"/"bfloat16" (half the disk and page cache;
            items are read back as float32). A folder written with another dtype stops the build, naming it.

    Random crops cannot be cached (a cached latent cannot be re-cropped): an image that would be randomly cropped
    stops the build, naming it.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"--latent_cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a process of world size {world_size}.")
    fingerprint, num_images = cache_fingerprint(images, vae), len(images)
    folder = Path(cache_dir) / f"latents-{fingerprint}"
    folder.mkdir(parents=True, exist_ok=True)
    shards = _read_manifests(folder, fingerprint, num_images, dtype)
    if _tiling(shards, num_images) is not None:
        logger.info(f"Reusing the latent cache {folder}")
        return folder
    mine = shard_range(num_images, batch_size, rank, world_size)
    stem = _shard_stem(mine.start, mine.stop)
    if not mine or any(s["start"] == mine.start and s["stop"] == mine.stop for s in shards):
        return folder  # nothing to encode here, or this shard was finished by an earlier run
    data, manifest = folder / f"{stem}.npy", folder / f"{stem}.json"
    tmp = folder / f".tmp-{stem}-{os.getpid()}.npy"
    item_shape = None
    try:
        with open(tmp, "wb") as file:
            starts = range(mine.start, mine.stop, batch_size)
            for start in tqdm(starts, desc=f"caching latents ({stem})", disable=disable_progress):
                indices = range(start, min(start + batch_size, mine.stop))
                pixels = torch.stack([images.pixels(index) for index in indices])
                both = torch.cat([pixels, pixels.flip(-1)])  # [2B, C, H, W]: images, then their mirror images
                plain, flipped = encode_moments(vae, both).cpu().chunk(2)
                batch = torch.stack([plain, flipped], dim=1)  # [B, 2, 2c, h, w]
                if item_shape is None:  # the .npy header, then the rows as they come
                    item_shape = tuple(batch.shape[1:])
                    header = {
                        "descr": np.lib.format.dtype_to_descr(_NUMPY_DTYPES[dtype]),
                        "fortran_order": False,
                        "shape": (len(mine), *item_shape),
                    }
                    np.lib.format.write_array_header_1_0(file, header)
                file.write(np.ascontiguousarray(_to_storage(batch, dtype)).tobytes())
                del pixels, both, plain, flipped, batch
        os.replace(tmp, data)
    finally:
        if tmp.exists():
            tmp.unlink()
    info = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "dtype": dtype,
        "num_images": num_images,
        "start": mine.start,
        "stop": mine.stop,
        "item_shape": list(item_shape),
        "file": data.name,
    }
    tmp_manifest = folder / f".tmp-{stem}-{os.getpid()}.json"
    tmp_manifest.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp_manifest, manifest)
    logger.info(f"Wrote the latent cache shard {data} ({len(mine)} images, {dtype})")
    return folder


def load_latent_cache(path: str | os.PathLike, images) -> LatentCacheDataset:
    """The `LatentCacheDataset` of a cache folder from `build_latent_cache` (its shards memory-mapped, none read into
    memory), or of a single `latents-*.pt` file written by earlier versions (also memory-mapped).

    An incomplete folder (a shard still missing: was every process's build waited for?) stops the run naming it."""
    path = Path(path)
    if path.is_file():
        return LatentCacheDataset(torch.load(path, map_location="cpu", weights_only=True, mmap=True), images)
    num_images = len(images)
    fingerprint = path.name[len("latents-") :] if path.name.startswith("latents-") else None
    shards = _read_manifests(path, fingerprint, num_images, None)
    tiling = _tiling(shards, num_images)
    if tiling is None:
        covered = sorted((s["start"], s["stop"]) for s in shards)
        raise ValueError(
            f"The latent cache {path} is incomplete: its finished shards cover images {covered} of 0..{num_images - 1} "
            "(a process's build did not finish; run again to rebuild the missing shards)."
        )
    dtypes = {s["dtype"] for s in tiling}
    shapes = {tuple(s["item_shape"]) for s in tiling}
    if len(dtypes) > 1 or len(shapes) > 1:
        raise ValueError(f"The shards of the latent cache {path} mix dtypes {dtypes} or shapes {shapes}.")
    moments = ShardedMoments(
        [s["path"] for s in tiling], [s["start"] for s in tiling], num_images, dtypes.pop(), shapes.pop()
    )
    return LatentCacheDataset(moments, images)


def check_transformer_fits_latents(
    model: DiTTransformer2DModel, vae: AutoencoderKL, vae_source: str, resolution: int, source: str
) -> None:
    """A DiT for latents must take exactly the VAE's latents of `--resolution` images (names both components)."""
    latent_channels, latent_size = vae.config.latent_channels, resolution // vae_downsample_factor(vae)
    check_dit_fits(model, latent_size, latent_channels, source, inputs=describe_latents(vae_source, vae, resolution))
