"""Tests of the SADM structure discriminator, structure losses and adversarial loss functions (toy sizes, CPU)."""

from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F

from sadm.losses.structure import relation_entropy, relation_matrix, structure_loss, structure_timestep_weights
from sadm.models.structure_discriminator import StructureDiscriminator, StructureDiscriminatorOutput
from sadm.structure import (
    StructureConfig,
    structure_denoiser_loss,
    structure_discriminator_loss,
    structure_inputs,
    structure_weight_at,
)

COMBINATIONS = [
    ("softmax", "kl"),
    ("softmax", "l1"),
    ("softmax", "l2"),
    ("softmax", "huber"),
    ("distance", "l1"),
    ("distance", "l2"),
    ("distance", "huber"),
]


def _embeddings(n: int = 6, d: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


def _alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)  # DDPM linear schedule
    return torch.cumprod(1.0 - betas, dim=0)


def _tiny_discriminator(**kwargs) -> StructureDiscriminator:
    torch.manual_seed(0)
    config = {"in_channels": 1, "sample_size": 8, "embed_dim": 8, "base_channels": 8, "num_layers": 2}
    config.update(kwargs)
    return StructureDiscriminator(**config)


# --- plain-python references --------------------------------------------------------------------------------------


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _py_log_softmax_rows(z, tau):
    rows = []
    for i in range(len(z)):
        logits = [_dot(z[i], z[j]) / tau for j in range(len(z)) if j != i]
        top = max(logits)
        log_norm = top + math.log(sum(math.exp(v - top) for v in logits))
        rows.append([v - log_norm for v in logits])
    return rows


def _py_softmax_kl(z_real, z_fake, tau):
    log_r, log_f = _py_log_softmax_rows(z_real, tau), _py_log_softmax_rows(z_fake, tau)
    return [sum(math.exp(a) * (a - b) for a, b in zip(row_r, row_f)) for row_r, row_f in zip(log_r, log_f)]


def _py_distance_rows(z):
    rows = [[math.dist(z[i], z[j]) for j in range(len(z)) if j != i] for i in range(len(z))]
    mean = sum(sum(row) for row in rows) / (len(z) * (len(z) - 1))
    return [[v / mean for v in row] for row in rows]


def _py_distance_l1(z_real, z_fake):
    d_r, d_f = _py_distance_rows(z_real), _py_distance_rows(z_fake)
    return [sum(abs(a - b) for a, b in zip(row_r, row_f)) / len(row_r) for row_r, row_f in zip(d_r, d_f)]


# --- losses -------------------------------------------------------------------------------------------------------


def test_relation_matrix_shapes_and_rows():
    z = _embeddings(5)
    a = relation_matrix(z, "softmax", 0.1)
    assert a.shape == (5, 4)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(5))
    # row 0 excludes j = 0: entries are softmax over <z_0, z_1..4>
    torch.testing.assert_close(a[0], (z[0] @ z[1:].T / 0.1).softmax(0))
    # row 2 is j = 0, 1, 3, 4
    torch.testing.assert_close(a[2], (z[2] @ z[[0, 1, 3, 4]].T / 0.1).softmax(0))
    d = relation_matrix(z, "distance")
    assert d.shape == (5, 4)
    torch.testing.assert_close(d.mean(), torch.tensor(1.0))


@pytest.mark.parametrize("relation,distance", COMBINATIONS)
def test_identical_batches_give_zero_loss(relation, distance):
    z = _embeddings()
    loss = structure_loss(z, z.clone(), relation, distance)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, torch.zeros(6), atol=1e-7, rtol=0)
    # and a different batch gives a positive loss
    assert structure_loss(z, _embeddings(seed=1), relation, distance).min() > 0


