"""Sample a pipeline or read saved images, extract features sharded over processes, and compute `sadm.metrics`.

Shared by `scripts/evaluate.py` and the training scripts (in-training evaluation: `add_eval_args`, `check_eval_args` and
`setup_in_training_evaluation` give both scripts the same `--eval_*` flags and an `InTrainingEvaluator` with reference
statistics computed once, `eval_history.json` and the best pipeline in `best/`; see docs/EVALUATION.md). Work is sharded with accelerate's
`prepare_data_loader` (each process gets whole batches) and collected with `Accelerator.gather_for_metrics`, which drops the
samples repeated to even out the last batches, then put back in dataset order; every process returns the same numbers.
Generated sample i always uses its own generator seeded from (`seed`, i), so the images, and hence the metrics, do not
depend on the batch size or on the number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .metrics import (
    FEATURE_METRICS,
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    FeatureStatistics,
    InceptionFeatures,
    TimmFeatures,
    conditional_accuracy,
    evaluate_features,
    images_to_rgb,
    inception_score,
)

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
    """An `.npz` with `images` (uint8, `[N, H, W, C]` or `[N, H, W]`) and optional `labels` (`[N]` ints), as
    `scripts/sample.py` writes it, or in the ADM evaluator's layout: `arr_0` images (and optional `arr_1` labels)."""
    with np.load(path, allow_pickle=False) as data:
        image_key, label_key = ("images", "labels") if "images" in data else ("arr_0", "arr_1")
        if image_key not in data:
            raise ValueError(f"{path} has no 'images' (nor ADM's 'arr_0') array (it has {list(data.keys())}).")
        images, labels = data[image_key], data[label_key] if label_key in data else None
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
        generator = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
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


# ------------------------------------------------------------------------------------------ in-training evaluation
# what the training scripts' --eval_* flags accept; "is" is left out (it needs a network with class logits)
EVAL_METRICS = ("fid", "kid", "precision", "recall", "accuracy")
# metrics where a larger value is better (the rest, fid and kid, are distances)
HIGHER_IS_BETTER = ("accuracy", "precision", "recall")
EVAL_HISTORY_NAME = "eval_history.json"
BEST_DIR_NAME = "best"
BEST_METRICS_NAME = "metrics.json"


