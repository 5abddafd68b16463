"""In-training evaluation: `EvalConfig` (the `--eval_*` options of both training scripts) and `InTrainingEvaluator`,
which measures a pipeline every `EvalConfig.steps` against reference statistics computed once, keeps
`eval_history.json` and says when to export the best pipeline to `best/` (see docs/EVALUATION.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from ..data import ImageLabelDataset
from ..metrics import METRICS, FeatureStatistics, MetricOptions
from .extraction import Classifier, check_metrics, compute_reference_statistics, evaluate_pipeline
from .feature_networks import (
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    build_feature_network,
    check_feature_network_name,
)

# what --eval_metrics accepts
EVAL_METRICS = tuple(name for name, metric in METRICS.items() if metric.in_training)
EVAL_HISTORY_NAME = "eval_history.json"
BEST_DIR_NAME = "best"
BEST_METRICS_NAME = "metrics.json"


@dataclass
class EvalConfig:
    """What the training scripts measure while they train, and how (the `--eval_<field>` flags).

    Args:
        steps (`int`): every N steps, measure the EMA weights, log eval/<metric>, append to eval_history.json and keep
            the best pipeline in <output_dir>/best/ (0: never; nothing else is checked then).
        num_samples (`int`): generated images per evaluation (equal per class).
        metrics (`tuple[str, ...]`, *optional*): from `EVAL_METRICS`; default fid and accuracy on the conditional
            embedded digits, else fid.
        feature_network (`str`, *optional*): digits, inception, pixels, random or timm:<name> (see
            `build_feature_network`); default digits on the embedded digits, else inception.
        inception_weights (`str`, *optional*): local path of the FID Inception-v3 weights (never downloaded).
        timm_weights (`str`, *optional*): local timm checkpoint for timm:<name>.
        reference_stats (`str`, *optional*): reference statistics .npz instead of the training data.
        num_reference_samples (`int`): a seeded random subset of the training data as the reference.
        batch_size (`int`): per-process batch of sampling and feature extraction.
        num_inference_steps (`int`): sampling steps of each evaluation (diffusion pipelines).
        guidance_scale (`float`): classifier-free guidance scale of each evaluation (diffusion pipelines).
        best_metric (`str`): the metric that picks best/ (its direction is `METRICS[best_metric].higher_is_better`).
        seed (`int`): seed of the evaluation samples (the same at every step), of the reference subset and of KID.
        on_digits (`bool`): the training data are the embedded digits (sets the defaults; accuracy needs it).
        conditional (`bool`): the model is class-conditional (accuracy needs it).
    """

    steps: int = 0
    num_samples: int = 500
    metrics: tuple[str, ...] | None = None
    feature_network: str | None = None
    inception_weights: str | None = None
    timm_weights: str | None = None
    reference_stats: str | None = None
    num_reference_samples: int = 50_000
    batch_size: int = 64
    num_inference_steps: int = 50
    guidance_scale: float = 1.0
    best_metric: str = "fid"
    seed: int = 0
    on_digits: bool = False
    conditional: bool = True

    def __post_init__(self):
        if self.metrics is None:  # the data-dependent defaults
            self.metrics = ("fid", "accuracy") if self.on_digits and self.conditional else ("fid",)
        if self.feature_network is None:
            self.feature_network = "digits" if self.on_digits else "inception"
        self.metrics = tuple(self.metrics)
        if self.steps < 0:
            raise ValueError(f"--eval_steps must be >= 0, got {self.steps}.")
        if self.steps == 0:
            return
        metrics = self.metrics
        if not metrics or any(m not in EVAL_METRICS for m in metrics):
            raise ValueError(
                f"--eval_metrics '{','.join(metrics)}' must be a non-empty comma list from {','.join(EVAL_METRICS)}."
            )
        if self.best_metric not in metrics:
            raise ValueError(f"--eval_best_metric {self.best_metric} is not among --eval_metrics {','.join(metrics)}.")
        judged = [m for m in metrics if METRICS[m].needs == "classifier"]
        if judged and not (self.on_digits and self.conditional):
            raise ValueError(
                f"--eval_metrics {','.join(judged)} uses the digit classifier: it needs the embedded digits, class-conditional "
                f"(embedded digits: {self.on_digits}, conditional: {self.conditional})."
            )
        min_samples = 4 if {"precision", "recall"} & set(metrics) else 2  # k-NN balls need more than k = 3 samples
        if self.num_samples < min_samples:
            raise ValueError(
                f"--eval_num_samples must be >= {min_samples} for {list(metrics)}, got {self.num_samples}."
            )
        if self.batch_size < 1:
            raise ValueError(f"--eval_batch_size must be >= 1, got {self.batch_size}.")
        check_feature_network_name(self.feature_network, "--eval_feature_network")
        if self.feature_network == "inception" and (
            self.inception_weights is None or not os.path.isfile(self.inception_weights)
        ):
            raise ValueError(
                "--eval_feature_network inception needs the FID Inception-v3 weights file, which sadm never downloads: "
                f"--eval_inception_weights {self.inception_weights or '(not given)'} is not a file. Copy "
                f"{INCEPTION_WEIGHTS_NAME} here ({INCEPTION_WEIGHTS_URL}; docs/EVALUATION.md), or pick "
                "--eval_feature_network timm:<name> with --eval_timm_weights, or --eval_steps 0."
            )
        for flag in ("timm_weights", "reference_stats"):
            path = getattr(self, flag)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"--eval_{flag} {path} does not exist.")


def deterministic_view(dataset: Dataset) -> Dataset:
    """An `ImageLabelDataset` with flips off and centre crops: the reference images do not depend on the augmentation
    seed. Other datasets are returned as they are."""
    if not isinstance(dataset, ImageLabelDataset):
        return dataset
    return dataset.with_augmentation(replace(dataset.augmentation, random_flip=False, center_crop=True))


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
    """Evaluate a pipeline every `EvalConfig.steps` against reference statistics computed once; keep the history and the best.

    Holds the feature network, the digit classifier (accuracy), the reference statistics and the history
    (`<output_dir>/eval_history.json`: a list of `{"step", <metric>: value, ..., "wall_s"}`). `evaluate` is collective
    (call it on every process) and returns the same numbers everywhere; only the main process writes files. The script
    exports the pipeline into `best_dir` when `evaluate` says it is the best so far, with `write_best_metrics` in the
    same atomic write.

    Args:
        config (`EvalConfig`): what to measure and how (`metrics`, `best_metric`, `num_samples`, sampling settings).
        output_dir (`str`): the run's output folder.
        feature_network, classifier, reference: see `evaluate_pipeline`.
        start_step (`int`): the step training starts (resumes) at; history entries after it are dropped, since the
            resumed run recomputes them.
    """

    def __init__(
        self,
        config: EvalConfig,
        output_dir: str,
        feature_network: torch.nn.Module,
        reference: FeatureStatistics,
        accelerator: Accelerator,
        classifier: Classifier | None = None,
        start_step: int = 0,
    ):
        check_metrics(config.metrics, feature_network, classifier)
        needs_features = [m for m in config.metrics if METRICS[m].needs == "reference_features"]
        if needs_features and reference.features is None:
            raise ValueError(
                f"--eval_metrics {needs_features} need reference features, but the reference statistics hold only mean and "
                "covariance; save them with scripts/evaluate.py --save_reference_stats, or evaluate fid only."
            )
        self.config, self.output_dir = config, output_dir
        self.feature_network, self.reference, self.accelerator, self.classifier = (
            feature_network,
            reference,
            accelerator,
            classifier,
        )
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
        return METRICS[self.config.best_metric].keys[0]

    def is_better(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        higher_is_better = METRICS[self.config.best_metric].higher_is_better
        return value > self.best_value if higher_is_better else value < self.best_value

    def evaluate(self, pipeline, step: int) -> tuple[dict[str, float], bool]:
        """Sample `pipeline`, compute the metrics, record them. Collective.

        Returns:
            `(results, is_best)`: the metrics (as `evaluate_pipeline` names them) and whether they beat every earlier
            evaluation on `best_metric` (the caller then exports the pipeline to `best_dir`).
        """
        start = time.perf_counter()
        config = self.config
        results = evaluate_pipeline(
            pipeline,
            self.reference,
            config.num_samples,
            self.feature_network,
            config.metrics,
            self.accelerator,
            batch_size=config.batch_size,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            seed=config.seed,
            classifier=self.classifier,
            options=MetricOptions(seed=config.seed),
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
            "best_metric": self.config.best_metric,
            "feature_network": self.feature_network.identity,
            "num_samples": self.config.num_samples,
            "num_reference": self.reference.num_samples,
            "num_inference_steps": self.config.num_inference_steps,
            "guidance_scale": self.config.guidance_scale,
            "seed": self.config.seed,
        }
        with open(os.path.join(folder, BEST_METRICS_NAME), "w") as f:
            json.dump(record, f, indent=2)


def setup_in_training_evaluation(
    config: EvalConfig, dataset: Dataset, accelerator: Accelerator, output_dir: str, start_step: int
) -> InTrainingEvaluator | None:
    """The evaluator of a training run (None when `config.steps` is 0). Collective.

    Builds the feature network (and the digit classifier for accuracy) and computes the reference statistics once, on
    the training data with flips off and centre crops (`deterministic_view`) or from `config.reference_stats`. Draws
    nothing from the global RNG (training continues exactly as without evaluation).

    Args:
        dataset: the training set (`.resolution` is the resolution of the feature network's inputs).
    """
    if not config.steps:
        return None
    with preserve_rng_state(accelerator):
        feature_network = build_feature_network(
            config.feature_network,
            dataset.resolution,
            accelerator,
            inception_weights=config.inception_weights,
            timm_weights=config.timm_weights,
        )
        classifier = None
        if any(METRICS[m].needs == "classifier" for m in config.metrics):  # the digit classifier judges
            digits = feature_network if config.feature_network == "digits" else None
            digits = digits or build_feature_network("digits", dataset.resolution, accelerator)
            classifier = digits.logits
        if config.reference_stats is not None:
            reference = FeatureStatistics.load_npz(config.reference_stats, feature_network.identity)
        else:
            reference = compute_reference_statistics(
                feature_network,
                deterministic_view(dataset),
                accelerator,
                batch_size=config.batch_size,
                num_samples=config.num_reference_samples,
                seed=config.seed,
            )
    return InTrainingEvaluator(
        config, output_dir, feature_network, reference, accelerator, classifier=classifier, start_step=start_step
    )