@pytest.mark.parametrize("relation,distance", COMBINATIONS)
def test_shared_permutation_permutes_rows(relation, distance):
    z_real, z_fake = _embeddings(seed=0), _embeddings(seed=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    loss = structure_loss(z_real, z_fake, relation, distance)
    permuted = structure_loss(z_real[perm], z_fake[perm], relation, distance)
    torch.testing.assert_close(permuted, loss[perm])
    torch.testing.assert_close(permuted.mean(), loss.mean())


def test_distance_relation_ignores_global_scale():
    z_real, z_fake = _embeddings(seed=0), _embeddings(seed=1)
    torch.testing.assert_close(relation_matrix(3.0 * z_real, "distance"), relation_matrix(z_real, "distance"))
    for distance in ("l1", "l2", "huber"):
        torch.testing.assert_close(
            structure_loss(2.0 * z_real, 0.25 * z_fake, "distance", distance),
            structure_loss(z_real, z_fake, "distance", distance),
        )


def test_hand_computed_three_samples():
    z_real = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    z_fake = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    zr, zf = torch.tensor(z_real), torch.tensor(z_fake)

    torch.testing.assert_close(
        structure_loss(zr, zf, "softmax", "kl", 0.5), torch.tensor(_py_softmax_kl(z_real, z_fake, 0.5))
    )
    # spelled out for row 0 (j = 1, 2): real logits (0, 0.6)/0.5, fake logits (0.8, 0)/0.5
    r = [1 / (1 + math.exp(1.2)), math.exp(1.2) / (1 + math.exp(1.2))]
    f = [math.exp(1.6) / (1 + math.exp(1.6)), 1 / (1 + math.exp(1.6))]
    kl_row0 = r[0] * math.log(r[0] / f[0]) + r[1] * math.log(r[1] / f[1])
    assert structure_loss(zr, zf, "softmax", "kl", 0.5)[0].item() == pytest.approx(kl_row0, rel=1e-5)

    torch.testing.assert_close(structure_loss(zr, zf, "distance", "l1"), torch.tensor(_py_distance_l1(z_real, z_fake)))
    # row 0 of distance+l1: real distances (√2, √0.8), fake (√0.4, √2); both batches have the pair distances
    # {√2, √0.8, √0.4}, so one mean normalises both
    mean = (math.sqrt(2) + math.sqrt(0.8) + math.sqrt(0.4)) / 3
    l1_row0 = (abs(math.sqrt(2) - math.sqrt(0.4)) + abs(math.sqrt(0.8) - math.sqrt(2))) / (2 * mean)
    assert structure_loss(zr, zf, "distance", "l1")[0].item() == pytest.approx(l1_row0, rel=1e-5)


def test_small_temperature_is_finite_and_correct():
    z_real, z_fake = _embeddings(4, 3, seed=2), _embeddings(4, 3, seed=3)
    z_fake.requires_grad_(True)
    loss = structure_loss(z_real, z_fake, "softmax", "kl", temperature=1e-3)
    assert torch.isfinite(loss).all()
    expected = _py_softmax_kl(z_real.tolist(), z_fake.detach().tolist(), 1e-3)
    torch.testing.assert_close(loss.detach(), torch.tensor(expected), rtol=1e-3, atol=1e-3)
    loss.sum().backward()
    assert torch.isfinite(z_fake.grad).all()
    assert torch.isfinite(relation_entropy(z_real, 1e-3))


def test_coinciding_embeddings_have_finite_distance_gradients():
    z = _embeddings(4, 3).clone()
    z[1] = z[0]
    z.requires_grad_(True)
    structure_loss(_embeddings(4, 3, seed=5), z, "distance", "l2").sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("relation,distance", COMBINATIONS)
def test_bf16_inputs(relation, distance):
    z_real, z_fake = _embeddings(seed=0).bfloat16(), _embeddings(seed=1).bfloat16()
    loss = structure_loss(z_real, z_fake, relation, distance, temperature=0.05)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, structure_loss(z_real.float(), z_fake.float(), relation, distance, 0.05))


def test_kl_with_distance_relation_raises():
    z = _embeddings()
    with pytest.raises(ValueError, match="relation='softmax'"):
        structure_loss(z, z, "distance", "kl")
    with pytest.raises(ValueError, match="relation='softmax'"):
        StructureConfig(relation="distance", distance="kl")


def test_needs_pairs():
    z = _embeddings(1)
    with pytest.raises(ValueError, match="pairs"):
        structure_loss(z, z)
    disc = _tiny_discriminator().requires_grad_(False)
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="pairs"):
        structure_denoiser_loss(
            disc, structure_inputs(x, x, torch.tensor([0]), _alphas_cumprod(), StructureConfig()), StructureConfig()
        )


