"""Sample-quality maths on feature vectors, and the registry of metrics.

- `frechet_distance` (FID's formula) in float64 with an eigenvalue-based matrix square root;
- `FeatureStatistics`: mean/covariance accumulated in float64 (Chan et al.'s parallel update), mergeable, saved as
  `.npz` together with the identity of the feature network that produced it;
- `kid`, `improved_precision` / `precision_recall`, `inception_score`, `conditional_accuracy`;
- `METRICS`: every metric by name, with its direction (higher or lower is better), the result keys it reports and
  what it needs; `compute_metrics` runs any of them on the outputs of `sadm.evaluation`. A new metric is one entry.

The feature networks, sampling and feature extraction are `sadm.evaluation`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# npz format version of `FeatureStatistics.save_npz`
STATS_FORMAT_VERSION = 1


def _to_float64_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via `eigh`; tiny negative eigenvalues (round-off) -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


# Heusel et al. 2017 (FID), Eq. 6: d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)
def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    tr((Σ₁Σ₂)^½) is computed as Σᵢ √λᵢ with λ the eigenvalues of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (similar to Σ₁Σ₂, so
    it has the same eigenvalues), with tiny negative eigenvalues from round-off clipped to 0. Unlike `scipy.linalg.sqrtm` of
    the non-symmetric product Σ₁Σ₂, this never produces complex parts or NaNs on rank-deficient, ill-conditioned
    covariances (few samples in high dimensions), and it is exact when Σ₁ and Σ₂ commute.

    Args:
        mu1, mu2 (`np.ndarray` or `torch.Tensor` of shape `[D]`): means.
        sigma1, sigma2 (`np.ndarray` or `torch.Tensor` of shape `[D, D]`): covariances.

    Returns:
        `float`: the squared Fréchet distance (what is reported as FID), >= 0.
    """
    mu1, mu2 = _to_float64_numpy(mu1), _to_float64_numpy(mu2)
    sigma1, sigma2 = _to_float64_numpy(sigma1), _to_float64_numpy(sigma2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same size, got shapes {mu1.shape} and {mu2.shape}.")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"sigma1 and sigma2 must be {dim}x{dim}, got shapes {sigma1.shape} and {sigma2.shape}.")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf.")
    sqrt_sigma1 = _psd_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # [D, D], symmetric PSD, same spectrum as Σ₁Σ₂
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # the exact value is >= 0; round-off can leave about -1e-12 for identical inputs
    return float(max(distance, 0.0))


