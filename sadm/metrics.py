"""Sample-quality metrics on feature vectors, streaming feature statistics, and the feature networks that make them.

- `frechet_distance` (FID's formula) in float64 with an eigenvalue-based matrix square root;
- `FeatureStatistics`: streaming mean/covariance (Chan et al.'s parallel update), mergeable across processes, saved as
  `.npz` together with the identity of the feature network that produced it;
- `kid`, `precision_recall`, `inception_score`, `conditional_accuracy`, `evaluate_features`;
- feature networks (`torch.nn.Module`s mapping images in [-1, 1] to `[N, D]`, each with an `.identity` string):
  `InceptionFeatures` (the FID Inception-v3, weights from a local file only), `TimmFeatures` (any timm backbone) and
  `ModuleFeatures` (any module). The digit-classifier network lives in `sadm.models.digit_classifier.DigitsFeatures`.

Sampling a pipeline and sharding feature extraction over processes is `sadm.evaluation`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# the metric names accepted by `evaluate_features` (the ones computed from features alone)
FEATURE_METRICS = ("fid", "kid", "precision", "recall")
# npz format version of `FeatureStatistics.save_npz`
STATS_FORMAT_VERSION = 1
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_NAME
)


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
    r"""Streaming mean and covariance of feature vectors, in float64, equal to the statistics of the whole set at once.

    Keeps the count n, the mean μ and the centred scatter M₂ = Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ, and combines batches with Chan et al.'s
    parallel update, which stays accurate when the mean is large compared to the spread (unlike Σ xxᵀ − n μμᵀ). The
    covariance is unbiased (`sigma` = M₂ / (n − 1)), as `np.cov` and every FID implementation use.

    Args:
        num_features (`int`, *optional*): the feature dimension D; taken from the first `update` when not given. Needed
            by `gather` on a process that received no samples.

    Attributes:
        features (`torch.Tensor`, *optional*): the raw features, set only by `load_npz` when the file stored them (KID and
            precision/recall need them; FID only needs μ and Σ).
        feature_network_id (`str`, *optional*): the feature network identity, set by `load_npz`.
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

    def gather(self, accelerator) -> FeatureStatistics:
        """The statistics of all processes merged (every process gets the same result). Collective: call on all processes.

        Args:
            accelerator (`accelerate.Accelerator`): the running accelerator.
        """
        if self.mean is None:
            raise ValueError("FeatureStatistics.gather needs num_features on a process that received no samples.")
        device = accelerator.device
        counts = accelerator.gather(torch.tensor([self.count], device=device))  # [P]
        means = accelerator.gather(self.mean.to(device)[None])  # [P, D]
        scatters = accelerator.gather(self.scatter.to(device)[None])  # [P, D, D]
        merged = FeatureStatistics(self.num_features)
        for count, mean, scatter in zip(counts.tolist(), means, scatters):
            merged._combine(int(count), mean.cpu(), scatter.cpu())
        return merged

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