def test_entropy_values():
    z = _embeddings(5)
    a = relation_matrix(z, "softmax", 0.1)
    torch.testing.assert_close(relation_entropy(z, 0.1), -(a * a.log()).sum(dim=1).mean())
    # a collapsed batch has uniform rows: entropy log(N - 1)
    torch.testing.assert_close(relation_entropy(z[:1].expand(5, -1), 0.1), torch.tensor(math.log(4)))


def test_timestep_weights_values():
    alphas_cumprod = _alphas_cumprod()
    t = torch.tensor([0, 99, 100, 500, 999])
    torch.testing.assert_close(structure_timestep_weights(t, alphas_cumprod, "none"), torch.ones(5))
    torch.testing.assert_close(
        structure_timestep_weights(t, alphas_cumprod, "threshold", t_threshold=100),
        torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]),
    )
    snr_weights = structure_timestep_weights(t, alphas_cumprod, "snr", snr_clip=5.0)
    expected = []
    for step in t.tolist():
        a = alphas_cumprod[step].item()
        expected.append(min(a / (1 - a), 5.0) / 5.0)
    torch.testing.assert_close(snr_weights, torch.tensor(expected))
    assert snr_weights[0] == 1.0 and 0 < snr_weights[-1] < 1e-3
    with pytest.raises(ValueError, match="weighting"):
        structure_timestep_weights(t, alphas_cumprod, "sigmoid")
    with pytest.raises(ValueError, match="timesteps"):
        structure_timestep_weights(torch.tensor([1000]), alphas_cumprod, "snr")


# --- config -------------------------------------------------------------------------------------------------------


def test_config_validation_and_warmup():
    config = StructureConfig(weight=0.02, warmup_steps=100)
    assert structure_weight_at(0, config) == 0.0
    assert structure_weight_at(50, config) == pytest.approx(0.01)
    assert structure_weight_at(100, config) == pytest.approx(0.02)
    assert structure_weight_at(10_000, config) == pytest.approx(0.02)
    assert structure_weight_at(0, StructureConfig(weight=0.3, warmup_steps=0)) == 0.3
    for bad in (
        {"weight": -1.0},
        {"relation": "cosine"},
        {"distance": "emd"},
        {"temperature": 0.0},
        {"timestep_weighting": "linear"},
        {"t_threshold": 0},
        {"disc_update_ratio": 0},
        {"scope": "world"},
        {"r1_gamma": -0.1},
    ):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            StructureConfig(**bad)


# --- discriminator ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_size", [8, 16])
@pytest.mark.parametrize("backbone", ["conv", "vit"])
def test_discriminator_outputs_unit_norm_float32(backbone, sample_size):
    disc = _tiny_discriminator(backbone=backbone, sample_size=sample_size)
    out = disc(torch.randn(3, 1, sample_size, sample_size, dtype=torch.float64))
    assert isinstance(out, StructureDiscriminatorOutput)
    assert out.embeddings.shape == (3, 8) and out.embeddings.dtype == torch.float32
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(3))
    (as_tuple,) = disc(torch.randn(3, 1, sample_size, sample_size), return_dict=False)
    assert as_tuple.shape == (3, 8)


def test_discriminator_class_labels_are_checked():
    disc = _tiny_discriminator(num_classes=3)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        disc(x)
    with pytest.raises(ValueError, match="class_labels"):
        _tiny_discriminator()(x, class_labels=torch.tensor([0, 1]))
    z0, z1 = (
        disc(x, class_labels=torch.tensor([0, 0])).embeddings,
        disc(x, class_labels=torch.tensor([1, 1])).embeddings,
    )
    assert not torch.allclose(z0, z1)


def _dinov2_config() -> dict:
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
    ).to_dict()


