import math

import pytest
import torch
from diffusers import DDPMScheduler

from sadm.losses import denoising_loss, predict_x0, training_target, vlb_loss
from sadm.models.dit import DIT_PRESETS, build_dit
from sadm.objective import DenoisingObjective


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def test_denoising_loss_by_hand():
    out = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # [2, 1, 1, 2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[3.0, 1.0]]]])
    t = torch.tensor([0, 0])
    loss = denoising_loss(out, target, t, torch.ones(1000) * 0.5, "epsilon")
    assert loss.tolist() == pytest.approx([(1 + 4) / 2, (9 + 1) / 2])


def test_min_snr_weights(scheduler):
    a = scheduler.alphas_cumprod
    t = torch.tensor([10, 900])
    out, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    snr = a[t] / (1 - a[t])
    eps = denoising_loss(out, target, t, a, "epsilon", snr_gamma=5.0)
    assert eps.tolist() == pytest.approx((torch.clamp(snr, max=5.0) / snr).tolist(), rel=1e-5)
    v = denoising_loss(out, target, t, a, "v_prediction", snr_gamma=5.0)
    assert v.tolist() == pytest.approx((torch.clamp(snr, max=5.0) / (snr + 1)).tolist(), rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_inverts_forward_process(scheduler, prediction_type):
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    target = training_target(x0, noise, t, scheduler.alphas_cumprod, prediction_type)
    if prediction_type == "v_prediction":  # agrees with diffusers' own definition of v
        torch.testing.assert_close(target, scheduler.get_velocity(x0, noise, t))
    x0_hat = predict_x0(target, x_t, t, scheduler.alphas_cumprod, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)


def test_unknown_prediction_type_is_named(scheduler):
    with pytest.raises(ValueError, match="'flow'"):
        training_target(
            torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([1]), scheduler.alphas_cumprod, "flow"
        )


def test_vlb_is_zero_when_the_model_posterior_is_exact(scheduler):
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 100, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    v = -torch.ones_like(x0)  # frac = 0: variance = the posterior variance β̃_t
    loss = vlb_loss(v, noise, x0, x_t, t, scheduler.betas, scheduler.alphas_cumprod)
    assert loss.abs().max() < 1e-4
    # any other variance costs something (β̃_t and β_t differ least at large t)
    assert (vlb_loss(v * 0, noise, x0, x_t, t, scheduler.betas, scheduler.alphas_cumprod)[:2] > 0).all()


def test_vlb_kl_by_hand(scheduler):
    # one pixel, t = 500, ε̂ off by δ: KL = (μ̃ − μ_θ)² / (2 β̃_t) / ln 2 with μ_θ − μ̃ = c₁·(x̂₀ − x₀)
    a, b = scheduler.alphas_cumprod.double(), scheduler.betas.double()
    t, x0, eps, delta = 500, 0.3, 0.7, 0.1
    x_t = math.sqrt(a[t]) * x0 + math.sqrt(1 - a[t]) * eps
    c1 = b[t] * math.sqrt(a[t - 1]) / (1 - a[t])
    post_var = b[t] * (1 - a[t - 1]) / (1 - a[t])
    dx0 = -math.sqrt(1 - a[t]) * delta / math.sqrt(a[t])
    expected = (c1 * dx0) ** 2 / (2 * post_var) / math.log(2)
    loss = vlb_loss(
        -torch.ones(1, 1, 1, 1),
        torch.full((1, 1, 1, 1), eps + delta),
        torch.full((1, 1, 1, 1), x0),
        torch.full((1, 1, 1, 1), float(x_t)),
        torch.tensor([t]),
        scheduler.betas,
        scheduler.alphas_cumprod,
    )
    assert loss.item() == pytest.approx(float(expected), rel=1e-3)


def test_presets_match_the_dit_paper():
    assert DIT_PRESETS["DiT-XL/2"] == {
        "num_layers": 28,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "patch_size": 2,
    }
    assert DIT_PRESETS["DiT-S/8"]["num_attention_heads"] * DIT_PRESETS["DiT-S/8"]["attention_head_dim"] == 384
    assert DIT_PRESETS["DiT-B/4"]["num_layers"] == 12 and DIT_PRESETS["DiT-L/2"]["num_layers"] == 24
    assert len(DIT_PRESETS) == 13


def test_build_dit_config_and_label_table():
    model = build_dit("tiny", sample_size=16, in_channels=3, num_classes=7, learn_sigma=True)
    assert model.config.out_channels == 6 and model.config.num_embeds_ada_norm == 7
    table = model.transformer_blocks[0].norm1.emb.class_embedder
    assert table.embedding_table.num_embeddings == 8  # 7 classes + the null class id 7
    assert table.dropout_prob == 0.0  # diffusers' per-block dropout is off; the loop drops labels itself
    with pytest.raises(ValueError, match="not divisible"):
        build_dit("DiT-S/4", sample_size=18)
    with pytest.raises(ValueError, match="not a preset"):
        build_dit("huge")


def test_train_mode_forward_is_deterministic_in_labels():
    model = build_dit("tiny", sample_size=8, in_channels=1, num_classes=3, seed=0).train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(
        model(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample
    )


def test_one_training_step_changes_every_parameter(scheduler):
    torch.manual_seed(0)
    model = build_dit("tiny", sample_size=8, in_channels=1, num_classes=3, learn_sigma=True)
    # DiT's adaLN-Zero layers start at zero in some initialisations: perturb so every gradient path is live
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, noise = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # 3 = the null class
    t = torch.randint(0, 1000, (8,))
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, timestep=t, class_labels=labels).sample
    loss = denoising_loss(out[:, :1], noise, t, scheduler.alphas_cumprod)
    loss = loss + vlb_loss(out[:, 1:], out[:, :1], x0, x_t, t, scheduler.betas, scheduler.alphas_cumprod)
    loss.mean().backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_the_denoising_loss_per_timestep_bucket_is_the_mean_of_each_quarter():
    objective = DenoisingObjective(DDPMScheduler(num_train_timesteps=1000), "epsilon", channels=1)
    loss = torch.tensor([1.0, 3.0, 10.0, 7.0, 5.0])
    timesteps = torch.tensor([0, 249, 250, 999, 600])
    stats = objective.loss_by_timestep_bucket(loss, timesteps)
    assert list(stats) == ["loss_dsm_t0-249", "loss_dsm_t250-499", "loss_dsm_t500-749", "loss_dsm_t750-999"]
    assert stats["loss_dsm_t0-249"] == 2.0 and stats["loss_dsm_t250-499"] == 10.0
    assert stats["loss_dsm_t500-749"] == 5.0 and stats["loss_dsm_t750-999"] == 7.0
    empty = objective.loss_by_timestep_bucket(loss[:2], timesteps[:2])
    assert math.isnan(empty["loss_dsm_t750-999"])  # no sample in that range this micro-batch
