"""Sample a pipeline or read saved images, extract features sharded over processes, and compute `sadm.metrics`.

Shared by `scripts/evaluate.py` and the training scripts (in-training evaluation). Work is sharded with accelerate's
`prepare_data_loader` (each process gets whole batches) and collected with `Accelerator.gather_for_metrics`, which drops the
samples repeated to even out the last batches, then put back in dataset order; every process returns the same numbers.
Generated sample i always uses its own generator seeded from (`seed`, i), so the images, and hence the metrics, do not
depend on the batch size or on the number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .metrics import FEATURE_METRICS, FeatureStatistics, conditional_accuracy, evaluate_features, inception_score

# every metric name `evaluate_pipeline` / `evaluate_samples` accept
METRICS = (*FEATURE_METRICS, "is", "accuracy")


class ImageTensorDataset(Dataset):
    """Images already in memory, `[N, C, H, W]` float in [-1, 1], with optional labels `[N]`; items as `sadm.data` yields."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}.")
        if labels is not None and labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [{images.shape[0]}], got shape {tuple(labels.shape)}.")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.images[index]}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        return item


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W, C]` (or `[N, H, W]`) -> float `[N, C, H, W]` in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, C, H, W]


def load_images_npz(path: str | os.PathLike, num_samples: int | None = None) -> ImageTensorDataset:
    """An `.npz` with `images` (uint8, `[N, H, W, C]` or `[N, H, W]`) and optional `labels` (`[N]` ints)."""
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data:
            raise ValueError(f"{path} has no 'images' array (it has {list(data.keys())}).")
        images, labels = data["images"], data["labels"] if "labels" in data else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(
            f"{path}: 'images' must be uint8 [N, H, W, 1 or 3] or [N, H, W], got {images.dtype} {images.shape}."
        )
    if labels is not None and (labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: 'labels' must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}.")
    if num_samples is not None:
        images, labels = images[:num_samples], labels[:num_samples] if labels is not None else None
    return ImageTensorDataset(uint8_to_tensor(images), torch.from_numpy(labels).long() if labels is not None else None)


def load_image_folder(path: str | os.PathLike, num_samples: int | None = None) -> ImageTensorDataset:
    """Every `*.png` of a folder (sorted by name), unlabeled; greyscale when all of them are, else RGB."""
    files = sorted(Path(path).glob("*.png"))[:num_samples]
    if not files:
        raise ValueError(f"--samples {path} contains no .png files.")
    pil_images = []
    for file in files:
        with Image.open(file) as image:
            image.load()
            pil_images.append(image)
    mode = "L" if all(image.mode in ("1", "L") for image in pil_images) else "RGB"
    arrays = [np.asarray(image.convert(mode)) for image in pil_images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"The PNGs in {path} have different sizes {sorted(shapes)}; all samples must have one size.")
    return ImageTensorDataset(uint8_to_tensor(np.stack(arrays)))


class _WithIndex(Dataset):
    """Items of a dataset plus their index, so that gathered outputs can be put back in dataset order."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.dataset[index], "index": torch.tensor(index)}


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    batch["index"] = torch.stack([e["index"] for e in examples])
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.stack([torch.as_tensor(e["class_labels"]) for e in examples])
    return batch


def _shard(
    dataset: Dataset, batch_size: int, accelerator: Accelerator, collate_fn=None, num_workers: int = 0
) -> DataLoader:
    """A DataLoader whose batches are split over processes (not registered with the accelerator: no checkpoint state)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
    )


def _run_networks(
    images: torch.Tensor,
    feature_network: torch.nn.Module,
    with_logits: bool,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Features (and feature-network logits, classifier logits) of images `[B, C, H, W]` in [-1, 1]."""
    if with_logits:
        features, logits = feature_network.features_and_logits(images)
        out = {"features": features.float(), "logits": logits.float()}
    else:
        out = {"features": feature_network(images).float()}
    if classifier is not None:
        with torch.no_grad():
            out["class_logits"] = classifier(images).float()
    return out


def _concat_in_order(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate gathered chunks and sort them by their `index` (processes interleave batches)."""
    out = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    order = out.pop("index").argsort()
    return {key: value[order] for key, value in out.items()}


def check_metrics(metrics, feature_network: torch.nn.Module, classifier) -> None:
    """Fail before any work when a requested metric cannot be computed with these networks."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics {unknown} are unknown; choose from {METRICS}.")
    if "is" in metrics and not hasattr(feature_network, "features_and_logits"):
        raise ValueError(
            f"--metrics is needs class logits, which feature network '{feature_network.identity}' does not give."
        )
    if "accuracy" in metrics and classifier is None:
        raise ValueError("--metrics accuracy needs a classifier (the digit classifier for the digits data).")


def extract_features(
    feature_network: torch.nn.Module,
    dataset: Dataset,
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    with_logits: bool = False,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    desc: str = "features",
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Features of every image of a dataset (items `{"pixel_values": [C, H, W] in [-1, 1], "class_labels"?}`).

    Returns:
        `dict` with `features` `[N, D]`, plus `logits` (feature network's, when `with_logits`), `class_logits` (when a
        `classifier` is given) and `labels` (when the dataset is labeled), in dataset order, on `accelerator.device`,
        identical on all processes.
    """
    if len(dataset) == 0:
        raise ValueError(f"The {desc} dataset is empty.")
    accelerator = accelerator or Accelerator()
    feature_network.to(accelerator.device)
    chunks = []
    loader = _shard(_WithIndex(dataset), batch_size, accelerator, _collate, num_workers)
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        out = _run_networks(batch["pixel_values"], feature_network, with_logits, classifier)
        out["index"] = batch["index"]
        if "class_labels" in batch:
            out["labels"] = batch["class_labels"]
        chunks.append(accelerator.gather_for_metrics(out))
    return _concat_in_order(chunks)


def _sample_seed(seed: int, index: int) -> int:
    # one independent stream per (seed, sample): the same image whatever the batch size and the number of processes
    return seed * (1 << 32) + index


def sample_features(
    pipeline,
    feature_network: torch.nn.Module,
    num_samples: int,
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    num_classes: int | None = None,
    with_logits: bool = False,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Generate `num_samples` images with a pipeline (equal numbers per class when conditional) and extract features.

    The pipeline must already be on `accelerator.device` and take `class_labels`, `batch_size`, `num_inference_steps`,
    `guidance_scale`, `generator` (a list with one generator per image, as diffusers pipelines accept) and
    `output_type="pt"` (images in [0, 1]). Its progress bar is switched off.

    Args:
        num_classes (`int`, *optional*): class count (0: unconditional); default `pipeline.num_classes`.

    Returns:
        as `extract_features`, with `labels` the requested classes when conditional.
    """
    accelerator = accelerator or Accelerator()
    if num_classes is None:
        if not hasattr(pipeline, "num_classes"):
            raise ValueError(
                f"{type(pipeline).__name__} has no `num_classes`; pass num_classes (0 for unconditional)."
            )
        num_classes = pipeline.num_classes
    if num_samples < 1:
        raise ValueError(f"--num_samples must be positive, got {num_samples}.")
    feature_network.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    labels = torch.arange(num_samples) % num_classes if num_classes else None  # balanced: counts differ by at most 1
    chunks = []
    loader = _shard(range(num_samples), batch_size, accelerator)
    for indices in tqdm(loader, desc="sampling", disable=not accelerator.is_local_main_process):
        indices = indices.cpu()
        generator = [torch.Generator().manual_seed(_sample_seed(seed, int(i))) for i in indices]
        images = pipeline(
            class_labels=labels[indices].tolist() if labels is not None else None,
            batch_size=len(indices),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
        ).images  # [B, C, H, W] in [0, 1]
        out = _run_networks(images.to(accelerator.device) * 2 - 1, feature_network, with_logits, classifier)
        out["index"] = indices.to(accelerator.device)
        if labels is not None:
            out["labels"] = labels[indices].to(accelerator.device)
        chunks.append(accelerator.gather_for_metrics(out))
    return _concat_in_order(chunks)


def reference_subset(dataset: Dataset, num_samples: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of `num_samples` items (all of them when `None`): sorted-by-class folders stay balanced."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    return Subset(
        dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
    )


def compute_reference_statistics(
    feature_network: torch.nn.Module,
    dataset: Dataset,
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    num_samples: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> FeatureStatistics:
    """Reference statistics of a dataset, carrying the raw features (`.features`, for KID and precision/recall) and the
    network identity (`.feature_network_id`). Compute once and pass to `evaluate_pipeline` at every evaluation."""
    subset = reference_subset(dataset, num_samples, seed)
    out = extract_features(feature_network, subset, accelerator, batch_size, desc="reference", num_workers=num_workers)
    stats = FeatureStatistics.from_features(out["features"])
    stats.features = out["features"]
    stats.feature_network_id = feature_network.identity
    return stats


def compute_metrics(
    reference: FeatureStatistics,
    fake: dict[str, torch.Tensor],
    metrics: tuple[str, ...] | list[str],
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    is_splits: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of generated-sample outputs (`sample_features` / `extract_features`) against reference statistics."""
    results = evaluate_features(
        reference,
        fake["features"],
        [m for m in metrics if m in FEATURE_METRICS],
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        pr_k=pr_k,
        seed=seed,
    )
    if "is" in metrics:
        probs = torch.softmax(fake["logits"].double(), dim=1)
        results["is_mean"], results["is_std"] = inception_score(probs, splits=min(is_splits, probs.shape[0]))
    if "accuracy" in metrics:
        if "labels" not in fake:
            raise ValueError(
                "--metrics accuracy needs class labels for the samples (an unconditional model or unlabeled files has none)."
            )
        results["accuracy"] = conditional_accuracy(fake["class_logits"], fake["labels"])
    return results


def _as_reference(
    reference: Dataset | FeatureStatistics,
    feature_network: torch.nn.Module,
    accelerator: Accelerator,
    batch_size: int,
    num_reference_samples: int | None,
    seed: int,
) -> FeatureStatistics:
    if isinstance(reference, FeatureStatistics):
        if reference.feature_network_id not in (None, feature_network.identity):
            raise ValueError(
                f"The reference statistics come from feature network '{reference.feature_network_id}', but the samples are "
                f"measured with '{feature_network.identity}'."
            )
        return reference
    return compute_reference_statistics(
        feature_network, reference, accelerator, batch_size, num_reference_samples, seed
    )


def evaluate_pipeline(
    pipeline,
    reference_dataset: Dataset | FeatureStatistics,
    num_samples: int,
    feature_network: torch.nn.Module,
    metrics: tuple[str, ...] | list[str] = FEATURE_METRICS,
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    num_classes: int | None = None,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_reference_samples: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
) -> dict[str, float]:
    """Sample a pipeline and measure the samples against a reference. Collective: call it on every process.

    Args:
        pipeline: a sampling pipeline on `accelerator.device` (see `sample_features`).
        reference_dataset: a dataset (items with `pixel_values` in [-1, 1]), or `FeatureStatistics` from
            `compute_reference_statistics` / `FeatureStatistics.load_npz` (compute them once for repeated evaluations).
        num_samples (`int`): number of generated images, equal per class when conditional.
        feature_network (`torch.nn.Module`): `DigitsFeatures`, `InceptionFeatures`, `TimmFeatures` or `ModuleFeatures`.
        metrics: any of "fid", "kid", "precision", "recall", "is" (needs a network with logits), "accuracy" (needs
            `classifier` and a conditional pipeline).
        accelerator (`Accelerator`, *optional*): the running accelerator (one is created when not given).
        classifier (`callable`, *optional*): images in [-1, 1] -> logits over the dataset's classes, e.g.
            `DigitsFeatures(...).logits`, on `accelerator.device`.
        num_reference_samples (`int`, *optional*): a seeded random subset of the reference dataset.

    Returns:
        `dict` of floats: `fid`, `kid_mean`, `kid_std`, `precision`, `recall`, `is_mean`, `is_std`, `accuracy` (those asked).
    """
    accelerator = accelerator or Accelerator()
    check_metrics(metrics, feature_network, classifier)
    reference = _as_reference(reference_dataset, feature_network, accelerator, batch_size, num_reference_samples, seed)
    fake = sample_features(
        pipeline,
        feature_network,
        num_samples,
        accelerator,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        num_classes=num_classes,
        with_logits="is" in metrics,
        classifier=classifier if "accuracy" in metrics else None,
    )
    return compute_metrics(reference, fake, metrics, kid_subsets, kid_subset_size, pr_k, seed=seed)


def evaluate_samples(
    samples: Dataset,
    reference_dataset: Dataset | FeatureStatistics,
    feature_network: torch.nn.Module,
    metrics: tuple[str, ...] | list[str] = FEATURE_METRICS,
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_reference_samples: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """As `evaluate_pipeline`, for images already generated (`load_images_npz`, `load_image_folder`, any dataset)."""
    accelerator = accelerator or Accelerator()
    check_metrics(metrics, feature_network, classifier)
    reference = _as_reference(reference_dataset, feature_network, accelerator, batch_size, num_reference_samples, seed)
    fake = extract_features(
        feature_network,
        samples,
        accelerator,
        batch_size,
        with_logits="is" in metrics,
        classifier=classifier if "accuracy" in metrics else None,
        desc="samples",
    )
    return compute_metrics(reference, fake, metrics, kid_subsets, kid_subset_size, pr_k, seed=seed)
