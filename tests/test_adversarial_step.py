"""One denoiser step and one discriminator step, composed as scripts/train_sadm.py composes them."""

import torch
from diffusers import DDPMScheduler

from sadm.diffusion_gan import (
    DiffusionGANConfig,
    build_adaptive_diffusion,
    diffusion_gan_discriminator_loss,
    diffusion_gan_generator_loss,
)
from sadm.losses import denoising_loss, predict_x0
from sadm.models.dit import build_dit
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.models.timestep_discriminator import TimestepDiscriminator
from sadm.structure import StructureConfig, structure_denoiser_loss, structure_discriminator_loss, structure_inputs


def perturbed_dit():
    torch.manual_seed(0)
    model = build_dit("tiny", sample_size=8, in_channels=1, num_classes=3)
    with torch.no_grad():  # adaLN-Zero style zero inits would hide dead gradient paths
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    return model


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def unchanged(module, before):
    return [n for n, p in module.named_parameters() if p.requires_grad and torch.equal(p, before[n])]


def test_one_sadm_and_gan_step_changes_every_trainable_parameter_of_every_model():
    scheduler = DDPMScheduler()
    a = scheduler.alphas_cumprod
    model = perturbed_dit()
    struct = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16)
    timestep_disc = TimestepDiscriminator(in_channels=1, sample_size=8, base_channels=8, num_classes=3)
    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000)
    gan_cfg = DiffusionGANConfig(weight=0.1, r1_interval=1)
    diffusion = build_adaptive_diffusion(gan_cfg, seed=0)
    before = {m: snapshot(m) for m in (model, struct, timestep_disc)}
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, struct, timestep_disc)]

    torch.manual_seed(1)
    x0, noise = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.randint(0, 1000, (6,))
    x_t = scheduler.add_noise(x0, noise, t)
    eps = model(x_t, timestep=t, class_labels=labels).sample
    x0_hat = predict_x0(eps, x_t, t, a, "epsilon")

    # denoiser step: discriminators frozen, gradients reach θ only (through x̂₀ for the adversarial terms)
    struct.requires_grad_(False)
    timestep_disc.requires_grad_(False)
    loss_struct, _ = structure_denoiser_loss(struct, structure_inputs(x0, x0_hat, t, a, struct_cfg), struct_cfg)
    loss_g, _ = diffusion_gan_generator_loss(timestep_disc, diffusion, x0_hat, labels, gan_cfg)
    loss = denoising_loss(eps, noise, t, a).mean() + 0.1 * loss_struct.mean() + 0.1 * loss_g.mean()
    loss.backward()
    assert all(p.grad is None for p in struct.parameters()) and all(p.grad is None for p in timestep_disc.parameters())
    opts[0].step()

    # discriminator steps on the detached x̂₀
    struct.requires_grad_(True)
    timestep_disc.requires_grad_(True)
    loss_d, _ = structure_discriminator_loss(
        struct, structure_inputs(x0, x0_hat.detach(), t, a, struct_cfg), struct_cfg
    )
    loss_d.mean().backward()
    opts[1].step()
    loss_gd, stats, real_logits = diffusion_gan_discriminator_loss(
        timestep_disc, diffusion, x0, x0_hat.detach(), labels, gan_cfg, 0
    )
    loss_gd.mean().backward()
    opts[2].step()
    assert real_logits.shape == (6,) and 0 <= stats["d_real_acc"] <= 1

    for module in (model, struct, timestep_disc):
        assert not unchanged(module, before[module]), f"{type(module).__name__}: {unchanged(module, before[module])}"


def test_structure_term_is_zero_for_a_perfect_denoiser():
    scheduler = DDPMScheduler()
    struct = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16).requires_grad_(False)
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    t = torch.tensor([1, 2, 3, 4, 5])
    loss, _ = structure_denoiser_loss(
        struct,
        structure_inputs(x0, x0.clone(), t, scheduler.alphas_cumprod, StructureConfig(warmup_steps=0)),
        StructureConfig(warmup_steps=0),
    )
    assert loss.abs().max() < 1e-6
