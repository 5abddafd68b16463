"""Tests of the consistent SADM options: 'mmd' on reverse-step samples, re-noising, the column fix, the
noise-conditional encoder and the adaptive λ (docs/METHODS.md §1.2b). Toy sizes, CPU, float64 where maths is checked."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sadm.losses.structure import mmd_loss, renoise, reverse_step_posterior, structure_loss
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.structure import (
    StructureConfig,
    adaptive_structure_weight,
    structure_denoiser_loss,
    structure_discriminator_loss,
    structure_inputs,
)


def _alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()


def _embeddings(n: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _conditional_discriminator() -> StructureDiscriminator:
    torch.manual_seed(0)
    return StructureDiscriminator(
        in_channels=1, sample_size=8, embed_dim=8, base_channels=8, num_layers=2, num_timesteps=1000
    )


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    x0_hat = (x0 + 0.3 * torch.randn(n, 1, 8, 8, generator=g)).requires_grad_(True)
    timesteps = torch.randint(20, 400, (n,), generator=g)
    x_t = torch.randn(n, 1, 8, 8, generator=g)
    return x0, x0_hat, timesteps, x_t


# --- pure maths ---------------------------------------------------------------------------------------------------


def test_reverse_step_posterior_one_step_is_ddpm_posterior():
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, prediction_type="sample", variance_type="fixed_small", clip_sample=False
    )
    x0, x_t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = 500
    scheduler.set_timesteps(1000)
    # DDPMScheduler.step with the model predicting x0: prev_sample = μ̃ + σ̃·n; n from a seeded generator
    step = scheduler.step(x0, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    mean, std = reverse_step_posterior(x0, x_t, torch.full((3,), t), torch.full((3,), t - 1), scheduler.alphas_cumprod)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean + std * noise, step, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 10, 250])
def test_reverse_step_posterior_composes_to_the_forward_marginal(k):
    # x_t ~ q(x_t | x0) then x_s ~ q(x_s | x_t, x0) must give q(x_s | x0) = N(√ᾱ_s x0, 1 − ᾱ_s): check mean and variance
    a = _alphas_cumprod()
    t = torch.tensor([300, 600, 999])
    s = t - k
    x0 = torch.ones(3, 1, 1, 1, dtype=torch.float64)
    coef_x0, std = reverse_step_posterior(x0, torch.zeros_like(x0), t, s, a)  # μ̃ with x_t = 0: the x0 coefficient
    coef_xt = reverse_step_posterior(torch.zeros_like(x0), x0, t, s, a)[0]  # the x_t coefficient
    a_t, a_s = a[t].reshape(-1, 1, 1, 1), a[s].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(coef_x0 + coef_xt * a_t.sqrt(), a_s.sqrt())
    torch.testing.assert_close(coef_xt**2 * (1 - a_t) + std**2, 1 - a_s)


def test_renoise_from_clean_and_from_a_level():
    a = _alphas_cumprod()
    x, noise = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    u = torch.tensor([10, 700])
    expected = a[u].sqrt().reshape(-1, 1, 1, 1) * x + (1 - a[u]).sqrt().reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(renoise(x, torch.tensor([-1, -1]), u, a, noise), expected)
    # s -> u composes like one step from clean: √(ᾱ_u/ᾱ_s)·√ᾱ_s = √ᾱ_u, and the variances add up
    s = torch.tensor([5, 300])
    ratio = (a[u] / a[s]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(renoise(x, s, u, a, noise), ratio.sqrt() * x + (1 - ratio).sqrt() * noise)


def test_mmd_rows_match_the_hand_computed_u_statistic():
    z_real, z_fake = _embeddings(5, seed=1), _embeddings(5, seed=2)
    bandwidths = (0.5, 2.0)

    def k(a, b):
        return sum(torch.exp(-(a - b).pow(2).sum() / (2 * h * h)) for h in bandwidths) / len(bandwidths)

    n = 5
    u_stat = sum(
        k(z_real[i], z_real[j]) + k(z_fake[i], z_fake[j]) - k(z_real[i], z_fake[j]) - k(z_fake[i], z_real[j])
        for i, j in itertools.permutations(range(n), 2)
    ) / (n * (n - 1))
    rows = mmd_loss(z_real, z_fake, bandwidths)
    assert rows.shape == (5,)
    torch.testing.assert_close(rows.mean(), u_stat)
    torch.testing.assert_close(mmd_loss(z_real, z_real.clone(), bandwidths), torch.zeros(5, dtype=torch.float64))


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_two():
    same = mmd_loss(_embeddings(200, seed=3), _embeddings(200, seed=4)).mean()
    shifted = F.normalize(_embeddings(200, seed=5) + torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), dim=1)
    different = mmd_loss(_embeddings(200, seed=3), shifted).mean()
    assert abs(same) < 0.01 < different


def test_masked_losses_equal_the_losses_of_the_sub_batch():
    z_real, z_fake = _embeddings(7, seed=6), _embeddings(7, seed=7)
    mask = torch.tensor([True, False, True, True, False, True, True])
    sub = mask.nonzero().squeeze(1)
    rows = mmd_loss(z_real, z_fake, mask=mask)
    torch.testing.assert_close(rows[sub], mmd_loss(z_real[sub], z_fake[sub]))
    assert (rows[~mask] == 0).all()
    for relation, distance in [("softmax", "kl"), ("softmax", "l1"), ("distance", "huber"), ("distance", "l2")]:
        rows = structure_loss(z_real, z_fake, relation, distance, 0.1, 0.1, mask=mask)
        torch.testing.assert_close(rows[sub], structure_loss(z_real[sub], z_fake[sub], relation, distance, 0.1, 0.1))
        assert (rows[~mask] == 0).all()


# --- inputs and losses ----------------------------------------------------------------------------------------------


def test_paired_inputs_are_the_clean_pair():
    x0, x0_hat, timesteps, x_t = _batch()
    inputs = structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), StructureConfig(t_threshold=100), x_t)
    assert inputs.real is not x0 and torch.equal(inputs.real, x0) and inputs.fake is x0_hat
    assert (inputs.levels == -1).all()
    torch.testing.assert_close(inputs.weights, (timesteps < 100).float())


def test_mmd_inputs_are_reverse_step_samples_with_shared_noise():
    x0, x0_hat, timesteps, x_t = _batch()
    timesteps[0] = 5  # t < k: inactive
    config = StructureConfig(formulation="mmd", timestep_weighting="none", reverse_step=10)
    inputs = structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config, x_t, torch.Generator().manual_seed(0))
    assert inputs.weights[0] == 0 and (inputs.weights[1:] == 1).all()
    assert torch.equal(inputs.levels[1:], timesteps[1:] - 10)
    # real − fake = c·(x0 − x̂0) exactly: the same noise on both sides
    coef = reverse_step_posterior(
        torch.ones_like(x0), torch.zeros_like(x_t), timesteps, inputs.levels, _alphas_cumprod()
    )[0]
    torch.testing.assert_close(inputs.real - inputs.fake, coef * (x0 - x0_hat), rtol=1e-5, atol=1e-6)
    inputs.fake.sum().backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x_t"):
        structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config)


def test_renoised_inputs_reach_level_t_plus_offset():
    x0, x0_hat, timesteps, x_t = _batch()
    config = StructureConfig(timestep_weighting="none", renoise_offset=50)
    inputs = structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config, x_t)
    assert torch.equal(inputs.levels, timesteps + 50)
    a = _alphas_cumprod()[inputs.levels].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(inputs.real - inputs.fake, a.sqrt() * (x0 - x0_hat.detach()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        StructureConfig(formulation="mmd", timestep_weighting="none", reverse_step=10),
        StructureConfig(formulation="mmd", timestep_weighting="none", reverse_step=10, renoise_offset=20),
        StructureConfig(timestep_weighting="none", renoise_offset=0),
        StructureConfig(t_threshold=200, columns="active"),
    ],
    ids=["mmd", "mmd_renoise", "paired_renoise", "paired_active_columns"],
)
def test_losses_of_the_new_options(config):
    x0, x0_hat, timesteps, x_t = _batch()
    disc = (
        _conditional_discriminator()
        if config.noise_conditional
        else StructureDiscriminator(in_channels=1, sample_size=8, embed_dim=8, base_channels=8, num_layers=2)
    )
    disc.eval()  # spectral norm without power iteration: both steps see the same weights
    inputs = structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config, x_t, torch.Generator().manual_seed(0))
    loss, stats = structure_denoiser_loss(disc.requires_grad_(False), inputs, config)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    assert (loss[inputs.weights == 0] == 0).all()
    loss.mean().backward()
    assert x0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in disc.parameters())
    disc.requires_grad_(True)
    loss_d, _ = structure_discriminator_loss(disc, inputs, config)
    loss_d.mean().backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    # the discriminator maximises what the denoiser minimises
    torch.testing.assert_close(loss_d.detach(), -loss.detach(), rtol=1e-5, atol=1e-7)


def test_too_small_active_sub_batch_contributes_zero():
    x0, x0_hat, timesteps, x_t = _batch()
    timesteps[:] = 500
    timesteps[:3] = 50  # 3 active rows under t < 100 < min_active 4
    config = StructureConfig(t_threshold=100, columns="active")
    disc = StructureDiscriminator(in_channels=1, sample_size=8, embed_dim=8, base_channels=8, num_layers=2)
    inputs = structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config, x_t)
    loss, _ = structure_denoiser_loss(disc.requires_grad_(False), inputs, config)
    assert (loss == 0).all()
    loss, _ = structure_denoiser_loss(disc, inputs, StructureConfig(t_threshold=100, columns="active", min_active=3))
    assert (loss[:3] > 0).all() and (loss[3:] == 0).all()


def test_mmd_global_scope_rows_match_the_gathered_batch():
    config = StructureConfig(formulation="mmd", timestep_weighting="none", reverse_step=10, scope="global")
    x0, x0_hat, timesteps, x_t = _batch()
    disc = _conditional_discriminator().requires_grad_(False)
    inputs = structure_inputs(x0, x0_hat, timesteps, _alphas_cumprod(), config, x_t, torch.Generator().manual_seed(0))
    full, _ = structure_denoiser_loss(disc, inputs, config)
    halves = [
        type(inputs)(inputs.real[p], inputs.fake[p], inputs.levels[p], inputs.weights[p])
        for p in (slice(0, 4), slice(4, 8))
    ]
    with torch.no_grad():  # process 0's embeddings, as the gather would deliver them
        z = disc(
            torch.cat([halves[0].real, halves[0].fake]), timestep=torch.cat([halves[0].levels] * 2) + 1
        ).embeddings
    from_process_0 = iter([z[:4], z[4:], halves[0].weights])

    def gather(tensor):
        return torch.cat([next(from_process_0), tensor])

    local, _ = structure_denoiser_loss(disc, halves[1], config, gather=gather, process_index=1)
    torch.testing.assert_close(local, full[4:])


# --- the encoder ----------------------------------------------------------------------------------------------------


def test_noise_conditional_encoder_uses_and_requires_the_level(tmp_path):
    disc = _conditional_discriminator()
    x = torch.randn(4, 1, 8, 8)
    low, high = (disc(x, timestep=torch.full((4,), t)).embeddings for t in (0, 800))
    assert not torch.allclose(low, high)
    with pytest.raises(ValueError, match="timestep"):
        disc(x)
    with pytest.raises(ValueError, match="timestep"):
        StructureDiscriminator(in_channels=1, sample_size=8)(x, timestep=torch.zeros(4))
    disc.save_pretrained(tmp_path)
    loaded = StructureDiscriminator.from_pretrained(tmp_path).eval()
    disc.eval()  # spectral norm: no power iteration, so both give the same weights
    torch.testing.assert_close(
        loaded(x, timestep=torch.full((4,), 300)).embeddings, disc(x, timestep=torch.full((4,), 300)).embeddings
    )


# --- adaptive λ -------------------------------------------------------------------------------------------------------


def test_adaptive_weight_is_the_capped_gradient_norm_ratio():
    output = torch.randn(4, 3, requires_grad=True)
    loss_dsm = output.pow(2).sum()  # gradient 2·output
    loss_struct = 0.01 * output.sum()  # gradient 0.01 everywhere
    ratio = 2 * output.detach().norm() / (0.01 * 12**0.5)
    lam = adaptive_structure_weight(loss_dsm, loss_struct, output, StructureConfig(weight=1e6, grad_ratio=0.1))
    torch.testing.assert_close(lam, 0.1 * ratio)
    assert not lam.requires_grad
    capped = adaptive_structure_weight(loss_dsm, loss_struct, output, StructureConfig(weight=0.5, grad_ratio=0.1))
    assert capped.item() == pytest.approx(0.5)


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"formulation": "mmd", "distance": "kl"}, "unpaired"),
        ({"formulation": "mmd", "timestep_weighting": "snr"}, "snr"),
        ({"formulation": "mmd", "reverse_step": 0}, "reverse_step"),
        ({"formulation": "mmd", "reverse_step": 100, "t_threshold": 100}, "no row would ever be active"),
        ({"formulation": "gan"}, "formulation"),
        ({"columns": "some"}, "columns"),
        ({"formulation": "mmd", "columns": "active", "timestep_weighting": "none"}, "columns"),
        ({"min_active": 1}, "min_active"),
        ({"renoise_offset": -1}, "renoise_offset"),
        ({"mmd_bandwidths": "0.5,x"}, "mmd_bandwidths"),
        ({"mmd_bandwidths": "0.5,-1"}, "mmd_bandwidths"),
        ({"grad_ratio": 0.0}, "grad_ratio"),
    ],
)
def test_bad_options_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        StructureConfig(**bad)


def test_schedule_dependent_options_are_checked_against_T():
    with pytest.raises(ValueError, match="reverse_step"):
        StructureConfig(formulation="mmd", timestep_weighting="none", reverse_step=1000).check_schedule(1000)
    with pytest.raises(ValueError, match="no room below T"):
        StructureConfig(t_threshold=100, renoise_offset=950).check_schedule(1000)
    StructureConfig(t_threshold=100, renoise_offset=900).check_schedule(1000)  # levels up to 999: fine
    assert StructureConfig().distance == "kl" and StructureConfig(formulation="mmd").distance is None
