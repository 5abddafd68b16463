"""The training step of scripts/train_sadm.py (`sadm.step.DenoiserTrainStep`), called as the script calls it."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler

from sadm.diffusion_gan import DiffusionGANConfig, build_adaptive_diffusion
from sadm.disc_augment import DiffAugment
from sadm.models.dit import build_dit
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.models.timestep_discriminator import TimestepDiscriminator
from sadm.objective import DenoisingObjective
from sadm.step import BadStepCounter, DenoiserTrainStep, GuardedOptimizerStep
from sadm.structure import StructureConfig, structure_denoiser_loss, structure_inputs
from sadm.terms import ADVERSARIAL_TERMS, AdversarialTerm, DiffusionGANTerm, StructureTerm, register_adversarial_term


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


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


def make_step(accelerator, struct_cfg, gan_cfg, x0_clip=1.0, max_bad_steps=20, disc_augment=None):
    """The objects `scripts/train_sadm.py` builds, at toy sizes: DiT, objective, both terms, the guarded step."""
    model = perturbed_dit()
    struct = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16)
    timestep_disc = TimestepDiscriminator(in_channels=1, sample_size=8, base_channels=8, num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    objective = DenoisingObjective(DDPMScheduler(), "epsilon", channels=1, null_class=3)
    diffusion = build_adaptive_diffusion(gan_cfg, seed=0)
    terms = [
        StructureTerm(struct_cfg, struct, torch.optim.AdamW(struct.parameters(), lr=1e-3), accelerator),
        DiffusionGANTerm(gan_cfg, timestep_disc, torch.optim.AdamW(timestep_disc.parameters(), lr=1e-3), accelerator,
                         diffusion),
    ]  # fmt: skip
    for term in terms:
        term.prepare()
    bad_steps = BadStepCounter(max_bad_steps)
    step = DenoiserTrainStep(
        accelerator, model, optimizer, lr_scheduler, objective, terms,
        GuardedOptimizerStep(accelerator, 1.0, bad_steps), x0_clip=x0_clip, seed=0, per_sample_noise=True,
        disc_augment=disc_augment,
    )  # fmt: skip
    return step, bad_steps


def batch():
    torch.manual_seed(1)
    return {
        "pixel_values": torch.rand(6, 1, 8, 8) * 2 - 1,
        "class_labels": torch.tensor([0, 1, 2, 0, 1, 2]),
        "sample_keys": torch.arange(6),
    }


def test_one_step_changes_every_trainable_parameter_of_every_model(accelerator):
    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000)
    gan_cfg = DiffusionGANConfig(weight=0.1, r1_interval=1, timestep_weighting="none")
    step, bad_steps = make_step(accelerator, struct_cfg, gan_cfg)
    models = [step.model, *(term.unwrapped for term in step.terms)]
    before = [snapshot(m) for m in models]

    assert step(batch(), 0) is True  # no accumulation: every model stepped
    for module, params in zip(models, before):
        assert not unchanged(module, params), f"{type(module).__name__}: {unchanged(module, params)}"
    for name in ("loss", "loss_dsm", "loss_struct", "loss_gan_g", "loss_struct_disc", "d_loss", "r1", "ada_p"):
        assert name in step.stats, name
    assert torch.isfinite(step.stats["loss"]) and step.terms[1].d_step == 1
    assert step.terms[1].diffusion.num_updates == 1  # one finite D step: one adjustment input for p
    assert bad_steps.stats() == {"bad_steps_transformer": 0, "bad_steps_discriminator": 0,
                                 "bad_steps_timestep_discriminator": 0}  # fmt: skip


def test_the_step_is_reproducible_from_the_sample_keys(accelerator):
    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000)
    gan_cfg = DiffusionGANConfig(weight=0.1, timestep_weighting="none")
    losses = []
    for _ in range(2):
        step, _ = make_step(accelerator, struct_cfg, gan_cfg)
        torch.manual_seed(123 + len(losses))  # the global RNG differs: --per_sample_noise draws must not care
        step(batch(), 0)
        losses.append(step.stats["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def test_disc_augment_shares_each_draw_between_real_and_fake_and_follows_the_sample_keys(accelerator):
    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000)
    gan_cfg = DiffusionGANConfig(weight=0.1, timestep_weighting="none")
    plain, _ = make_step(accelerator, struct_cfg, gan_cfg)
    plain(batch(), 0)
    views, losses = [], []
    for seed in (123, 456):  # the global RNG differs: the augmentation draws from stream 4 of each sample
        step, _ = make_step(accelerator, struct_cfg, gan_cfg, disc_augment=DiffAugment("translation,cutout"))
        torch.manual_seed(seed)
        step(batch(), 0)
        structure, gan = step.terms
        views.append([t.detach() for t in (*gan.view, structure.inputs.real, structure.inputs.fake)])
        losses.append(step.stats["loss"])
    gan_real, gan_fake, struct_real, struct_fake = views[0]
    # cutout (and the zeros translation shifts in) at the same pixels of a sample's real and fake: one draw for both
    assert (gan_real == 0).any() and torch.equal(gan_real == 0, gan_fake == 0)
    assert (struct_real == 0).any() and torch.equal(struct_real == 0, struct_fake == 0)
    assert not torch.equal(gan_real == 0, struct_real == 0)  # each term's view has its own draw
    assert not torch.equal(gan_fake, plain.terms[1].view[1].detach())  # the discriminator saw augmented inputs
    for a, b in zip(*views):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert plain.stats["loss"] != losses[0]


def test_discriminator_view_clamps_what_the_discriminators_see(accelerator):
    step, _ = make_step(accelerator, StructureConfig(weight=0.1), DiffusionGANConfig(weight=0.1), x0_clip=0.5)
    real, fake = step.discriminator_view(torch.full((2, 1, 8, 8), 0.9), torch.full((2, 1, 8, 8), -3.0))
    assert real.max() == 0.5 and fake.min() == -0.5
    step.x0_clip = 0.0  # 0 disables the clamp
    real, _ = step.discriminator_view(torch.full((2, 1, 8, 8), 0.9), torch.zeros(2, 1, 8, 8))
    assert real.max() == pytest.approx(0.9)


def test_gan_gate_zero_everywhere_keeps_the_term_out_of_the_denoiser_gradient(accelerator):
    """w(t) = 0 for every sample (t >= t_threshold = 1 for t > 0): the GAN term adds exactly 0 to the loss."""
    gan_cfg = DiffusionGANConfig(weight=0.1, timestep_weighting="threshold", t_threshold=1)
    step, _ = make_step(accelerator, StructureConfig(weight=0.1, warmup_steps=0), gan_cfg)
    step.terms = step.terms[1:]  # the GAN term alone
    step(batch(), 0)
    assert not (step.terms[0].weights > 0).any()  # these sample keys draw no t = 0
    assert step.stats["loss"] == step.stats["loss_dsm"]


def test_a_term_class_registers_by_name_and_model_folder():
    assert ADVERSARIAL_TERMS["structure"] is StructureTerm and ADVERSARIAL_TERMS["diffusion_gan"] is DiffusionGANTerm

    class Clash(AdversarialTerm):
        name, model_name = "clash", "discriminator"

    with pytest.raises(ValueError, match="already used by term 'structure'"):
        register_adversarial_term(Clash)
    with pytest.raises(ValueError, match="needs config.weight > 0"):
        StructureTerm(StructureConfig(weight=0.0), torch.nn.Linear(1, 1), None, None)


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


@pytest.mark.parametrize("ratio", [1, 2])
def test_discriminator_steps_over_an_accumulation_window_equal_those_on_the_whole_batch(ratio):
    """disc_update_ratio k with 2 micro-batches of 3 == k on one batch of 6, for the timestep discriminator (the
    structure term's relations are taken within a micro-batch by design: tests/test_distributed.py)."""
    struct_cfg = StructureConfig(weight=0.1, warmup_steps=0, t_threshold=1000, disc_update_ratio=ratio)
    gan_cfg = DiffusionGANConfig(weight=0.1, timestep_weighting="none", r1_interval=1, disc_update_ratio=ratio)
    whole, parts = batch(), []
    for half in (slice(0, 3), slice(3, 6)):
        parts.append({k: v[half] for k, v in whole.items()})
    results = []
    for accumulation, micro_batches in ((1, [whole]), (2, parts)):
        AcceleratorState._reset_state(True)
        step, _ = make_step(Accelerator(cpu=True, gradient_accumulation_steps=accumulation), struct_cfg, gan_cfg)
        synced = [step(micro, 0) for micro in micro_batches]
        assert synced[-1] and not any(synced[:-1])
        gan = step.terms[1]
        assert gan.d_step == ratio and gan.diffusion.num_updates == ratio and not gan.window
        results.append(snapshot(gan.unwrapped))
    AcceleratorState._reset_state(True)
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=2e-6, rtol=1e-5, msg=name)