class FeatureStatistics:
    r"""Mean and covariance of feature vectors, in float64, equal to the statistics of the whole set at once.

    Keeps the count n, the mean μ and the centred scatter M₂ = Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ, and combines batches with Chan et al.'s
    parallel update, which stays accurate when the mean is large compared to the spread (unlike Σ xxᵀ − n μμᵀ). The
    covariance is unbiased (`sigma` = M₂ / (n − 1)), as `np.cov` and every FID implementation use.

    Args:
        num_features (`int`, *optional*): the feature dimension D; taken from the first `update` when not given.

    Attributes:
        features (`torch.Tensor`, *optional*): the raw features `[N, D]`, set by `load_npz` when the file stored them and
            by `sadm.evaluation.compute_reference_statistics` (KID and precision/recall need them; FID only needs μ and Σ).
        feature_network_id (`str`, *optional*): the identity of the feature network that made the features.
    """

    def __init__(self, num_features: int | None = None):
        self.num_features = num_features
        self.count = 0
        self.mean: torch.Tensor | None = None  # [D] float64
        self.scatter: torch.Tensor | None = None  # [D, D] float64
        self.features: torch.Tensor | None = None
        self.feature_network_id: str | None = None
        if num_features is not None:
            self._allocate(num_features, torch.device("cpu"))

    def _allocate(self, num_features: int, device: torch.device) -> None:
        self.num_features = num_features
        self.mean = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)

    def _combine(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        # Chan, Golub & LeVeque 1979: δ = μ_b − μ_a, μ = μ_a + δ n_b / n, M₂ = M₂a + M₂b + δδᵀ n_a n_b / n
        if count == 0:
            return
        total = self.count + count
        mean, scatter = mean.to(self.mean.device), scatter.to(self.mean.device)
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStatistics:
        """Add a batch of feature vectors `[N, D]` (any float dtype, any device; accumulated in float64)."""
        features = torch.as_tensor(features).detach()
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}.")
        if self.mean is None:
            self._allocate(features.shape[1], features.device)
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"features have dimension {features.shape[1]}, but these statistics have {self.num_features}."
            )
        if features.shape[0] == 0:
            return self
        features = features.to(device=self.mean.device, dtype=torch.float64)
        batch_mean = features.mean(dim=0)
        centred = features - batch_mean  # [N, D]
        self._combine(features.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add the samples summarised by `other` (e.g. another process's statistics) to these ones, in place."""
        if other.mean is None:
            return self
        if self.mean is None:
            self._allocate(other.num_features, other.mean.device)
        if other.num_features != self.num_features:
            raise ValueError(
                f"Cannot merge statistics of dimension {other.num_features} into dimension {self.num_features}."
            )
        self._combine(other.count, other.mean, other.scatter)
        return self

    @property
    def num_samples(self) -> int:
        return self.count

    @property
    def mu(self) -> np.ndarray:
        """Mean `[D]`, float64."""
        if self.count == 0:
            raise ValueError("FeatureStatistics has no samples yet.")
        return self.mean.cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance `[D, D]`, float64."""
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 samples; these statistics have {self.count}.")
        return (self.scatter / (self.count - 1)).cpu().numpy()

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> FeatureStatistics:
        return cls().update(features)

    def save_npz(self, path: str | os.PathLike, feature_network_id: str, features: torch.Tensor | None = None) -> None:
        """Write `mu`, `sigma`, `num_samples` and the feature network identity (and optionally the raw features).

        Args:
            path (`str`): the `.npz` file to write.
            feature_network_id (`str`): `.identity` of the feature network that produced the features; `load_npz` checks it.
            features (`torch.Tensor`, *optional*): the `[N, D]` features themselves, so that KID and precision/recall can
                use the file as a reference too.
        """
        arrays = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num_samples": np.asarray(self.count, dtype=np.int64),
            "feature_network": np.asarray(feature_network_id),
            "format_version": np.asarray(STATS_FORMAT_VERSION, dtype=np.int64),
        }
        if features is not None:
            if tuple(features.shape) != (self.count, self.num_features):
                raise ValueError(
                    f"features must be [{self.count}, {self.num_features}] to match these statistics, got {tuple(features.shape)}."
                )
            arrays["features"] = torch.as_tensor(features).detach().cpu().float().numpy()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez(f, **arrays)

    @classmethod
    def load_npz(cls, path: str | os.PathLike, feature_network_id: str | None = None) -> FeatureStatistics:
        """Read statistics written by `save_npz`.

        Args:
            path (`str`): the `.npz` file.
            feature_network_id (`str`, *optional*): the identity of the feature network the caller will compare against;
                a file made by a different network raises a `ValueError` (its numbers would be meaningless).

        Returns:
            `FeatureStatistics` with `.feature_network_id` set (and `.features` when the file stored them).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Reference statistics file {path} does not exist.")
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma", "num_samples", "feature_network") if key not in data]
            if missing:
                raise ValueError(
                    f"{path} is not a sadm statistics file: it lacks {missing} (it has {list(data.keys())})."
                )
            stored_id = str(data["feature_network"])
            if feature_network_id is not None and stored_id != feature_network_id:
                raise ValueError(
                    f"{path} holds statistics of feature network '{stored_id}', but the features to compare come from "
                    f"'{feature_network_id}'. Recompute the reference statistics with the same feature network."
                )
            count = int(data["num_samples"])
            mu, sigma = data["mu"], data["sigma"]
            features = torch.from_numpy(data["features"]) if "features" in data else None
        stats = cls(mu.shape[0])
        stats.count = count
        stats.mean = torch.from_numpy(mu.astype(np.float64))
        stats.scatter = torch.from_numpy(sigma.astype(np.float64)) * (count - 1)
        stats.features = features
        stats.feature_network_id = stored_id
        return stats


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int) -> torch.Tensor:
    # k(x, y) = (xᵀy / d + 1)^degree, the kernel of Bińkowski et al. 2018
    return (x @ y.T / x.shape[1] + 1.0) ** degree


# Bińkowski et al. 2018 (Demystifying MMD GANs), Eq. 2 and Sec. 4: unbiased MMD² with a cubic polynomial kernel
def kid(
    features_real: torch.Tensor | np.ndarray,
    features_fake: torch.Tensor | np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD² estimate, averaged over random subsets.

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} [k(xᵢ, xⱼ) + k(yᵢ, yⱼ)] − 2/m² Σ_{i,j} k(xᵢ, yⱼ), on `num_subsets` subsets of `m` samples drawn
    without replacement from each set (m = `subset_size`, capped at the smaller set). Computed in float64.

    Returns:
        `(mean, std)` over the subsets (std with ddof=0, as torch-fidelity and the reference code report it).
    """
    real = torch.as_tensor(features_real).detach().double()
    fake = torch.as_tensor(features_fake).to(real.device).detach().double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"kid needs [N, D] features of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}.")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(
            f"kid needs at least 2 samples in each set, got {real.shape[0]} real and {fake.shape[0]} fake."
        )
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(num_subsets):
        x = real[torch.randperm(real.shape[0], generator=generator)[:m].to(real.device)]  # [m, D]
        y = fake[torch.randperm(fake.shape[0], generator=generator)[:m].to(real.device)]  # [m, D]
        k_xx, k_yy, k_xy = (
            _polynomial_kernel(x, x, degree),
            _polynomial_kernel(y, y, degree),
            _polynomial_kernel(x, y, degree),
        )
        off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        estimates.append(off_diagonal - 2.0 * k_xy.mean())
    estimates = torch.stack(estimates)
    return float(estimates.mean()), float(estimates.std(unbiased=False))


def _row_batch(num_columns: int) -> int:
    # rows per cdist call so that one [rows, columns] float32 block stays around 128 MB
    return max(1, (1 << 25) // max(num_columns, 1))


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded), `[N]`."""
    radii = []
    for start in range(0, features.shape[0], _row_batch(features.shape[0])):
        distances = torch.cdist(features[start : start + _row_batch(features.shape[0])], features)  # [b, N]
        # the smallest distance is the sample to itself (0), so the k-th neighbour is the (k+1)-th smallest
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `queries` inside at least one ball (centre, radius) of the k-NN manifold of `centres`."""
    inside = []
    for start in range(0, queries.shape[0], _row_batch(centres.shape[0])):
        distances = torch.cdist(queries[start : start + _row_batch(centres.shape[0])], centres)  # [b, M]
        inside.append((distances <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def _check_knn_sets(real: torch.Tensor, fake: torch.Tensor, k: int) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall needs [N, D] features of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}."
        )
    if k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(
            f"k={k} must be >= 1 and smaller than both set sizes ({real.shape[0]} real, {fake.shape[0]} fake)."
        )


# Kynkäänniemi et al. 2019 (Improved Precision and Recall), Sec. 2: k-NN balls around each sample approximate a manifold
def improved_precision(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3) -> float:
    """Fraction of `fake` samples inside the manifold of `real`, ∪ᵢ B(rᵢ, ‖rᵢ − NN_k(rᵢ)‖).

    Recall is the same quantity with the roles swapped: `improved_precision(fake, real, k)`. Distances in float32 with
    `torch.cdist`, batched over rows (run it on a GPU for tens of thousands of samples).
    """
    real = torch.as_tensor(real).detach().float()
    fake = torch.as_tensor(fake).detach().float().to(real.device)
    _check_knn_sets(real, fake, k)
    return _fraction_inside(fake, real, _knn_radii(real, k))


def precision_recall(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[float, float]:
    """Improved precision (fake samples inside the real manifold) and recall (real samples inside the fake manifold)."""
    return improved_precision(real, fake, k), improved_precision(fake, real, k)


# Salimans et al. 2016 (Improved Techniques for Training GANs), Sec. 4: IS = exp(E_x KL(p(y|x) ‖ p(y)))
def inception_score(probs: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score from class probabilities `[N, K]` (rows sum to 1), over `splits` consecutive chunks.

    Returns:
        `(mean, std)` of exp(mean KL(p(y|x) ‖ p(y))) over the chunks (std with ddof=0, as the reference code).
    """
    probs = torch.as_tensor(probs).detach().double()
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {tuple(probs.shape)}.")
    if not 1 <= splits <= probs.shape[0]:
        raise ValueError(f"splits must be between 1 and the number of samples ({probs.shape[0]}), got {splits}.")
    if (probs < 0).any() or not torch.allclose(probs.sum(dim=1), torch.ones_like(probs[:, 0]), atol=1e-4):
        raise ValueError(
            "probs must be probabilities (non-negative rows summing to 1); apply softmax to logits first."
        )
    scores = []
    for chunk in torch.tensor_split(probs, splits):
        marginal = chunk.mean(dim=0, keepdim=True)  # p(y), [1, K]
        kl = torch.xlogy(chunk, chunk) - torch.xlogy(chunk, marginal.expand_as(chunk))  # 0·log 0 = 0, [n, K]
        scores.append(torch.exp(kl.sum(dim=1).mean()))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def conditional_accuracy(logits_or_probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the class they were generated for."""
    logits_or_probs, labels = (
        torch.as_tensor(logits_or_probs),
        torch.as_tensor(labels).to(torch.as_tensor(logits_or_probs).device),
    )
    if logits_or_probs.ndim != 2 or labels.shape != logits_or_probs.shape[:1]:
        raise ValueError(
            f"conditional_accuracy needs logits [N, K] and labels [N], got {tuple(logits_or_probs.shape)} and {tuple(labels.shape)}."
        )
    return float((logits_or_probs.argmax(dim=1) == labels).float().mean())


@dataclass(frozen=True)
class MetricOptions:
    """How the metrics that have parameters are estimated.

    Args:
        kid_subsets (`int`): KID: number of random subsets.
        kid_subset_size (`int`): KID: samples per subset (capped at the smaller set).
        pr_k (`int`): precision/recall: k of the k-NN balls.
        is_splits (`int`): Inception Score: number of chunks (capped at the number of samples).
        seed (`int`): seed of the KID subsets.
    """

    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    is_splits: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("kid_subsets", "kid_subset_size", "pr_k", "is_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")


# what a metric reads: the samples' outputs of `sadm.evaluation` (`features` [M, D], `logits` [M, K] of the feature
# network, `class_logits` [M, K] of a classifier, `labels` [M]) and the reference statistics
MetricFunction = Callable[["FeatureStatistics", dict[str, torch.Tensor], MetricOptions], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """One sample-quality metric.

    Args:
        name (`str`): the name of `--metrics` / `--eval_metrics`.
        higher_is_better (`bool`): the direction in which a run is better (picks `best/`).
        keys (`tuple[str, ...]`): the result keys it reports; the first one ranks runs.
        needs (`str`): what it needs beyond the samples' features: "" (nothing), "reference_features" (the raw
            reference features, not only μ and Σ), "logits" (a feature network with class logits), or "classifier"
            (a classifier's logits and the classes the samples were generated for).
        compute (`callable`): `(reference, samples, options) -> {key: value}`.
        in_training (`bool`): offered by the training scripts' `--eval_metrics`.
    """

    name: str
    higher_is_better: bool
    keys: tuple[str, ...]
    needs: str
    compute: MetricFunction
    in_training: bool = True


def _fid(reference: FeatureStatistics, samples: dict[str, torch.Tensor], options: MetricOptions) -> dict[str, float]:
    fake = FeatureStatistics.from_features(samples["features"])
    return {"fid": frechet_distance(reference.mu, reference.sigma, fake.mu, fake.sigma)}


def _kid(reference: FeatureStatistics, samples: dict[str, torch.Tensor], options: MetricOptions) -> dict[str, float]:
    mean, std = kid(
        reference.features, samples["features"], options.kid_subsets, options.kid_subset_size, seed=options.seed
    )
    return {"kid_mean": mean, "kid_std": std}


def _precision(
    reference: FeatureStatistics, samples: dict[str, torch.Tensor], options: MetricOptions
) -> dict[str, float]:
    return {"precision": improved_precision(reference.features, samples["features"], k=options.pr_k)}


def _recall(
    reference: FeatureStatistics, samples: dict[str, torch.Tensor], options: MetricOptions
) -> dict[str, float]:
    return {"recall": improved_precision(samples["features"], reference.features, k=options.pr_k)}


def _inception_score(
    reference: FeatureStatistics, samples: dict[str, torch.Tensor], options: MetricOptions
) -> dict[str, float]:
    probs = torch.softmax(samples["logits"].double(), dim=1)
    mean, std = inception_score(probs, splits=min(options.is_splits, probs.shape[0]))
    return {"is_mean": mean, "is_std": std}


def _accuracy(
    reference: FeatureStatistics, samples: dict[str, torch.Tensor], options: MetricOptions
) -> dict[str, float]:
    if "labels" not in samples:
        raise ValueError(
            "--metrics accuracy needs class labels for the samples (an unconditional model or unlabeled files has none)."
        )
    return {"accuracy": conditional_accuracy(samples["class_logits"], samples["labels"])}


# every metric, by name: the one place a metric is added
METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("fid", higher_is_better=False, keys=("fid",), needs="", compute=_fid),
        Metric("kid", higher_is_better=False, keys=("kid_mean", "kid_std"), needs="reference_features", compute=_kid),
        Metric(
            "precision", higher_is_better=True, keys=("precision",), needs="reference_features", compute=_precision
        ),
        Metric("recall", higher_is_better=True, keys=("recall",), needs="reference_features", compute=_recall),
        # in-training evaluation leaves IS out: the digit and random feature networks have no logits over many classes
        Metric("is", True, ("is_mean", "is_std"), needs="logits", compute=_inception_score, in_training=False),
        Metric("accuracy", higher_is_better=True, keys=("accuracy",), needs="classifier", compute=_accuracy),
    )
}
# the metrics computed from features alone (`evaluate_features`)
FEATURE_METRICS = tuple(name for name, metric in METRICS.items() if metric.needs in ("", "reference_features"))


def check_metric_names(names: tuple[str, ...] | list[str], choices: tuple[str, ...] | None = None) -> None:
    """Raise naming the unknown ones when `names` are not all among `choices` (default: every metric)."""
    choices = tuple(METRICS) if choices is None else choices
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f"--metrics {list(names)} must be a non-empty list from {','.join(choices)}.")


def compute_metrics(
    reference: FeatureStatistics,
    samples: dict[str, torch.Tensor],
    metrics: tuple[str, ...] | list[str],
    options: MetricOptions | None = None,
) -> dict[str, float]:
    """The metrics of generated samples against reference statistics.

    Args:
        reference (`FeatureStatistics`): of the reference set; `.features` is needed by KID and precision/recall.
        samples (`dict`): the samples' `features` `[M, D]`, and `logits` (IS), `class_logits` and `labels` (accuracy).
        metrics: names from `METRICS`.
        options (`MetricOptions`, *optional*): estimator settings.

    Returns:
        `dict` of floats under each metric's `keys` (`fid`, `kid_mean`, `kid_std`, `precision`, ...).
    """
    check_metric_names(metrics)
    options = options or MetricOptions()
    needs_features = [name for name in metrics if METRICS[name].needs == "reference_features"]
    if needs_features and reference.features is None:
        raise ValueError(
            f"metrics {needs_features} need the reference features, but the reference statistics hold only mean and "
            "covariance; save them with features (scripts/evaluate.py --save_reference_stats does) or use 'fid' only."
        )
    results: dict[str, float] = {}
    for name in metrics:
        results.update(METRICS[name].compute(reference, samples, options))
    return results


def evaluate_features(
    real_features: torch.Tensor | np.ndarray | FeatureStatistics,
    fake_features: torch.Tensor | np.ndarray,
    metrics: tuple[str, ...] | list[str] = FEATURE_METRICS,
    options: MetricOptions | None = None,
) -> dict[str, float]:
    """The feature-based metrics of fake features `[M, D]` against reference features `[N, D]` (or `FeatureStatistics`)."""
    check_metric_names(metrics, FEATURE_METRICS)
    if not isinstance(real_features, FeatureStatistics):
        features = torch.as_tensor(real_features)
        real_features = FeatureStatistics.from_features(features)
        real_features.features = features
    return compute_metrics(real_features, {"features": torch.as_tensor(fake_features)}, metrics, options)