# Kynkäänniemi et al. 2019 (Improved Precision and Recall), Sec. 2: k-NN balls around each sample approximate a manifold
def precision_recall(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall.

    precision = fraction of fake samples inside the real manifold ∪ᵢ B(rᵢ, ‖rᵢ − NN_k(rᵢ)‖);
    recall = fraction of real samples inside the fake manifold, built the same way from the fake samples.
    Distances in float32 with `torch.cdist`, batched over rows (run it on a GPU for tens of thousands of samples).
    """
    real = torch.as_tensor(real).detach().float()
    fake = torch.as_tensor(fake).detach().float().to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall needs [N, D] features of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}."
        )
    if k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(
            f"k={k} must be >= 1 and smaller than both set sizes ({real.shape[0]} real, {fake.shape[0]} fake)."
        )
    precision = _fraction_inside(fake, real, _knn_radii(real, k))
    recall = _fraction_inside(real, fake, _knn_radii(fake, k))
    return precision, recall


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


def evaluate_features(
    real_feats: torch.Tensor | np.ndarray | FeatureStatistics,
    fake_feats: torch.Tensor | np.ndarray,
    metrics: tuple[str, ...] | list[str] = FEATURE_METRICS,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """The feature-based metrics of fake samples against a reference.

    Args:
        real_feats: reference features `[N, D]`, or `FeatureStatistics` (FID only, unless it carries `.features`).
        fake_feats: features of the generated samples `[M, D]`.
        metrics: any of "fid", "kid", "precision", "recall".

    Returns:
        `dict` with the keys `fid`, `kid_mean`, `kid_std`, `precision`, `recall` for the metrics asked for.
    """
    unknown = [m for m in metrics if m not in FEATURE_METRICS]
    if unknown:
        raise ValueError(f"metrics {unknown} are not feature metrics; choose from {FEATURE_METRICS}.")
    fake_feats = torch.as_tensor(fake_feats)
    if isinstance(real_feats, FeatureStatistics):
        real_stats, real_feats = real_feats, real_feats.features
        needs_features = [m for m in metrics if m != "fid"]
        if real_feats is None and needs_features:
            raise ValueError(
                f"metrics {needs_features} need the reference features, but the reference statistics hold only mean and "
                "covariance; save them with features (scripts/evaluate.py --save_reference_stats does) or use 'fid' only."
            )
    else:
        real_feats = torch.as_tensor(real_feats)
        real_stats = FeatureStatistics.from_features(real_feats) if "fid" in metrics else None
    results: dict[str, float] = {}
    if "fid" in metrics:
        fake_stats = FeatureStatistics.from_features(fake_feats)
        results["fid"] = frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma)
    if "kid" in metrics:
        results["kid_mean"], results["kid_std"] = kid(real_feats, fake_feats, kid_subsets, kid_subset_size, seed=seed)
    if "precision" in metrics or "recall" in metrics:
        precision, recall = precision_recall(real_feats, fake_feats, k=pr_k)
        if "precision" in metrics:
            results["precision"] = precision
        if "recall" in metrics:
            results["recall"] = recall
    return results


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    """First 8 hex digits of a sha256 over the module's state dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 8 hex digits of a file's sha256 (the convention of torch hub file names such as `...-6726825d.pth`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def images_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """`[N, 1 or 3, H, W]` -> `[N, 3, H, W]` by repeating a single channel."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures(torch.nn.Module):
    """The FID Inception-v3 (TensorFlow graph of 2015-12-05) through torchmetrics' `NoTrainInceptionV3`, weights from a file.

    The weights are never downloaded: pass the local path of `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's file;
    torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` is the same file). torchmetrics builds the network from
    torch-fidelity, which must be installed (`pip install torch-fidelity`).

    Args:
        weights_path (`str`): local path of the weights file.
        antialias (`bool`): resize to 299x299 with antialiased bilinear interpolation (torchmetrics' default) instead of the
            TensorFlow-1 bilinear resize of the original FID code. Default False, so numbers are comparable with papers.

    Call: `images [N, C, H, W]` float in [-1, 1] -> pool3 features `[N, 2048]` (quantised to uint8 first, as FID does).
    """

    def __init__(self, weights_path: str | os.PathLike, antialias: bool = False):
        super().__init__()
        weights_path = Path(weights_path) if weights_path is not None else None
        if weights_path is None or not weights_path.is_file():
            raise FileNotFoundError(
                f"--inception_weights {weights_path} does not exist. FID needs the FID Inception-v3 weights "
                f"{INCEPTION_WEIGHTS_NAME}; sadm never downloads them. Fetch the file on a machine with internet access "
                f"({INCEPTION_WEIGHTS_URL}), copy it here and pass its path."
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as error:
            raise ImportError(f"InceptionFeatures needs torchmetrics: {error}") from error
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError(
                "InceptionFeatures needs torch-fidelity (torchmetrics builds the FID Inception-v3 from it): "
                "pip install torch-fidelity"
            )
        self.model = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights_path),
            antialias=antialias,
        )
        self.identity = f"inception_v3_fid_{file_fingerprint(weights_path)}" + ("_antialias" if antialias else "")

    def _to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        images = images_to_rgb(images)
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, H, W] in 0..255

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool features `[N, 2048]` and the 1008 unbiased logits `[N, 1008]` used by the Inception Score."""
        device = next(self.model.parameters()).device
        # torchmetrics' forward returns only the first feature; its tuple-returning forward gives both in one pass
        features, logits = self.model._torch_fidelity_forward(self._to_uint8(images).to(device))
        return features.reshape(images.shape[0], -1).float(), logits.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class TimmFeatures(torch.nn.Module):
    """Pooled features of a `timm` backbone (e.g. `vit_small_patch14_dinov2`); pretrained weights only from a local file.

    Args:
        model_name (`str`): a `timm.create_model` name.
        weights_path (`str`, *optional*): a local checkpoint in timm's format (`.safetensors` or `.pth`); the classifier head
            is dropped, every other weight must match. Without it the network is randomly initialised from `seed` (useful for
            tests and as a sanity baseline only; its identity says so).
        image_size (`int`, *optional*): resize inputs to this size (models with a fixed input size, such as ViTs, are
            built for it with `img_size=`); default the model's own input size.
        seed (`int`): initialisation seed when `weights_path` is not given.

    Call: `images [N, C, H, W]` float in [-1, 1] -> `[N, D]` (resized, 1 -> 3 channels, normalised with the model's mean/std).
    """

    def __init__(
        self,
        model_name: str,
        weights_path: str | os.PathLike | None = None,
        image_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        import timm

        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"--timm_weights {weights_path} does not exist (weights are never downloaded).")
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if pretrained_cfg is None:
            raise ValueError(f"--feature_network timm:{model_name}: timm knows no model of that name.")
        # models with a fixed input size (ViTs: position embeddings) are built for the size; CNNs take any size
        kwargs = {"img_size": image_size} if image_size is not None and pretrained_cfg.fixed_input_size else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if weights_path is not None:
            state_dict = timm.models.load_state_dict(str(weights_path))
            head = self.model.pretrained_cfg.get("classifier")
            heads = (head,) if isinstance(head, str) else tuple(head or ())
            state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(h + ".") for h in heads)}
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"--timm_weights {weights_path} does not fit timm model '{model_name}': missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}."
                )
            self.identity = f"timm_{model_name}_{file_fingerprint(weights_path)}"
        else:
            self.identity = f"timm_{model_name}_random_seed{seed}"
        self.model.eval().requires_grad_(False)
        data_config = timm.data.resolve_model_data_config(self.model)
        self.image_size = image_size or data_config["input_size"][-1]
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)
        if image_size is not None:
            self.identity += f"_{image_size}px"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images_to_rgb(images).to(self.mean.device, torch.float32)
        images = (images + 1) / 2  # [-1, 1] -> [0, 1]
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        features = self.model((images.clamp(0, 1) - self.mean) / self.std)
        return features.reshape(features.shape[0], -1)  # [N, D]


class ModuleFeatures(torch.nn.Module):
    """Any `nn.Module` as a feature network: `images [N, C, H, W]` in [-1, 1] -> `module(images)` flattened to `[N, D]`.

    Args:
        module (`torch.nn.Module`): receives the images unchanged (it does its own resizing or channel handling).
        identity (`str`, *optional*): recorded in statistics files; default the class name plus a fingerprint of the
            module's weights, so statistics of differently-trained modules never compare silently.
    """

    def __init__(self, module: torch.nn.Module, identity: str | None = None):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.identity = identity or f"{type(module).__name__}_{state_dict_fingerprint(module)}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.module(images)
        return features.reshape(features.shape[0], -1)  # [N, D]