class RandomConvFeatures(torch.nn.Module):
    """A fixed, randomly initialised conv layer + pooling as a feature network: cheap, offline, any image size.

    A sanity baseline and a stand-in for tests only: its numbers compare runs measured with the same seed, nothing else.
    Call: `images [N, 1 or 3, H, W]` in [-1, 1] -> `[N, 64]`.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # initialisation never touches the caller's RNG
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.requires_grad_(False)
        self.identity = f"random_conv_seed{seed}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images_to_rgb(images).to(self.conv.weight.device, torch.float32)
        features = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(images)), 2)  # [N, 16, 2, 2]
        return features.reshape(features.shape[0], -1)  # [N, 64]


def is_digits_default(args: argparse.Namespace) -> bool:
    """True when a script trains on the embedded digits (no --dataset_name, no --train_data_dir)."""
    return args.dataset_name is None and args.train_data_dir is None


def add_eval_args(parser: argparse.ArgumentParser, diffusion_sampling: bool = True) -> None:
    """The `--eval_*` flags of the training scripts (in-training FID/KID/precision/recall/accuracy of the EMA weights).

    Args:
        diffusion_sampling (`bool`): add `--eval_num_inference_steps` and `--eval_guidance_scale` (diffusion pipelines).
    """
    g = parser.add_argument_group("in-training evaluation")
    g.add_argument(
        "--eval_steps",
        type=int,
        default=0,
        help="Every N steps, measure the EMA weights (--eval_metrics), log eval/<metric>, append to eval_history.json "
        "and keep the best pipeline in <output_dir>/best/ (0: never).",
    )
    g.add_argument(
        "--eval_num_samples", type=int, default=500, help="Generated images per evaluation (equal per class)."
    )
    g.add_argument(
        "--eval_metrics",
        type=str,
        default=None,
        help=f"Comma list from {','.join(EVAL_METRICS)}. Default: fid,accuracy on the embedded digits, else fid.",
    )
    g.add_argument(
        "--eval_feature_network",
        type=str,
        default=None,
        help="digits (the held-out digit classifier), inception (FID Inception-v3, needs --eval_inception_weights), "
        "timm:<name> (random init unless --eval_timm_weights) or random (a fixed random conv: tests and sanity "
        "checks only). Default: digits on the embedded digits, else inception.",
    )
    g.add_argument(
        "--eval_inception_weights",
        type=str,
        default=None,
        help="Local path of pt_inception-2015-12-05-6726825d.pth (never downloaded; see docs/EVALUATION.md).",
    )
    g.add_argument(
        "--eval_timm_weights",
        type=str,
        default=None,
        help="Local timm checkpoint for --eval_feature_network timm:<name>.",
    )
    g.add_argument(
        "--eval_reference_stats",
        type=str,
        default=None,
        help="Reference statistics .npz (scripts/evaluate.py --save_reference_stats) instead of the training data.",
    )
    g.add_argument(
        "--eval_num_reference_samples",
        type=int,
        default=50_000,
        help="A seeded random subset of the training data as the reference (the whole set when smaller).",
    )
    g.add_argument(
        "--eval_batch_size", type=int, default=64, help="Per-process batch of sampling and feature extraction."
    )
    if diffusion_sampling:
        g.add_argument("--eval_num_inference_steps", type=int, default=50, help="Sampling steps of each evaluation.")
        g.add_argument(
            "--eval_guidance_scale", type=float, default=1.0, help="Classifier-free guidance scale of each evaluation."
        )
    g.add_argument(
        "--eval_best_metric",
        type=str,
        default="fid",
        choices=EVAL_METRICS,
        help="Which metric picks best/: fid and kid lower is better; accuracy, precision, recall higher is better.",
    )
    g.add_argument("--eval_seed", type=int, default=0, help="Seed of the evaluation samples (the same at every step).")


def parse_metric_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def check_eval_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the data-dependent defaults of the `--eval_*` flags and stop with `parser.error` on bad values."""
    digits = is_digits_default(args)
    if args.eval_metrics is None:
        args.eval_metrics = "fid,accuracy" if digits and not args.unconditional else "fid"
    if args.eval_feature_network is None:
        args.eval_feature_network = "digits" if digits else "inception"
    if args.eval_steps < 0:
        parser.error(f"--eval_steps must be >= 0, got {args.eval_steps}.")
    if args.eval_steps == 0:
        return
    metrics = parse_metric_list(args.eval_metrics)
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown or not metrics:
        parser.error(
            f"--eval_metrics '{args.eval_metrics}' must be a non-empty comma list from {','.join(EVAL_METRICS)}."
        )
    if args.eval_best_metric not in metrics:
        parser.error(f"--eval_best_metric {args.eval_best_metric} is not among --eval_metrics {args.eval_metrics}.")
    if "accuracy" in metrics and (not digits or args.unconditional):
        parser.error(
            "--eval_metrics accuracy uses the digit classifier: it needs the embedded digits, class-conditional "
            f"(data: {args.dataset_name or args.train_data_dir}, --unconditional {args.unconditional})."
        )
    min_samples = 4 if {"precision", "recall"} & set(metrics) else 2  # k-NN balls need more than k = 3 samples
    if args.eval_num_samples < min_samples:
        parser.error(f"--eval_num_samples must be >= {min_samples} for {metrics}, got {args.eval_num_samples}.")
    if args.eval_batch_size < 1:
        parser.error(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}.")
    network = args.eval_feature_network
    if not (network in ("digits", "inception", "random") or (network.startswith("timm:") and len(network) > 5)):
        parser.error(f"--eval_feature_network must be digits, inception, random or timm:<name>, got '{network}'.")
    if network == "inception" and (
        args.eval_inception_weights is None or not os.path.isfile(args.eval_inception_weights)
    ):
        parser.error(
            f"--eval_feature_network inception needs the FID Inception-v3 weights file, which sadm never downloads: "
            f"--eval_inception_weights {args.eval_inception_weights or '(not given)'} is not a file. Copy {INCEPTION_WEIGHTS_NAME} "
            f"here ({INCEPTION_WEIGHTS_URL}; docs/EVALUATION.md), or pick --eval_feature_network timm:<name> with "
            "--eval_timm_weights, or --eval_steps 0."
        )
    for flag in ("eval_timm_weights", "eval_reference_stats"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{flag} {path} does not exist.")


def build_feature_network(
    name: str,
    resolution: int,
    accelerator: Accelerator,
    inception_weights: str | None = None,
    timm_weights: str | None = None,
    timm_image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """`digits`, `inception`, `timm:<name>` or `random` -> a feature network with an `.identity`, on `accelerator.device`."""
    if name == "digits":
        from .models.digit_classifier import DigitsFeatures

        with accelerator.main_process_first():  # the first run trains and caches the classifier once
            network = DigitsFeatures(resolution=resolution, cache_dir=cache_dir)
    elif name == "inception":
        network = InceptionFeatures(inception_weights)
    elif name == "random":
        network = RandomConvFeatures()
    elif name.startswith("timm:"):
        network = TimmFeatures(name[len("timm:") :], timm_weights, image_size=timm_image_size)
    else:
        raise ValueError(f"feature network must be digits, inception, random or timm:<name>, got '{name}'.")
    return network.to(accelerator.device)


def deterministic_view(dataset: Dataset) -> Dataset:
    """A shallow copy of a `sadm.data.ImageLabelDataset` with flips off and centre crops: the reference images do not
    depend on the augmentation seed."""
    view = copy.copy(dataset)
    if hasattr(view, "random_flip"):
        view.random_flip = False
    if hasattr(view, "center_crop"):
        view.center_crop = True
    return view


@contextlib.contextmanager
def preserve_rng_state(accelerator: Accelerator):
    """Restore the torch (CPU and this process's CUDA device), numpy and python RNG states on exit, so that an
    evaluation inside never changes what training draws next."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class InTrainingEvaluator:
    """Evaluate a pipeline every `--eval_steps` against reference statistics computed once; keep the history and the best.

    Holds the feature network, the digit classifier (accuracy), the reference statistics and the history
    (`<output_dir>/eval_history.json`: a list of `{"step", <metric>: value, ..., "wall_s"}`). `evaluate` is collective
    (call it on every process) and returns the same numbers everywhere; only the main process writes files. The script
    exports the pipeline into `best_dir` when `evaluate` says it is the best so far, with `write_best_metrics` in the
    same atomic write.

    Args:
        output_dir (`str`): the run's output folder.
        metrics (`list[str]`): from `EVAL_METRICS`.
        best_metric (`str`): one of `metrics`; `HIGHER_IS_BETTER` says the direction.
        feature_network, classifier, reference: see `evaluate_pipeline`.
        start_step (`int`): the step training starts (resumes) at; history entries after it are dropped, since the
            resumed run recomputes them.
        num_samples, batch_size, num_inference_steps, guidance_scale, seed: see `evaluate_pipeline`.
    """

    def __init__(
        self,
        output_dir: str,
        metrics: list[str],
        best_metric: str,
        feature_network: torch.nn.Module,
        reference: FeatureStatistics,
        accelerator: Accelerator,
        classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
        start_step: int = 0,
        num_samples: int = 500,
        batch_size: int = 64,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int = 0,
    ):
        if best_metric not in metrics:
            raise ValueError(f"--eval_best_metric {best_metric} is not among --eval_metrics {metrics}.")
        check_metrics(metrics, feature_network, classifier)
        needs_features = [m for m in metrics if m in ("kid", "precision", "recall")]
        if needs_features and reference.features is None:
            raise ValueError(
                f"--eval_metrics {needs_features} need reference features, but the reference statistics hold only mean and "
                "covariance; save them with scripts/evaluate.py --save_reference_stats, or evaluate fid only."
            )
        self.output_dir, self.metrics, self.best_metric = output_dir, list(metrics), best_metric
        self.feature_network, self.reference, self.accelerator, self.classifier = (
            feature_network,
            reference,
            accelerator,
            classifier,
        )
        self.num_samples, self.batch_size, self.num_inference_steps = num_samples, batch_size, num_inference_steps
        self.guidance_scale, self.seed = guidance_scale, seed
        self.history_path = os.path.join(output_dir, EVAL_HISTORY_NAME)
        self.best_dir = os.path.join(output_dir, BEST_DIR_NAME)
        self.history: list[dict] = []
        if start_step > 0 and os.path.isfile(self.history_path):  # resumed: continue the history up to start_step
            with open(self.history_path) as f:
                self.history = [entry for entry in json.load(f) if entry["step"] <= start_step]
        self.best_value = None
        for entry in self.history:
            if self.is_better(entry.get(self.result_key)):
                self.best_value = entry[self.result_key]

    @property
    def result_key(self) -> str:
        """The key of `best_metric` in the results (`kid` is reported as `kid_mean`)."""
        return "kid_mean" if self.best_metric == "kid" else self.best_metric

    def is_better(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.best_metric in HIGHER_IS_BETTER else value < self.best_value

    def evaluate(self, pipeline, step: int) -> tuple[dict[str, float], bool]:
        """Sample `pipeline`, compute the metrics, record them. Collective.

        Returns:
            `(results, is_best)`: the metrics (as `evaluate_pipeline` names them) and whether they beat every earlier
            evaluation on `best_metric` (the caller then exports the pipeline to `best_dir`).
        """
        start = time.perf_counter()
        results = evaluate_pipeline(
            pipeline,
            self.reference,
            self.num_samples,
            self.feature_network,
            self.metrics,
            self.accelerator,
            batch_size=self.batch_size,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            classifier=self.classifier,
        )
        is_best = self.is_better(results[self.result_key])
        if is_best:
            self.best_value = results[self.result_key]
        self.history = [entry for entry in self.history if entry["step"] != step]
        self.history.append({"step": step, **results, "wall_s": time.perf_counter() - start})
        if self.accelerator.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            tmp = self.history_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.history, f, indent=1)
            os.replace(tmp, self.history_path)  # a reader never sees half a file
        return results, is_best

    def write_best_metrics(self, folder: str, step: int, results: dict[str, float]) -> None:
        """`metrics.json` of a best/ export: the step, the metrics and how they were measured."""
        record = {
            "step": step,
            **results,
            "best_metric": self.best_metric,
            "feature_network": self.feature_network.identity,
            "num_samples": self.num_samples,
            "num_reference": self.reference.num_samples,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
        }
        with open(os.path.join(folder, BEST_METRICS_NAME), "w") as f:
            json.dump(record, f, indent=2)


def setup_in_training_evaluation(
    args: argparse.Namespace, dataset: Dataset, accelerator: Accelerator, start_step: int
) -> InTrainingEvaluator | None:
    """The evaluator of a training script from its `--eval_*` flags (None when `--eval_steps 0`). Collective.

    Builds the feature network (and the digit classifier for accuracy) and computes the reference statistics once, on
    the training data with flips off and centre crops (`deterministic_view`) or from `--eval_reference_stats`. Draws
    nothing from the global RNG (training continues exactly as without evaluation).
    """
    if not args.eval_steps:
        return None
    metrics = parse_metric_list(args.eval_metrics)
    with preserve_rng_state(accelerator):
        feature_network = build_feature_network(
            args.eval_feature_network,
            args.resolution,
            accelerator,
            inception_weights=args.eval_inception_weights,
            timm_weights=args.eval_timm_weights,
        )
        classifier = None
        if "accuracy" in metrics:
            digits = feature_network if args.eval_feature_network == "digits" else None
            digits = digits or build_feature_network("digits", args.resolution, accelerator)
            classifier = digits.logits
        if args.eval_reference_stats is not None:
            reference = FeatureStatistics.load_npz(args.eval_reference_stats, feature_network.identity)
        else:
            reference = compute_reference_statistics(
                feature_network,
                deterministic_view(dataset),
                accelerator,
                batch_size=args.eval_batch_size,
                num_samples=args.eval_num_reference_samples,
                seed=args.eval_seed,
            )
    return InTrainingEvaluator(
        args.output_dir,
        metrics,
        args.eval_best_metric,
        feature_network,
        reference,
        accelerator,
        classifier=classifier,
        start_step=start_step,
        num_samples=args.eval_num_samples,
        batch_size=args.eval_batch_size,
        num_inference_steps=getattr(args, "eval_num_inference_steps", 1),
        guidance_scale=getattr(args, "eval_guidance_scale", 1.0),
        seed=args.eval_seed,
    )