@pytest.mark.parametrize("backbone", ["conv", "vit", "timm", "transformers"])
def test_save_load_roundtrip(backbone):
    kwargs = {"backbone": backbone, "num_classes": 3 if backbone == "conv" else None}
    if backbone == "transformers":
        kwargs["transformers_config"] = _dinov2_config()
    disc = _tiny_discriminator(**kwargs).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0]) if backbone == "conv" else None
    with tempfile.TemporaryDirectory() as tmpdir:
        disc.save_pretrained(tmpdir)
        reloaded = StructureDiscriminator.from_pretrained(tmpdir)
    public = [key for key in disc.config if not key.startswith("_")]
    # through JSON on both sides: the transformers config's int dict keys (id2label) come back as strings
    saved = json.loads(json.dumps({k: disc.config[k] for k in public}))
    assert {k: reloaded.config[k] for k in public} == saved
    # identical up to float32 rounding (BLAS paths may differ with the memory alignment of loaded weights)
    torch.testing.assert_close(
        reloaded(x, class_labels=labels).embeddings, disc(x, class_labels=labels).embeddings, atol=1e-6, rtol=0
    )


def test_timm_local_pretrained_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    disc = _tiny_discriminator(backbone="timm", timm_pretrained_path=str(path), freeze_backbone=True)
    torch.testing.assert_close(disc.encoder.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert not any(p.requires_grad for p in disc.encoder.parameters())
    disc.train().requires_grad_(True)
    assert not disc.encoder.training and not any(p.requires_grad for p in disc.encoder.parameters())
    assert all(p.requires_grad for p in disc.head.parameters())


# --- adversarial losses ------------------------------------------------------------------------------------------


def _batch(batch_size: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch_size, 1, 8, 8, generator=generator) * 2 - 1
    x0_hat = (x0 + 0.3 * torch.randn(batch_size, 1, 8, 8, generator=generator)).clamp(-1, 1)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    return x0, x0_hat, timesteps


@pytest.mark.parametrize("relation,distance", COMBINATIONS)
def test_adversarial_losses_vanish_on_identical_batches(relation, distance):
    disc = _tiny_discriminator().train()
    x0, _, timesteps = _batch()
    config = StructureConfig(relation=relation, distance=distance, timestep_weighting="none")
    loss, _ = structure_discriminator_loss(
        disc, structure_inputs(x0, x0.clone(), timesteps, _alphas_cumprod(), config), config
    )
    torch.testing.assert_close(loss, torch.zeros(6), atol=1e-6, rtol=0)
    disc.requires_grad_(False)
    loss, _ = structure_denoiser_loss(
        disc, structure_inputs(x0, x0.clone(), timesteps, _alphas_cumprod(), config), config
    )
    torch.testing.assert_close(loss, torch.zeros(6), atol=1e-6, rtol=0)


def test_denoiser_loss_gradients_reach_only_x0_hat():
    disc = _tiny_discriminator(num_classes=3).train().requires_grad_(False)
    x0, x0_hat, timesteps = _batch()
    x0.requires_grad_(True)
    x0_hat.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    config = StructureConfig(timestep_weighting="none")
    loss, stats = structure_denoiser_loss(
        disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config), config, class_labels=labels
    )
    assert loss.shape == (6,) and (loss > 0).all()
    assert set(stats) == {"loss_struct", "struct_real_entropy", "struct_fake_entropy", "struct_weight_mean"}
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    loss.mean().backward()
    assert x0.grad is None
    assert all(p.grad is None for p in disc.parameters())
    assert x0_hat.grad is not None and (x0_hat.grad.flatten(1).abs().sum(1) > 0).all()


def test_denoiser_loss_requires_frozen_discriminator():
    disc = _tiny_discriminator()
    x0, x0_hat, timesteps = _batch()
    with pytest.raises(ValueError, match="requires_grad_"):
        structure_denoiser_loss(
            disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), StructureConfig()), StructureConfig()
        )


def test_threshold_gating_keeps_gradients_off_high_noise_samples():
    disc = _tiny_discriminator().requires_grad_(False)
    x0, x0_hat, _ = _batch()
    x0_hat.requires_grad_(True)
    timesteps = torch.tensor([10, 50, 90, 300, 600, 900])
    config = StructureConfig(timestep_weighting="threshold", t_threshold=100)
    loss, stats = structure_denoiser_loss(
        disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config), config
    )
    assert (loss[3:] == 0).all() and (loss[:3] > 0).all()
    assert stats["struct_weight_mean"].item() == pytest.approx(0.5)
    loss.sum().backward()
    per_sample = x0_hat.grad.flatten(1).abs().sum(1)
    assert (per_sample[:3] > 0).all() and (per_sample[3:] == 0).all()
    # without gating, the low-noise rows pull on the high-noise samples through the relation's columns
    x0_hat.grad = None
    ungated = StructureConfig(timestep_weighting="threshold", t_threshold=100, gate_fake_gradients=False)
    ungated_loss, _ = structure_denoiser_loss(
        disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), ungated), ungated
    )
    torch.testing.assert_close(ungated_loss, loss.detach())
    ungated_loss.sum().backward()
    assert (x0_hat.grad.flatten(1).abs().sum(1)[3:] > 0).all()


