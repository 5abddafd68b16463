"""Measuring generative models: sample a pipeline or read saved images, extract features, compute `sadm.metrics`.

- `extraction`: images -> features sharded over processes (a dataset's images or a pipeline's samples, one path),
  reference statistics, `evaluate_pipeline` / `evaluate_samples`;
- `samples`: saved samples (`.npz`, folders of PNGs) as datasets;
- `feature_networks`: Inception-v3, timm, any module, a random conv, the digit classifier, `build_feature_network`;
- `digits`: training and caching the digit classifier;
- `in_training`: `EvalConfig` and `InTrainingEvaluator`, shared by both training scripts.
"""

from .extraction import (
    check_metrics,
    compute_reference_statistics,
    evaluate_pipeline,
    evaluate_samples,
    extract_features,
    reference_subset,
    sample_features,
    sample_seed,
)
from .feature_networks import (
    FEATURE_NETWORK_NAMES,
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    DigitsFeatures,
    InceptionFeatures,
    ModuleFeatures,
    RandomConvFeatures,
    TimmFeatures,
    build_feature_network,
    check_feature_network_name,
)
from .in_training import (
    BEST_DIR_NAME,
    BEST_METRICS_NAME,
    EVAL_HISTORY_NAME,
    EVAL_METRICS,
    EvalConfig,
    InTrainingEvaluator,
    deterministic_view,
    preserve_rng_state,
    setup_in_training_evaluation,
)
from .samples import ImageTensorDataset, load_image_folder, load_images_npz, uint8_to_tensor

__all__ = [
    "BEST_DIR_NAME",
    "BEST_METRICS_NAME",
    "EVAL_HISTORY_NAME",
    "EVAL_METRICS",
    "FEATURE_NETWORK_NAMES",
    "INCEPTION_WEIGHTS_NAME",
    "INCEPTION_WEIGHTS_URL",
    "DigitsFeatures",
    "EvalConfig",
    "ImageTensorDataset",
    "InTrainingEvaluator",
    "InceptionFeatures",
    "ModuleFeatures",
    "RandomConvFeatures",
    "TimmFeatures",
    "build_feature_network",
    "check_feature_network_name",
    "check_metrics",
    "compute_reference_statistics",
    "deterministic_view",
    "evaluate_pipeline",
    "evaluate_samples",
    "extract_features",
    "load_image_folder",
    "load_images_npz",
    "preserve_rng_state",
    "reference_subset",
    "sample_features",
    "sample_seed",
    "setup_in_training_evaluation",
    "uint8_to_tensor",
]
