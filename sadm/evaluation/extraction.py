"""Images -> features, sharded over processes: a dataset's images or a pipeline's samples, then `sadm.metrics`.

Both sources go through one path (`_extract`): batches split over processes with accelerate's `prepare_data_loader`
(each process gets whole batches), the feature network (and the classifier) on each batch, outputs collected with
`Accelerator.gather_for_metrics`, which drops the samples repeated to even out the last batches, and put back in
dataset order; every process returns the same numbers. Generated sample i always uses its own generator seeded from
(`seed`, i), so the images, and hence the metrics, do not depend on the batch size or on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..metrics import METRICS, FeatureStatistics, MetricOptions, check_metric_names, compute_metrics

Classifier = Callable[[torch.Tensor], torch.Tensor]  # images [B, C, H, W] in [-1, 1] -> class logits [B, K]


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


def _shard(dataset, batch_size: int, accelerator: Accelerator, collate_fn=None, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose batches are split over processes (not registered with the accelerator: no checkpoint state)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
    )


# one batch of the loader -> (images [B, C, H, W] in [-1, 1], indices [B], labels [B] or None)
BatchImages = Callable[[object], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def _extract(
    loader: DataLoader,
    batch_images: BatchImages,
    feature_network: torch.nn.Module,
    accelerator: Accelerator,
    with_logits: bool,
    classifier: Classifier | None,
    desc: str,
) -> dict[str, torch.Tensor]:
    """Run the networks on the images of every batch, gather over processes and return the outputs in index order."""
    feature_network.to(accelerator.device)
    chunks = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        images, indices, labels = batch_images(batch)
        if with_logits:
            features, logits = feature_network.features_and_logits(images)
            out = {"features": features.float(), "logits": logits.float()}
        else:
            out = {"features": feature_network(images).float()}
        if classifier is not None:
            with torch.no_grad():
                out["class_logits"] = classifier(images).float()
        out["index"] = indices
        if labels is not None:
            out["labels"] = labels
        chunks.append(accelerator.gather_for_metrics(out))
    out = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    order = out.pop("index").argsort()  # processes interleave batches
    return {key: value[order] for key, value in out.items()}


def extract_features(
    feature_network: torch.nn.Module,
    dataset: Dataset,
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    with_logits: bool = False,
    classifier: Classifier | None = None,
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
    loader = _shard(_WithIndex(dataset), batch_size, accelerator, _collate, num_workers)

    def batch_images(batch: dict[str, torch.Tensor]):
        return batch["pixel_values"], batch["index"], batch.get("class_labels")

    return _extract(loader, batch_images, feature_network, accelerator, with_logits, classifier, desc)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator (also `scripts/sample.py`'s)."""
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
    classifier: Classifier | None = None,
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
    pipeline.set_progress_bar_config(disable=True)
    labels = torch.arange(num_samples) % num_classes if num_classes else None  # balanced: counts differ by at most 1

    def batch_images(indices: torch.Tensor):
        indices = indices.cpu()
        images = pipeline(
            class_labels=labels[indices].tolist() if labels is not None else None,
            batch_size=len(indices),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices],
            output_type="pt",
        ).images  # [B, C, H, W] in [0, 1]
        device = accelerator.device
        return (
            images.to(device) * 2 - 1,
            indices.to(device),
            labels[indices].to(device) if labels is not None else None,
        )

    loader = _shard(range(num_samples), batch_size, accelerator)
    return _extract(loader, batch_images, feature_network, accelerator, with_logits, classifier, "sampling")


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


def check_metrics(metrics, feature_network: torch.nn.Module, classifier: Classifier | None) -> None:
    """Fail before any work when a requested metric cannot be computed with these networks."""
    check_metric_names(metrics)
    for name in metrics:
        needs = METRICS[name].needs
        if needs == "logits" and not hasattr(feature_network, "features_and_logits"):
            raise ValueError(
                f"--metrics {name} needs class logits, which feature network '{feature_network.identity}' does not give."
            )
        if needs == "classifier" and classifier is None:
            raise ValueError(f"--metrics {name} needs a classifier (the digit classifier for the digits data).")


def _needs(metrics, need: str) -> bool:
    return any(METRICS[name].needs == need for name in metrics)


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
    metrics: tuple[str, ...] | list[str] = ("fid", "kid", "precision", "recall"),
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    num_classes: int | None = None,
    classifier: Classifier | None = None,
    num_reference_samples: int | None = None,
    options: MetricOptions | None = None,
) -> dict[str, float]:
    """Sample a pipeline and measure the samples against a reference. Collective: call it on every process.

    Args:
        pipeline: a sampling pipeline on `accelerator.device` (see `sample_features`).
        reference_dataset: a dataset (items with `pixel_values` in [-1, 1]), or `FeatureStatistics` from
            `compute_reference_statistics` / `FeatureStatistics.load_npz` (compute them once for repeated evaluations).
        num_samples (`int`): number of generated images, equal per class when conditional.
        feature_network (`torch.nn.Module`): `DigitsFeatures`, `InceptionFeatures`, `TimmFeatures` or `ModuleFeatures`.
        metrics: names from `sadm.metrics.METRICS`: "fid", "kid", "precision", "recall", "is" (needs a network with
            logits), "accuracy" (needs `classifier` and a conditional pipeline).
        accelerator (`Accelerator`, *optional*): the running accelerator (one is created when not given).
        seed (`int`): seed of the samples and of the reference subset.
        classifier (`callable`, *optional*): images in [-1, 1] -> logits over the dataset's classes, e.g.
            `DigitsFeatures(...).logits`, on `accelerator.device`.
        num_reference_samples (`int`, *optional*): a seeded random subset of the reference dataset.
        options (`MetricOptions`, *optional*): KID subsets, precision/recall k, IS splits; default with KID seed `seed`.

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
        with_logits=_needs(metrics, "logits"),
        classifier=classifier if _needs(metrics, "classifier") else None,
    )
    return compute_metrics(reference, fake, metrics, options or MetricOptions(seed=seed))


def evaluate_samples(
    samples: Dataset,
    reference_dataset: Dataset | FeatureStatistics,
    feature_network: torch.nn.Module,
    metrics: tuple[str, ...] | list[str] = ("fid", "kid", "precision", "recall"),
    accelerator: Accelerator | None = None,
    batch_size: int = 64,
    classifier: Classifier | None = None,
    num_reference_samples: int | None = None,
    seed: int = 0,
    options: MetricOptions | None = None,
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
        with_logits=_needs(metrics, "logits"),
        classifier=classifier if _needs(metrics, "classifier") else None,
        desc="samples",
    )
    return compute_metrics(reference, fake, metrics, options or MetricOptions(seed=seed))
