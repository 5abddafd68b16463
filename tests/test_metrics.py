"""Metrics against closed forms, streaming statistics, feature networks, the digit classifier and scripts/evaluate.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sadm.evaluation import InceptionFeatures, ModuleFeatures
from sadm.metrics import (
    FeatureStatistics,
    MetricOptions,
    conditional_accuracy,
    evaluate_features,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

REPO = Path(__file__).resolve().parents[1]


def _random_covariance(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_identical_is_zero():
    mu, sigma = np.random.default_rng(0).normal(size=16), _random_covariance(16, 1)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_commuting_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 4.0, size=8), rng.uniform(0.1, 4.0, size=8)
    # diagonal covariances commute: d² = ‖μ₁ − μ₂‖² + Σ (√aᵢ − √bᵢ)²
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_rank_deficient_ill_conditioned_is_finite_and_nonnegative():
    rng = np.random.default_rng(0)
    dim = 64
    # 10 samples in 64 dimensions (rank 9), plus eigenvalues spread over 12 orders of magnitude
    x, y = rng.normal(size=(10, dim)), rng.normal(size=(10, dim)) * np.logspace(-6, 6, dim)
    sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    value = frechet_distance(x.mean(0), sigma1, y.mean(0), sigma2)
    assert math.isfinite(value) and value >= 0
    assert frechet_distance(x.mean(0), sigma1, x.mean(0), sigma1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_matches_scipy_sqrtm_when_well_conditioned():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    sigma1, sigma2 = _random_covariance(12, 1), _random_covariance(12, 2)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    # torch inputs (any float dtype) give the same float64 result
    torch_args = [torch.from_numpy(v).float() for v in (mu1, sigma1, mu2, sigma2)]
    assert frechet_distance(*torch_args) == pytest.approx(expected, rel=1e-5)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ---------------------------------------------------------------- KID, precision/recall, IS, accuracy


def test_kid_matches_hand_computed_unbiased_mmd():
    generator = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(6, 3, generator=generator, dtype=torch.float64),
        torch.randn(6, 3, generator=generator, dtype=torch.float64),
    )

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m = 6
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    # with the subset size equal to the set size, every subset is a permutation: the estimate is exact and std is 0
    mean, std = kid(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(within - 2 * across, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_unbiased_on_identical_distributions():
    # averaged over independent draws of two sets from one distribution, the estimate is 0 (a biased V-statistic is not)
    estimates = []
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        real, fake = torch.randn(50, 8, generator=generator), torch.randn(50, 8, generator=generator)
        estimates.append(kid(real, fake, num_subsets=1, subset_size=50)[0])
    estimates = torch.tensor(estimates)
    assert abs(estimates.mean()) < 3 * estimates.std() / math.sqrt(len(estimates))
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator)
    mean, std = kid(real, fake + 1.0, num_subsets=10, subset_size=100)
    assert mean > 10 * estimates.std() and std > 0
    # the subset size is capped at the smaller set
    assert math.isfinite(kid(real[:30], fake, num_subsets=3, subset_size=1000)[0])


def _clusters(centres: torch.Tensor, per_cluster: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    points = centres[:, None, :] + 0.1 * torch.randn(
        centres.shape[0], per_cluster, centres.shape[1], generator=generator
    )
    return points.reshape(-1, centres.shape[1])  # [clusters * per_cluster, D]


def test_precision_recall_constructed_sets():
    centres = torch.eye(4) * 10  # four well separated clusters
    real = _clusters(centres, 50, seed=0)
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # fake covers two of the four real clusters: every fake is realistic, half the real data is covered
    assert precision_recall(real, real[:100], k=3) == (1.0, 0.5)  # exactly the real points of clusters 0 and 1
    # fresh samples of those two clusters: k-NN balls of finite samples miss a few tail points
    precision, recall = precision_recall(real, _clusters(centres[:2], 50, seed=1), k=3)
    assert precision > 0.85
    assert 0.4 <= recall <= 0.5


def test_inception_score_closed_forms():
    # confident and uniformly spread over K classes -> IS = K; all samples the same class -> IS = 1
    spread = torch.eye(10).repeat(5, 1)  # [50, 10]
    assert inception_score(spread, splits=5) == pytest.approx((10.0, 0.0))
    same = torch.zeros(50, 10)
    same[:, 3] = 1
    assert inception_score(same, splits=5) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="softmax"):
        inception_score(torch.randn(20, 10), splits=2)


def test_conditional_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert conditional_accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)


# ---------------------------------------------------------------- streaming statistics


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 500])
def test_streaming_statistics_equal_batch_statistics(chunk_size):
    generator = torch.Generator().manual_seed(0)
    features = 1000.0 + torch.randn(300, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 6, generator=generator, dtype=torch.float64
    )
    stats = FeatureStatistics()
    for chunk in features.split(chunk_size):
        stats.update(chunk)
    assert stats.num_samples == 300
    np.testing.assert_allclose(stats.mu, features.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)


def test_statistics_merge_equals_single_pass():
    features = torch.randn(101, 5, generator=torch.Generator().manual_seed(0))
    parts = [FeatureStatistics.from_features(part) for part in features.split([10, 0, 60, 31])]
    merged = FeatureStatistics(5)
    for part in parts:
        merged.merge(part)
    whole = FeatureStatistics.from_features(features)
    np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-10, atol=1e-12)


def test_statistics_npz_round_trip_and_identity_check(tmp_path):
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    stats = FeatureStatistics.from_features(features)
    path = tmp_path / "ref.npz"
    stats.save_npz(path, "net_a", features=features)
    loaded = FeatureStatistics.load_npz(path, "net_a")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_allclose(loaded.sigma, stats.sigma, rtol=1e-14)
    assert loaded.num_samples == 50 and loaded.feature_network_id == "net_a"
    torch.testing.assert_close(loaded.features, features)
    with pytest.raises(ValueError, match="'net_a'.*'net_b'"):
        FeatureStatistics.load_npz(path, "net_b")
    # statistics without features serve FID only
    stats.save_npz(tmp_path / "mu_sigma.npz", "net_a")
    mu_sigma = FeatureStatistics.load_npz(tmp_path / "mu_sigma.npz", "net_a")
    assert evaluate_features(mu_sigma, features, ["fid"])["fid"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="reference features"):
        evaluate_features(mu_sigma, features, ["fid", "kid"])


# ---------------------------------------------------------------- feature networks


def test_inception_features_missing_weights_fail_loudly(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=str(missing).replace(".", r"\.")):
        InceptionFeatures(missing)


def test_module_features_identity_tracks_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(2))
    features = ModuleFeatures(net)
    assert features(torch.zeros(3, 1, 8, 8)).shape == (3, 16)
    identity = features.identity
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert ModuleFeatures(net).identity != identity
    assert ModuleFeatures(net, identity="mine").identity == "mine"


def test_timm_features_random_init_tiny():
    from sadm.evaluation import TimmFeatures

    features = TimmFeatures("resnet10t", image_size=32)
    out = features(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert out.ndim == 2 and out.shape[0] == 2 and torch.isfinite(out).all()
    assert features.identity == "timm_resnet10t_random_seed0_32px"
    with pytest.raises(FileNotFoundError, match="timm_weights"):
        TimmFeatures("resnet10t", weights_path="/nonexistent/weights.safetensors")


# ---------------------------------------------------------------- digit classifier


def test_digit_classifier_shapes_and_save_load(tmp_path):
    from sadm.models.digit_classifier import DigitClassifier

    torch.manual_seed(0)
    model = DigitClassifier(resolution=16).eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 128)
    output = model(x, return_dict=True)
    torch.testing.assert_close(output.logits, model(x))
    model.save_pretrained(tmp_path / "clf")
    reloaded = DigitClassifier.from_pretrained(tmp_path / "clf").eval()
    torch.testing.assert_close(reloaded(x), model(x))
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(1, 1, 8, 8))


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    """A cache folder with the digit classifier at resolution 8 (trained once for this module, ~2 s)."""
    return tmp_path_factory.mktemp("sadm_cache")


@pytest.fixture(scope="module")
def digits_features(digits_cache):
    from sadm.evaluation import DigitsFeatures

    return DigitsFeatures(resolution=8, cache_dir=digits_cache)


def test_digit_classifier_trains_and_caches(digits_cache, digits_features):
    from sadm.evaluation import DigitsFeatures
    from sadm.evaluation.digits import load_or_train_digit_classifier

    assert digits_features.heldout_accuracy >= 0.97
    assert (digits_cache / "digit_classifier_r8_seed0" / "heldout_accuracy.json").exists()
    model, accuracy = load_or_train_digit_classifier(resolution=8, cache_dir=digits_cache)  # from the cache
    assert accuracy == digits_features.heldout_accuracy
    assert DigitsFeatures(resolution=8, cache_dir=digits_cache).identity == digits_features.identity
    assert digits_features.identity.startswith("digit_classifier_r8_")
    # RGB and other sizes are converted; features are the penultimate layer
    assert digits_features(torch.zeros(2, 3, 16, 16)).shape == (2, 128)


def _digits_uint8(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    from sadm.data import digits_to_uint8

    digits = load_digits()
    return digits_to_uint8(digits.images[offset : offset + n])[..., None], digits.target[offset : offset + n]


def test_evaluate_samples_on_real_digits(digits_features):
    from sadm.evaluation import ImageTensorDataset, evaluate_samples, uint8_to_tensor

    images, labels = _digits_uint8(400)
    reference = ImageTensorDataset(uint8_to_tensor(images[:200]))
    samples = ImageTensorDataset(uint8_to_tensor(images[200:]), torch.from_numpy(labels[200:]).long())
    results = evaluate_samples(
        samples,
        reference,
        digits_features,
        ["fid", "kid", "precision", "recall", "is", "accuracy"],
        batch_size=64,
        classifier=digits_features.logits,
        options=MetricOptions(kid_subsets=10),
    )
    assert set(results) == {"fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std", "accuracy"}
    assert results["accuracy"] > 0.9 and results["precision"] > 0.5 and results["recall"] > 0.5
    assert results["is_mean"] > 5  # ten confidently recognised classes


def test_evaluate_pipeline_tiny_dit_is_deterministic_and_batch_invariant(digits_features):
    from diffusers import DDPMScheduler
    from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline

    from sadm.evaluation import ImageTensorDataset, compute_reference_statistics, evaluate_pipeline, uint8_to_tensor
    from sadm.models.dit import build_dit

    torch.manual_seed(0)
    pipeline = SADMDiTPipeline(
        transformer=build_dit("tiny", sample_size=8, in_channels=1, num_classes=10).eval(),
        scheduler=DDPMScheduler(num_train_timesteps=100),
        id2label={i: str(i) for i in range(10)},
    )
    images, _ = _digits_uint8(100)
    reference = compute_reference_statistics(
        digits_features, ImageTensorDataset(uint8_to_tensor(images)), batch_size=50
    )
    assert reference.feature_network_id == digits_features.identity and reference.features.shape == (100, 128)
    kwargs = dict(num_inference_steps=2, classifier=digits_features.logits, options=MetricOptions(kid_subsets=5))
    metrics = ["fid", "kid", "precision", "recall", "is", "accuracy"]
    first = evaluate_pipeline(pipeline, reference, 20, digits_features, metrics, batch_size=8, **kwargs)
    again = evaluate_pipeline(pipeline, reference, 20, digits_features, metrics, batch_size=8, **kwargs)
    assert first == again
    # every sample has its own seeded generator: other batch sizes give the same images, hence the same numbers
    other_batches = evaluate_pipeline(pipeline, reference, 20, digits_features, metrics, batch_size=6, **kwargs)
    assert other_batches == pytest.approx(first, rel=1e-5)
    assert all(math.isfinite(v) for v in first.values()) and first["fid"] > 0


def test_evaluate_script_npz_end_to_end(tmp_path, digits_cache, digits_features):
    images, labels = _digits_uint8(300)
    np.savez(tmp_path / "reference.npz", images=images[:150])
    np.savez(tmp_path / "samples.npz", images=images[150:], labels=labels[150:])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = [
        "--samples",
        str(tmp_path / "samples.npz"),
        "--resolution",
        "8",
        "--classifier_cache_dir",
        str(digits_cache),
    ]
    common += ["--kid_subsets", "5", "--batch_size", "64"]
    first = [
        sys.executable,
        str(REPO / "scripts" / "evaluate.py"),
        *common,
        "--reference_npz",
        str(tmp_path / "reference.npz"),
    ]
    first += [
        "--metrics",
        "fid,kid,precision,recall,accuracy,is",
        "--save_reference_stats",
        str(tmp_path / "ref_stats.npz"),
    ]
    first += ["--output_json", str(tmp_path / "first.json")]
    result = subprocess.run(first, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "first.json").read_text())
    assert report["num_samples"] == 150 and report["num_reference"] == 150
    assert report["feature_network"] == digits_features.identity
    assert report["accuracy"] > 0.9 and report["fid"] >= 0
    assert "fid" in result.stdout  # the printed table
    # the saved statistics (with features) reproduce the numbers; in-process, to keep the test short
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    second = [*common, "--reference_stats", str(tmp_path / "ref_stats.npz"), "--metrics", "fid,kid,precision,recall"]
    again = evaluate_script.main(evaluate_script.parse_args(second))
    for key in ("fid", "kid_mean", "precision", "recall"):
        assert again[key] == pytest.approx(report[key], rel=1e-5, abs=1e-7)


def test_image_folder_and_npz_loaders(tmp_path):
    from PIL import Image

    from sadm.evaluation import load_image_folder, load_images_npz

    images, labels = _digits_uint8(5)
    for index, image in enumerate(images):
        Image.fromarray(image[..., 0], mode="L").save(tmp_path / f"{index:03d}.png")
    from_folder = load_image_folder(tmp_path)
    assert from_folder.images.shape == (5, 1, 8, 8) and from_folder.labels is None
    np.savez(tmp_path / "s.npz", images=images[..., 0], labels=labels)
    from_npz = load_images_npz(tmp_path / "s.npz", num_samples=4)
    torch.testing.assert_close(from_npz.images, from_folder.images[:4])
    assert from_npz.labels.tolist() == labels[:4].tolist()
    assert from_npz.images.min() >= -1 and from_npz.images.max() <= 1
    np.savez(tmp_path / "bad.npz", images=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images_npz(tmp_path / "bad.npz")


def test_inception_features_from_a_local_file_and_a_clear_error_without_it(tmp_path, monkeypatch):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from sadm.evaluation import InceptionFeatures

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        InceptionFeatures(tmp_path / "missing.pth")
    # a random-init network written in the layout of the real weights file (which cannot be downloaded here)
    with monkeypatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    features = InceptionFeatures(tmp_path / "inception.pth")
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out, logits = features.features_and_logits(images)
    assert out.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(out).all()
    torch.testing.assert_close(features(images), out)
    assert features.identity.startswith("inception_v3_fid_")
    features.train()
    assert not features.model.training  # batch norm stays in inference mode
    # the loaded weights are the file's, not a fresh init
    loaded = features.model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in net.state_dict().items())
    # antialias: resized to 299 before the extractor, whose TF-1 resize is then the identity
    smooth = InceptionFeatures(tmp_path / "inception.pth", antialias=True)
    assert smooth.identity.endswith("_antialias")
    assert smooth._to_uint8(images).shape == (2, 3, 299, 299)
    big = torch.randint(0, 256, (1, 3, 299, 299)).float()
    resized = fidelity.interpolate_bilinear_2d_like_tensorflow1x(big, size=(299, 299), align_corners=False)
    torch.testing.assert_close(resized, big)
    assert not torch.allclose(smooth(images), out, rtol=1e-3, atol=0)  # random-init features are ~1e-8


# ---------------------------------------------------------------- the registry


def test_registry_names_directions_and_keys():
    from sadm.metrics import METRICS, compute_metrics

    assert {name for name, metric in METRICS.items() if metric.higher_is_better} == {
        "precision",
        "recall",
        "is",
        "accuracy",
    }
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 6, generator=generator), torch.randn(30, 6, generator=generator) + 0.5
    reference = FeatureStatistics.from_features(real)
    reference.features = real
    samples = {
        "features": fake,
        "logits": torch.randn(30, 4, generator=generator),
        "class_logits": torch.randn(30, 4, generator=generator),
        "labels": torch.randint(0, 4, (30,), generator=generator),
    }
    options = MetricOptions(kid_subsets=3, kid_subset_size=20, is_splits=3)
    for name, metric in METRICS.items():  # each metric reports exactly its keys
        assert set(compute_metrics(reference, samples, [name], options)) == set(metric.keys), name
    results = compute_metrics(reference, samples, list(METRICS), options)
    assert (results["precision"], results["recall"]) == precision_recall(real, fake, k=3)
    assert (results["kid_mean"], results["kid_std"]) == kid(real, fake, 3, 20)
    with pytest.raises(ValueError, match="must be a non-empty list"):
        compute_metrics(reference, samples, ["fid", "vgg_score"])
    with pytest.raises(ValueError, match="--pr_k must be >= 1"):
        MetricOptions(pr_k=0)
