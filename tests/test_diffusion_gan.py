"""Diffusion-GAN building blocks: the adaptive diffusion of the official code (METHODS.md §2.2), the timestep
discriminator, the GAN losses and the two loss functions used by the training scripts."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from sadm.diffusion_augment import AdaptiveDiffusion, alphas_cumprod_for_length, noise_feature_maps, q_sample
from sadm.diffusion_gan import (
    DiffusionGANConfig,
    build_adaptive_diffusion,
    diffusion_gan_discriminator_loss,
    diffusion_gan_generator_loss,
    max_p_change,
)
from sadm.losses.adversarial import gan_discriminator_loss, gan_generator_loss, r1_penalty
from sadm.models.timestep_discriminator import TimestepDiscriminator, minibatch_std


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Toy tensors: intra-op threads only add spin-wait overhead (50x slower on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_TIMM = {"timm_model_name": "test_resnet", "timm_out_indices": (0, 1, 2)}


def tiny_discriminator(trunk: str = "conv", **kwargs) -> TimestepDiscriminator:
    torch.manual_seed(0)
    defaults = {"in_channels": 1, "sample_size": 8, "trunk": trunk, "base_channels": 8, "num_layers": 2}
    defaults.update({"embed_dim": 16, "num_classes": 3})
    if trunk == "projected":
        defaults.update(t_conditioning=False, **TINY_TIMM)
    return TimestepDiscriminator(**{**defaults, **kwargs})


def feed(diffusion: AdaptiveDiffusion, sign: float, batch: int, calls: int) -> None:
    for _ in range(calls):
        diffusion.update(torch.full((batch,), sign))


# ---------------------------------------------------------------------------------------------- adaptive diffusion


def test_T_from_p_rounds_half_to_even_and_clips():
    diffusion = AdaptiveDiffusion(t_min=10, t_max=20)
    for p, T in [(0.0, 10), (0.25, 12), (0.35, 14), (0.5, 15), (1.0, 20)]:  # 2.5 -> 2, 3.5 -> 4 (Python's round)
        diffusion.p = p
        diffusion.update_T()
        assert diffusion.T == T, (p, diffusion.T)
        assert diffusion.alphas_cumprod.shape == (T + 1,)
    diffusion.p = 1.7  # out of range p still yields T within [t_min, t_max]
    diffusion.update_T()
    assert diffusion.T == 20


def test_p_step_after_ada_interval_updates_is_exact():
    diffusion = AdaptiveDiffusion(ada_interval=4, ada_kimg=100)
    feed(diffusion, 1.0, batch=8, calls=3)
    assert diffusion.p == 0.0 and diffusion.T == 10  # no adjustment before the 4th call
    feed(diffusion, 1.0, batch=8, calls=1)
    assert diffusion.p == 8 * 4 / (100 * 1000)  # sign(1 − 0.6)·batch·ada_interval/(ada_kimg·1000)
    assert diffusion.stats() == {"r_d": 1.0, "p": 8 * 4 / (100 * 1000), "T": 10.0}
    # T follows p: with ada_kimg = 1 one interval of 8 x 4 positive logits moves p by 0.032 -> T = 10 + round(31.68)
    fast = AdaptiveDiffusion(ada_interval=4, ada_kimg=1)
    feed(fast, 1.0, batch=8, calls=4)
    assert fast.p == pytest.approx(0.032) and fast.T == 42
    # r_d exactly at the target leaves p where it is (sign 0)
    still = AdaptiveDiffusion(target=0.5, ada_interval=1)
    still.update(torch.tensor([1.0, 1.0, 1.0, -1.0]))
    assert still.p == 0.0 and still.stats()["r_d"] == 0.5


def test_p_is_clipped_at_zero_and_one():
    diffusion = AdaptiveDiffusion(ada_interval=2, ada_kimg=0.001)  # one interval moves p by 16 >> 1
    feed(diffusion, -1.0, batch=8, calls=2)
    assert diffusion.p == 0.0 and diffusion.T == diffusion.t_min
    feed(diffusion, 1.0, batch=8, calls=2)
    assert diffusion.p == 1.0 and diffusion.T == diffusion.t_max
    feed(diffusion, 1.0, batch=8, calls=2)
    assert diffusion.p == 1.0
    feed(diffusion, -1.0, batch=8, calls=2)
    assert diffusion.p == 0.0


def test_fixed_diffusion_keeps_T_at_t_max():
    config = DiffusionGANConfig(mode="fixed", t_max=100)
    diffusion = build_adaptive_diffusion(config, seed=0)
    alphas_cumprod = diffusion.alphas_cumprod.clone()
    feed(diffusion, -1.0, batch=8, calls=8)
    assert diffusion.p == 1.0 and diffusion.T == 100 and torch.equal(diffusion.alphas_cumprod, alphas_cumprod)
    assert diffusion.stats()["r_d"] == -1.0  # r_d is still recorded


def test_fixed_diffusion_redraws_its_t_table_every_ada_interval():
    """Official code: the 64-slot table is re-drawn at every adjustment (every ada_interval D steps), T fixed or not."""
    config = DiffusionGANConfig(mode="fixed", t_max=100, ada_interval=4)
    diffusion = build_adaptive_diffusion(config, seed=0)
    tables = [diffusion.timestep_table.clone()]
    feed(diffusion, 1.0, batch=8, calls=3)
    assert torch.equal(diffusion.timestep_table, tables[0])  # no adjustment before the 4th call
    for _ in range(3):
        feed(diffusion, 1.0, batch=8, calls=4)
        tables.append(diffusion.timestep_table.clone())
        assert diffusion.p == 1.0 and diffusion.T == 100  # T stays at t_max
        assert int((diffusion.timestep_table == 0).sum()) == 32 and diffusion.timestep_table.max() <= 100
    assert all(not torch.equal(a, b) for a, b in zip(tables, tables[1:])), "the t-table was not re-drawn"
    # exact resume: the table RNG is in the state, so a restored copy re-draws the same next table
    restored = build_adaptive_diffusion(config, seed=123)
    restored.load_state_dict(diffusion.state_dict())
    for copy in (diffusion, restored):
        feed(copy, -1.0, batch=8, calls=4)
    assert torch.equal(restored.timestep_table, diffusion.timestep_table)
    assert not torch.equal(diffusion.timestep_table, tables[-1])


def test_half_of_the_draws_are_clean():
    diffusion = AdaptiveDiffusion(t_max=100, initial_p=1.0)
    assert int((diffusion.timestep_table == 0).sum()) == 32  # 64 slots, 32 zeros
    t = diffusion.sample_timesteps((20000,), generator=torch.Generator().manual_seed(0))
    assert abs((t == 0).float().mean().item() - 0.5) < 0.02


def test_priority_never_draws_one_and_favours_large_t():
    diffusion = AdaptiveDiffusion(t_min=5, t_max=30, table_size=30000, clean_fraction=0.0, initial_p=1.0)
    table = diffusion.timestep_table
    assert diffusion.T == 30 and table.min() == 2 and table.max() == 30  # t = 1 has weight 0
    counts = torch.bincount(table, minlength=31).float()
    assert counts[2:11].sum() < counts[11:21].sum() < counts[21:31].sum()
    expected = torch.arange(31, dtype=torch.float64).clamp(min=1) - 1  # ∝ k − 1
    expected = expected / expected.sum() * table.numel()
    assert ((counts[2:].double() - expected[2:]).abs() < 4 * expected[2:].sqrt()).all()  # within 4 binomial sds
    uniform = AdaptiveDiffusion(
        t_min=5, t_max=30, ts_dist="uniform", table_size=3000, clean_fraction=0.0, initial_p=1.0
    )
    assert (uniform.timestep_table == 1).any()
    # logit-normal: the mode at mid noise, symmetric ends, and the density the docstring states
    logit_normal = AdaptiveDiffusion(
        t_min=5, t_max=39, ts_dist="logit_normal", table_size=20000, clean_fraction=0.0, initial_p=1.0
    )
    counts = torch.bincount(logit_normal.timestep_table, minlength=40).double()[1:]
    u = torch.arange(1, 40, dtype=torch.float64) / 40
    expected = torch.exp(-0.5 * torch.logit(u) ** 2) / (u * (1 - u))
    expected = expected / expected.sum() * counts.sum()
    assert ((counts - expected).abs() < 4 * expected.sqrt() + 1).all()
    low, mid, high = counts[:9].sum(), counts[15:24].sum(), counts[-9:].sum()
    assert mid > 2.5 * max(low, high) and (low - high).abs() < 4 * low.sqrt()


def test_projected_gan_table_grows_with_p():
    diffusion = build_adaptive_diffusion(DiffusionGANConfig(preset="projected_gan"))
    assert diffusion.T == 5 and int((diffusion.timestep_table == 0).sum()) == 64  # p = 0: nothing noised
    diffusion.p = 0.25
    diffusion.update_T()
    assert int((diffusion.timestep_table > 0).sum()) == 16
    diffusion.p = 1.0
    diffusion.update_T()
    assert diffusion.T == 500 and int((diffusion.timestep_table > 0).sum()) == 48  # capped at 3/4


def test_t_zero_leaves_inputs_unchanged():
    x = torch.randn(6, 1, 8, 8)
    alphas_cumprod = alphas_cumprod_for_length(10, 1e-4, 2e-2)
    assert torch.equal(q_sample(x, torch.zeros(6, dtype=torch.long), alphas_cumprod, 0.05), x)
    clean = AdaptiveDiffusion(clean_fraction=1.0)
    y, t = clean(x)
    assert torch.equal(y, x) and (t == 0).all()


def test_schedule_is_respaced_over_T_and_sets_the_mean():
    diffusion = AdaptiveDiffusion(t_min=10, t_max=1000, noise_std=0.5)
    diffusion.p = 0.5
    diffusion.update_T()
    T = diffusion.T
    assert T == 505
    direct = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, T, dtype=torch.float64), 0)  # β over T values
    assert diffusion.alphas_cumprod[0] == 1.0
    assert torch.allclose(diffusion.alphas_cumprod[1:].double(), direct, rtol=1e-5)
    full = alphas_cumprod_for_length(1000, 1e-4, 2e-2)
    assert not torch.isclose(diffusion.alphas_cumprod[T], full[T], rtol=0.1)  # not a truncated 1000-step schedule
    # E[y] = √ᾱ_t·x and std(y) = √(1−ᾱ_t)·σ at every drawn t
    x = torch.full((40000, 1), 2.0)
    y, t = diffusion(x, generator=torch.Generator().manual_seed(0))
    alpha_bar = diffusion.alphas_cumprod[t].unsqueeze(1)
    residual = (y - alpha_bar.sqrt() * x) / ((1 - alpha_bar).sqrt() * 0.5).clamp(min=1e-12)
    noised = t > 0
    assert abs(residual[noised].mean().item()) < 0.03 and abs(residual[noised].std().item() - 1) < 0.03
    assert torch.equal(y[~noised], x[~noised])


def test_noise_feature_maps_per_sample_and_channel():
    features = torch.randn(2, 3, 4, 4)
    alphas_cumprod = alphas_cumprod_for_length(10, 1e-4, 2e-2)
    t = torch.tensor([[0, 10, 0], [10, 0, 10]])
    noised = noise_feature_maps(features, t, alphas_cumprod, 0.5, generator=torch.Generator().manual_seed(0))
    clean = (t == 0).reshape(2, 3, 1, 1).expand_as(features)
    assert torch.equal(noised[clean], features[clean]) and not torch.equal(noised[~clean], features[~clean])
    diffusion = AdaptiveDiffusion(initial_p=1.0, t_max=50)
    out, t_drawn = diffusion.noise_feature_maps(torch.randn(4, 5, 2, 2))
    assert out.shape == (4, 5, 2, 2) and t_drawn.shape == (4, 5)
    with pytest.raises(ValueError, match="t of shape"):
        q_sample(features, torch.zeros(3, dtype=torch.long), alphas_cumprod, 0.5)


def test_state_dict_round_trip_reproduces_subsequent_draws():
    source = AdaptiveDiffusion(ada_interval=2, ada_kimg=0.5, seed=1)
    feed(source, 1.0, batch=8, calls=5)  # two adjustments and one pending call
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    restored = AdaptiveDiffusion(ada_interval=2, ada_kimg=0.5, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.p, restored.T, restored.stats()) == (source.p, source.T, source.stats())
    assert torch.equal(restored.timestep_table, source.timestep_table)
    assert torch.equal(restored.alphas_cumprod, source.alphas_cumprod)
    for diffusion in (source, restored):  # the pending call + one more adjustment, with the restored table RNG
        feed(diffusion, 1.0, batch=8, calls=1)
        feed(diffusion, -1.0, batch=8, calls=2)
    assert restored.p == source.p and torch.equal(restored.timestep_table, source.timestep_table)
    x = torch.randn(16, 1, 4, 4)
    y1, t1 = source(x, generator=torch.Generator().manual_seed(3))
    y2, t2 = restored(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and torch.equal(y1, y2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"t_min": 20, "t_max": 10}, "t_min=20"),
        ({"t_min": 0}, "t_min=0"),
        ({"t_min": 1}, "t_min=1"),  # priority weights vanish at T = 1
        ({"target": 1.0}, "target=1.0"),
        ({"target": -1.5}, "target=-1.5"),
        ({"ts_dist": "gamma"}, "ts_dist 'gamma'"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
        ({"clean_fraction": 1.5}, "clean_fraction=1.5"),
        ({"t_table": "ada"}, "t_table 'ada'"),
    ],
)
def test_bad_diffusion_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveDiffusion(**kwargs)


def test_bad_preset_and_config_arguments_raise():
    for kwargs, match in [
        ({"preset": "biggan"}, "preset 'biggan'"),
        ({"mode": "always"}, "mode 'always'"),
        ({"loss_type": "wasserstein"}, "loss_type 'wasserstein'"),
        ({"t_min": 50, "t_max": 20}, "t_min=50"),
        ({"target": 2.0}, "target=2.0"),
        ({"r1_interval": 0}, "r1_interval=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            DiffusionGANConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ada_kimg": 0}, r"ada_kimg=0 must be > 0"),
        ({"ada_kimg": -5.0}, r"ada_kimg=-5.0 must be > 0"),
        ({"target": 1.0}, r"target=1.0 must be in \(-1, 1\)"),
        ({"target": -1.0}, r"target=-1.0 must be in \(-1, 1\)"),
        ({"r1_interval": 0}, r"r1_interval=0 must be >= 1"),
        ({"r1_interval": -3}, r"r1_interval=-3 must be >= 1"),
        ({"ada_interval": 0}, r"ada_interval=0 must be >= 1"),
    ],
)
def test_bad_adaptive_schedule_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionGANConfig(**kwargs)


def test_max_p_change_is_batch_times_steps_over_ada_kimg():
    # METHODS.md §2.3: 1500 steps x 32 with ada_kimg 100 cap p at 0.48
    assert max_p_change(batch=32, d_steps=1500, ada_kimg=100) == pytest.approx(0.48)
    assert max_p_change(batch=8, d_steps=100, ada_kimg=100) == pytest.approx(0.008)
    with pytest.raises(ValueError, match="ada_kimg=0"):
        max_p_change(batch=8, d_steps=100, ada_kimg=0)


def test_presets_fill_the_config():
    config = DiffusionGANConfig(preset="projected_gan", t_max=300)
    assert (config.t_min, config.t_max, config.noise_std, config.beta_end) == (5, 300, 0.5, 1e-2)
    assert (config.loss_type, config.r1_gamma, config.t_table) == ("hinge", 0.0, "projected_gan")
    insgen = build_adaptive_diffusion(DiffusionGANConfig(preset="insgen"), seed=0)
    assert (insgen.ts_dist, insgen.t_max, insgen.noise_std) == ("uniform", 500, 0.05)


# ---------------------------------------------------------------------------------------------- losses


def test_gan_losses_by_hand():
    fake, real = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 2.0])
    assert torch.allclose(gan_generator_loss(fake), torch.tensor([math.log(2), math.log(1 + math.exp(-1))]))
    assert torch.equal(gan_generator_loss(fake, "hinge"), torch.tensor([-0.0, -1.0]))
    expected = torch.tensor(
        [math.log(2) + math.log(1 + math.exp(-0.5)), math.log(1 + math.e) + math.log(1 + math.exp(-2))]
    )
    assert torch.allclose(gan_discriminator_loss(real, fake), expected)
    hinge = gan_discriminator_loss(torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.5]), "hinge")
    assert torch.equal(hinge, torch.tensor([0.5, 1.5]))  # relu(1 − D(y)) + relu(1 + D(y_g))
    with pytest.raises(ValueError, match="loss_type 'wgan'"):
        gan_generator_loss(fake, "wgan")
    with pytest.raises(ValueError, match="loss_type 'wgan'"):
        gan_discriminator_loss(real, fake, "wgan")


def test_r1_on_a_linear_discriminator():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    x = torch.randn(4, 3).requires_grad_(True)
    logits = x @ w  # D(x) = w·x, ∇_x D = w
    r1 = r1_penalty(logits, x)
    assert r1.shape == (4,) and torch.allclose(r1, torch.full((4,), 14.0))
    r1.sum().backward()  # create_graph: ∂/∂w Σ_i ‖w‖² = 2·4·w
    assert torch.allclose(w.grad, 8 * w.detach())
    with pytest.raises(ValueError, match="real_inputs must require grad"):
        r1_penalty(logits, x.detach())


# ---------------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("trunk", ["conv", "resnet", "vit", "projected"])
def test_discriminator_save_load_and_shape(tmp_path, trunk):
    discriminator = tiny_discriminator(trunk).eval()
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 10]), torch.tensor([0, 1, 2, 0])
    discriminator.save_pretrained(tmp_path)
    reloaded = TimestepDiscriminator.from_pretrained(tmp_path).eval()
    for name, value in discriminator.state_dict().items():  # weights and the frozen backbone's buffers, exactly
        assert torch.equal(reloaded.state_dict()[name], value), name
    logits = discriminator(x, timesteps=t, class_labels=labels).logits
    assert logits.shape == (4,)
    # outputs agree to float rounding (oneDNN may pick another conv kernel for the reloaded tensors' layout)
    torch.testing.assert_close(logits, reloaded(x, timesteps=t, class_labels=labels).logits)
    assert torch.equal(logits, discriminator(x, t, labels, return_dict=False)[0])


def test_spectral_norm_discriminator_save_load(tmp_path):
    discriminator = tiny_discriminator("conv", spectral_norm=True).eval()
    discriminator.save_pretrained(tmp_path)
    reloaded = TimestepDiscriminator.from_pretrained(tmp_path).eval()
    for name, value in discriminator.state_dict().items():  # parametrization original, u and v
        assert torch.equal(reloaded.state_dict()[name], value), name
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 9]), torch.tensor([2, 0])
    torch.testing.assert_close(discriminator(x, t, labels).logits, reloaded(x, t, labels).logits)


def test_t_matters_only_with_t_conditioning():
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    t_a, t_b = torch.tensor([0, 0, 0]), torch.tensor([5, 50, 500])
    blind = tiny_discriminator("conv", t_conditioning=False)
    assert torch.equal(blind(x, t_a, labels).logits, blind(x, t_b, labels).logits)
    assert torch.equal(blind(x, None, labels).logits, blind(x, t_b, labels).logits)
    seeing = tiny_discriminator("conv")
    assert not torch.allclose(seeing(x, t_a, labels).logits, seeing(x, t_b, labels).logits)
    with pytest.raises(ValueError, match="timesteps are required"):
        seeing(x, None, labels)
    with pytest.raises(ValueError, match="class_labels must be given"):
        seeing(x, t_a)


def test_bad_discriminator_arguments_raise():
    with pytest.raises(ValueError, match="trunk 'mlp'"):
        TimestepDiscriminator(in_channels=1, sample_size=8, trunk="mlp")
    with pytest.raises(ValueError, match="t_conditioning=True is not supported with trunk='projected'"):
        TimestepDiscriminator(in_channels=1, sample_size=8, trunk="projected", **TINY_TIMM)
    with pytest.raises(ValueError, match="patch_size=3"):
        TimestepDiscriminator(in_channels=1, sample_size=8, trunk="vit", patch_size=3)
    with pytest.raises(FileNotFoundError, match="timm_pretrained_path"):
        TimestepDiscriminator(
            in_channels=1, sample_size=8, trunk="projected", t_conditioning=False, timm_pretrained_path="/nonexistent"
        )


@pytest.mark.parametrize("sample_size", [8, 16])
def test_resnet_trunk_size_and_shapes_at_8_and_16(sample_size):
    """The digits configuration (base 64, 10 classes, t-conditioned): 0.3-1 M parameters, logits [B]."""
    torch.manual_seed(0)
    discriminator = TimestepDiscriminator(in_channels=1, sample_size=sample_size, trunk="resnet", num_classes=10)
    num_parameters = sum(p.numel() for p in discriminator.parameters())
    assert 0.3e6 <= num_parameters <= 1e6, num_parameters
    assert len(discriminator.res_blocks) == {8: 1, 16: 2}[sample_size]  # halvings down to 4x4
    x = torch.randn(6, 1, sample_size, sample_size)
    logits = discriminator(x, torch.arange(6) * 100, torch.arange(6)).logits
    assert logits.shape == (6,) and torch.isfinite(logits).all()


def test_minibatch_std_by_hand():
    # batch 4, group 2: groups {0, 2} and {1, 3} (sample i in group i mod B/G); 2 features of 1 pixel
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0], [0.0, 2.0]]).reshape(4, 2, 1, 1)
    out = minibatch_std(x, group_size=2, eps=0.0)
    assert out.shape == (4, 3, 1, 1) and torch.equal(out[:, :2], x)
    # group {0, 2}: stds (|1-3|/2, |0-4|/2) = (1, 2), mean 1.5; group {1, 3}: (0, 1), mean 0.5
    assert out[:, 2].flatten().tolist() == [1.5, 0.5, 1.5, 0.5]
    # a group size that does not divide the batch falls back to the largest one that does (3 of 6 -> 3; 4 of 6 -> 3)
    y = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(minibatch_std(y, 4), minibatch_std(y, 3))
    assert not torch.equal(minibatch_std(y, 4), minibatch_std(y, 2))
    z = torch.randn(5, 2, 2, 2)  # 5 is prime: groups of one, a constant channel
    assert torch.allclose(minibatch_std(z, 4)[:, 2], torch.full((5, 2, 2), 1e-4))


def test_resnet_minibatch_std_couples_the_samples_of_a_group():
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    other = x.clone()
    other[2] += 1.0  # same group as sample 0 (groups of 4 in a batch of 8: samples 0, 2, 4, 6)
    shifted = x.clone()
    shifted[1] += 1.0  # the other group
    grouped = tiny_discriminator("resnet", minibatch_std_group_size=4).eval()
    base = grouped(x, t, labels).logits
    assert not torch.allclose(base[0], grouped(other, t, labels).logits[0])
    assert torch.equal(base[0], grouped(shifted, t, labels).logits[0])
    alone = tiny_discriminator("resnet", minibatch_std_group_size=1).eval()
    assert torch.equal(alone(x, t, labels).logits[0], alone(other, t, labels).logits[0])


def test_resnet_projection_conditioning_on_t_and_class():
    """logit = w·φ(y) + b + ⟨φ(y), c(t, class)⟩/√dim: the class and t enter only through the projection."""
    discriminator = tiny_discriminator("resnet").eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 10, 10])
    a, b = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    logits_a, logits_b = discriminator(x, t, a).logits, discriminator(x, t, b).logits
    assert not torch.allclose(logits_a, logits_b)
    assert not torch.allclose(logits_a, discriminator(x, torch.tensor([500, 500, 500]), a).logits)
    with torch.no_grad():
        phi = discriminator._features(x, None, None)[0]  # [B, feature_dim]
        time = discriminator.time_embedding(discriminator.time_proj(t.float()))
        cond = lambda labels: discriminator.cond_proj(time + discriminator.class_embedding(labels))  # noqa: E731
        expected = (phi * (cond(a) - cond(b))).sum(dim=1) / math.sqrt(discriminator.feature_dim)
    torch.testing.assert_close(logits_a - logits_b, expected)


def test_bad_resnet_arguments_raise():
    for size in (4, 12):
        with pytest.raises(
            ValueError, match=f"trunk='resnet' needs a power-of-two sample_size >= 8.*sample_size={size}"
        ):
            TimestepDiscriminator(in_channels=1, sample_size=size, trunk="resnet")
    with pytest.raises(ValueError, match="minibatch_std_group_size=0"):
        TimestepDiscriminator(in_channels=1, sample_size=8, trunk="resnet", minibatch_std_group_size=0)


def test_projected_backbone_loads_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    backbone = timm.create_model(
        "test_resnet", pretrained=False, features_only=True, in_chans=1, out_indices=(0, 1, 2)
    )
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    discriminator = tiny_discriminator("projected", timm_pretrained_path=str(path))
    for name, value in backbone.state_dict().items():
        assert torch.equal(discriminator.backbone.state_dict()[name], value), name


# ---------------------------------------------------------------------------------------------- loss functions


@pytest.mark.parametrize("trunk", ["conv", "resnet", "vit", "projected"])
def test_one_discriminator_step_changes_every_trainable_parameter(trunk):
    discriminator = tiny_discriminator(trunk).train()
    config = DiffusionGANConfig(r1_gamma=1.0, r1_interval=4)
    diffusion = build_adaptive_diffusion(config, seed=0)
    diffusion.p = 0.1
    diffusion.update_T()
    generator = torch.Generator().manual_seed(0)
    x_real, x_fake = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    trainable = {name: p.detach().clone() for name, p in discriminator.named_parameters() if p.requires_grad}
    frozen = {
        name: v.detach().clone() for name, v in discriminator.state_dict().items() if name.startswith("backbone")
    }
    assert (len(frozen) > 0) == (trunk == "projected")

    optimizer = torch.optim.Adam([p for p in discriminator.parameters() if p.requires_grad], lr=1e-3)
    loss, stats, real_logits = diffusion_gan_discriminator_loss(
        discriminator, diffusion, x_real, x_fake, labels, config, d_step=0, generator=generator
    )
    assert loss.shape == (6,) and real_logits.shape == (6,) and not real_logits.requires_grad
    assert stats["r1"] > 0 and 0 <= stats["d_real_acc"] <= 1 and 0 <= stats["d_fake_acc"] <= 1
    loss.mean().backward()
    optimizer.step()
    for name, p in discriminator.named_parameters():
        if name in trainable:
            assert not torch.equal(p.detach(), trainable[name]), f"{name} did not change"
    for name, value in discriminator.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"frozen {name} changed"
    diffusion.update(real_logits)  # what the caller does after gathering


def test_lazy_r1_runs_every_r1_interval_steps_and_is_scaled():
    discriminator = tiny_discriminator("conv", num_classes=None)
    config = DiffusionGANConfig(r1_gamma=2.0, r1_interval=4, mode="none", class_conditional_disc=False)
    diffusion = build_adaptive_diffusion(config)
    x_real, x_fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    with_r1, stats, real_logits = diffusion_gan_discriminator_loss(
        discriminator, diffusion, x_real, x_fake, None, config, d_step=8
    )
    without_r1, stats_skip, _ = diffusion_gan_discriminator_loss(
        discriminator, diffusion, x_real, x_fake, None, config, d_step=9
    )
    assert math.isnan(stats_skip["r1"])
    fake_logits = discriminator(x_fake, torch.zeros(3, dtype=torch.long)).logits
    assert torch.allclose(without_r1, F.softplus(fake_logits) + F.softplus(-real_logits))
    x = x_real.clone().requires_grad_(True)
    r1 = r1_penalty(discriminator(x, torch.zeros(3, dtype=torch.long)).logits, x)  # mode none: y = x, t = 0
    assert torch.allclose(with_r1 - without_r1, r1 * 2.0 / 2 * 4, rtol=1e-4)


def test_r1_is_taken_wrt_the_clean_real_through_the_noising():
    """Official code: R1 differentiates D w.r.t. the clean real x through y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε, so the penalty
    is ᾱ_t·‖∇_y D(y, t)‖² per sample, not ‖∇_y D‖² (which is 1/ᾱ_t too strong on noised samples)."""
    discriminator = tiny_discriminator("conv")
    config = DiffusionGANConfig(mode="fixed", t_max=1000, r1_gamma=2.0, r1_interval=4)
    diffusion = build_adaptive_diffusion(config, seed=0)
    diffusion.timestep_table = torch.tensor([0, 300, 500, 500])  # fixed steps (and one clean slot)
    x_real, x_fake = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss(d_step):
        generators = [torch.Generator().manual_seed(i) for i in range(6)]  # one per sample: same t and ε each call
        return diffusion_gan_discriminator_loss(
            discriminator, diffusion, x_real, x_fake, labels, config, d_step=d_step, generator=generators
        )

    with_r1, stats, _ = loss(8)
    without_r1, _, _ = loss(9)
    # by hand: the same y and t (each sample's t then ε come from its own generator), the y-gradient, times ᾱ_t
    y, t = diffusion(x_real, generator=[torch.Generator().manual_seed(i) for i in range(6)])
    assert (t > 0).any() and (t == 0).any()
    y = y.detach().requires_grad_(True)
    (grad_y,) = torch.autograd.grad(discriminator(y, t, labels).logits.sum(), y)
    alpha_bar = diffusion.alphas_cumprod[t]  # [B]
    assert (alpha_bar[t > 0] < 0.5).all()  # the two candidates differ by far more than the tolerance
    expected = alpha_bar * grad_y.square().flatten(1).sum(1)
    r1 = (with_r1 - without_r1).detach() / (2.0 / 2 * 4)  # γ/2 · r1_interval
    assert torch.allclose(r1, expected, rtol=1e-4, atol=1e-8)
    assert torch.allclose(stats["r1"], expected.mean(), rtol=1e-4)


def test_projected_r1_is_taken_wrt_the_clean_input_image():
    """The projected trunk noises its feature maps inside D: R1 is ‖∇_x D(x)‖² w.r.t. the clean pixels."""
    discriminator = tiny_discriminator("projected")
    config = DiffusionGANConfig(preset="projected_gan", r1_gamma=2.0, r1_interval=1)
    diffusion = build_adaptive_diffusion(config, seed=0)
    diffusion.p = 1.0
    diffusion.update_T()
    x_real, x_fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(4)]

    _, stats, _ = diffusion_gan_discriminator_loss(
        discriminator, diffusion, x_real, x_fake, labels, config, d_step=0, generator=generators()
    )
    x = x_real.clone().requires_grad_(True)
    logits = discriminator(x, class_labels=labels, feature_diffusion=diffusion, generator=generators()).logits
    assert torch.allclose(stats["r1"], r1_penalty(logits, x).mean(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["adaptive", "none"])
def test_generator_loss_reaches_the_generated_samples(mode):
    discriminator = tiny_discriminator("conv").requires_grad_(False)
    config = DiffusionGANConfig(mode=mode)
    diffusion = build_adaptive_diffusion(config, seed=0)
    x_fake = torch.randn(4, 1, 8, 8, requires_grad=True)
    loss, stats = diffusion_gan_generator_loss(
        discriminator,
        diffusion,
        x_fake,
        torch.tensor([0, 1, 2, 0]),
        config,
        generator=torch.Generator().manual_seed(0),
    )
    assert loss.shape == (4,) and set(stats) == {"g_adv_loss", "g_fake_logit_mean"}
    loss.sum().backward()
    assert x_fake.grad is not None and x_fake.grad.abs().sum() > 0
    if mode == "none":  # y = x, t = 0: the loss is the plain GAN loss
        logits = discriminator(x_fake.detach(), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 0])).logits
        assert torch.allclose(loss, F.softplus(-logits))


def test_projected_generator_loss_reaches_the_generated_samples():
    discriminator = tiny_discriminator("projected").requires_grad_(False)
    config = DiffusionGANConfig(preset="projected_gan")
    diffusion = build_adaptive_diffusion(config, seed=0)
    x_fake = torch.randn(4, 1, 8, 8, requires_grad=True)
    loss, _ = diffusion_gan_generator_loss(discriminator, diffusion, x_fake, torch.tensor([0, 1, 2, 0]), config)
    loss.sum().backward()
    assert x_fake.grad.abs().sum() > 0