@pytest.mark.parametrize("r1_gamma", [0.0, 1.0])
def test_discriminator_loss_gradients_reach_only_discriminator(r1_gamma):
    disc = _tiny_discriminator().train()
    x0, x0_hat, timesteps = _batch()
    x0.requires_grad_(True)
    x0_hat.requires_grad_(True)
    config = StructureConfig(timestep_weighting="none", r1_gamma=r1_gamma)
    loss, stats = structure_discriminator_loss(
        disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config), config
    )
    assert loss.shape == (6,)
    assert {"loss_struct", "struct_real_entropy", "struct_fake_entropy"} <= set(stats)
    assert ("struct_r1" in stats) == (r1_gamma > 0)
    if r1_gamma == 0:
        torch.testing.assert_close(loss, -loss.detach().abs())  # the discriminator maximises S >= 0
    loss.mean().backward()
    assert x0.grad is None and x0_hat.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters() if p.requires_grad)


@pytest.mark.parametrize("backbone", ["conv", "vit"])
def test_adam_step_changes_every_trainable_parameter(backbone):
    disc = _tiny_discriminator(backbone=backbone, num_classes=3).train()
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in disc.named_parameters()}
    x0, x0_hat, timesteps = _batch(seed=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    config = StructureConfig(timestep_weighting="none", r1_gamma=0.1)
    loss, _ = structure_discriminator_loss(
        disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config), config, class_labels=labels
    )
    loss.mean().backward()
    optimizer.step()
    for name, p in disc.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


def test_global_scope_rows_match_the_gathered_batch():
    disc = _tiny_discriminator().requires_grad_(False)
    x0, x0_hat, timesteps = _batch(8)
    config = StructureConfig(timestep_weighting="none", scope="global")
    full, _ = structure_denoiser_loss(disc, structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config), config)

    # simulate process 1 of 2: the gather puts process 0's tensors (real z, fake z, weights) before this process's
    with torch.no_grad():
        z = disc(torch.cat([x0[:4], x0_hat[:4]])).embeddings  # [8, d]: process 0's real then fake embeddings
    from_process_0 = iter([z[:4], z[4:], torch.ones(4)])

    def gather(tensor):
        return torch.cat([next(from_process_0), tensor])  # [4, ...] -> [8, ...] in process order

    local, _ = structure_denoiser_loss(
        disc,
        structure_inputs(x0[4:], x0_hat[4:], timesteps[4:], _alphas_cumprod(), config),
        config,
        gather=gather,
        process_index=1,
    )
    assert local.shape == (4,)
    torch.testing.assert_close(local, full[4:])
    with pytest.raises(ValueError, match="scope"):
        structure_denoiser_loss(
            disc,
            structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), StructureConfig()),
            StructureConfig(),
            gather=lambda tensor: tensor,
        )


@pytest.mark.parametrize("device_dtype", [("cpu", torch.bfloat16), ("cpu", torch.float16)], ids=["bf16", "fp16"])
def test_relation_maths_is_float32_under_autocast(device_dtype):
    """Mixed precision must not reach the relations: under autocast the losses equal the float32 ones exactly (before
    this was checked, the softmax relation's matmul ran in bf16 and the KL loss was off by 0.15)."""
    g = torch.Generator().manual_seed(0)
    z_real, z_fake = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    cases = [("softmax", "kl"), ("softmax", "l1"), ("distance", "l2"), ("distance", "huber")]

    def losses():
        return [structure_loss(z_real, z_fake, r, d) for r, d in cases] + [relation_entropy(z_real)]

    expected = losses()
    with torch.autocast(device_dtype[0], dtype=device_dtype[1]):
        got = losses()
    for e, o in zip(expected, got):
        assert o.dtype == torch.float32 and torch.equal(e, o)
