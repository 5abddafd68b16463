"""The `dit` trunk: discriminators on a frozen pretrained DiT (sadm/models/dit_trunk.py) and their use in train_sadm.py."""

import pytest
import torch
from helpers import run_script, write_class_folder
from safetensors.torch import load_file, save_file

from sadm.diffusion_augment import AdaptiveDiffusion
from sadm.diffusion_gan import DiffusionGANConfig, diffusion_gan_discriminator_loss, diffusion_gan_generator_loss
from sadm.models.dit import build_dit
from sadm.models.dit_trunk import (
    DiTStructureEncoder,
    DiTTimestepDiscriminator,
    check_dit_trunk,
    default_trunk_blocks,
    diffusion_gan_input_for_dit,
    dit_timestep_for_alpha_bar,
    freeze_dit_trunk,
    load_dit_trunk,
    trunk_alphas_cumprod,
)
from sadm.structure import StructureConfig, structure_denoiser_loss, structure_discriminator_loss, structure_inputs

LATENT = {"in_channels": 4, "sample_size": 8}  # a latent DiT's input: 4 channels, 8x8


@pytest.fixture
def dit():
    return build_dit("tiny", sample_size=8, in_channels=4, num_classes=3, seed=0)


def gan_disc(dit, diffusion=None, **kwargs):
    trunk = freeze_dit_trunk(dit)
    torch.manual_seed(1)
    return DiTTimestepDiscriminator(
        **LATENT, trunk_hidden_size=128, trunk_patch_size=2, trunk_num_classes=3, trunk_blocks=[0, 2],
        head_channels=16, dit=trunk, diffusion=diffusion, **kwargs,
    )  # fmt: skip


def encoder(dit, **kwargs):
    torch.manual_seed(2)
    return DiTStructureEncoder(
        **LATENT, trunk_hidden_size=128, trunk_num_classes=3, trunk_blocks=[1], embed_dim=8, hidden_dim=16,
        dit=freeze_dit_trunk(dit), **kwargs,
    )  # fmt: skip


def latents(batch=4, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_default_blocks_stop_at_half_depth():
    assert default_trunk_blocks(4) == (0, 1)
    assert default_trunk_blocks(12) == (2, 5)
    assert default_trunk_blocks(28) == (6, 13)
    assert default_trunk_blocks(1) == (0,)


def test_trunk_is_a_frozen_copy_outside_parameters_and_state(dit):
    disc = gan_disc(dit, AdaptiveDiffusion(initial_p=1.0, adaptive=False))
    trunk = disc.dit
    own = {p.data_ptr() for p in dit.parameters()}
    assert not own & {p.data_ptr() for p in trunk.parameters()}, "the trunk shares tensors with the trained DiT"
    assert not {p.data_ptr() for p in trunk.parameters()} & {p.data_ptr() for p in disc.parameters()}
    assert all(key.startswith("heads.") for key in disc.state_dict())
    assert not any(p.requires_grad for p in trunk.parameters()) and not trunk.training
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    disc.train().requires_grad_(True)  # what the training loop does before a discriminator step
    assert not trunk.training and not any(p.requires_grad for p in trunk.parameters())
    optimizer = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-2)
    config = DiffusionGANConfig(weight=0.1, r1_gamma=1.0, r1_interval=1)
    heads_before = [p.detach().clone() for p in disc.parameters()]
    loss, stats, _ = diffusion_gan_discriminator_loss(
        disc, disc.diffusion, latents(), latents(seed=1), None, config, 0
    )
    loss.mean().backward()  # R1 included: a double backward through the trunk
    optimizer.step()
    assert torch.isfinite(stats["r1"]) and stats["r1"] > 0
    assert all(p.grad is None for p in trunk.parameters())
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, disc.parameters())), "a head did not train"
    disc.to(torch.float64)  # the trunk follows .to() with the heads
    assert next(trunk.parameters()).dtype == torch.float64 and trunk is disc.dit


def test_gradients_reach_the_fake_input_and_the_real_side_builds_no_graph(dit):
    disc = gan_disc(dit, AdaptiveDiffusion(initial_p=1.0, adaptive=False)).requires_grad_(False)
    fake = latents().requires_grad_(True)
    loss, _ = diffusion_gan_generator_loss(
        disc, disc.diffusion, fake, torch.tensor([0, 1, 2, 0]), DiffusionGANConfig()
    )
    loss.mean().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    real_logits = disc(latents(), timesteps=torch.tensor([0, 5, 9, 3])).logits
    assert not real_logits.requires_grad  # frozen heads on a detached input: no graph anywhere
    tau, labels = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    disc.requires_grad_(True)
    assert all(f.grad_fn is None for f in disc._block_features(latents(), tau, labels))  # trunk off the graph
    assert all(f.grad_fn is not None for f in disc._block_features(fake, tau, labels))


def test_shapes_on_latents_and_labels_matter(dit):
    disc = gan_disc(dit)  # no diffusion: timesteps are the trunk's own τ
    x, t = latents(), torch.tensor([0, 10, 100, 999])
    logits = disc(x, timesteps=t, class_labels=torch.tensor([0, 1, 2, 0])).logits
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, disc(x, timesteps=t).logits)  # the null class differs from the labels
    assert disc(x, timesteps=t, return_dict=False)[0].shape == (4,)
    enc = encoder(dit, num_timesteps=1000)
    z = enc(x, timestep=torch.tensor([0, 1, 500, 1000])).embeddings
    assert z.shape == (4, 8) and torch.allclose(z.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="timestep"):
        enc(x)
    with pytest.raises(ValueError, match="class_labels"):
        encoder(dit)(x, class_labels=torch.zeros(4, dtype=torch.long))


def test_alpha_bar_mapping_is_exact_on_the_trunk_schedule():
    alphas = trunk_alphas_cumprod(1000, 1e-4, 0.02, "linear")
    steps = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.allclose(dit_timestep_for_alpha_bar(alphas[steps], alphas), steps.float(), atol=1e-3)
    assert dit_timestep_for_alpha_bar(torch.ones(1), alphas).item() == 0.0  # clean: the first step
    between = dit_timestep_for_alpha_bar((alphas[[100]] * alphas[[101]]).sqrt(), alphas).item()
    assert 100 < between < 101
    # Diffusion-GAN's y = √ᾱ·x + σ√(1−ᾱ)·ε at the ᾱ whose SNR is the trunk's at τ = 300: c·y is the trunk's x_300
    sigma, target = 0.05, alphas[300].double()
    alpha_bar = target * sigma**2 / (1 - target + target * sigma**2)  # solves ᾱ/(ᾱ + σ²(1−ᾱ)) = ᾱ_300
    x, eps = latents(2), latents(2, seed=1)
    y = alpha_bar.sqrt().float() * x + sigma * (1 - alpha_bar).sqrt().float() * eps
    scaled, tau = diffusion_gan_input_for_dit(y, alpha_bar.float().expand(2), sigma, alphas)
    assert torch.allclose(tau, torch.full((2,), 300.0), atol=1e-2)
    expected = alphas[300].sqrt() * x + (1 - alphas[300]).sqrt() * eps
    assert torch.allclose(scaled, expected, atol=1e-4)
    assert torch.equal(diffusion_gan_input_for_dit(y, torch.ones(2), sigma, alphas)[0], y)  # t = 0: unchanged


def test_gradient_checkpointing_gives_the_same_gradients(dit):
    disc = gan_disc(dit, AdaptiveDiffusion(initial_p=1.0, adaptive=False)).eval()  # spectral norm's u fixed
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            disc.enable_gradient_checkpointing()
        x = latents().requires_grad_(True)
        disc(x, timesteps=torch.tensor([0, 3, 7, 9])).logits.sum().backward()
        grads.append(x.grad)
    assert disc.gradient_checkpointing and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_structure_terms_on_the_dit_encoder(dit):
    enc = encoder(dit, num_timesteps=1000)
    config = StructureConfig(weight=1.0, formulation="mmd", timestep_weighting="none", reverse_step=5, min_active=2,
                             r1_gamma=1.0)  # fmt: skip
    alphas = trunk_alphas_cumprod(1000, 1e-4, 0.02, "linear")
    x0, t = latents(), torch.tensor([10, 50, 200, 600])
    x0_hat = latents(seed=3).requires_grad_(True)
    x_t = alphas[t].sqrt()[:, None, None, None] * x0 + (1 - alphas[t]).sqrt()[:, None, None, None] * latents(seed=4)
    inputs = structure_inputs(x0, x0_hat, t, alphas, config, x_t, torch.Generator().manual_seed(0))
    enc.requires_grad_(False)
    loss, _ = structure_denoiser_loss(enc, inputs, config)
    loss.mean().backward()
    assert x0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in enc.dit.parameters())
    enc.requires_grad_(True)
    loss_d, stats = structure_discriminator_loss(enc, inputs, config)
    loss_d.mean().backward()
    assert torch.isfinite(stats["struct_r1"]) and all(p.grad is not None for p in enc.parameters())
    assert all(p.grad is None for p in enc.dit.parameters())


def test_save_holds_the_heads_and_reloads_onto_the_trunk(tmp_path, dit):
    disc = gan_disc(dit)
    disc.save_pretrained(tmp_path / "d")
    saved = load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors"))
    assert saved and all(k.startswith("heads.") for k in saved)
    heads_only = DiTTimestepDiscriminator.from_pretrained(tmp_path / "d")  # as the checkpoint hook loads it
    assert heads_only.dit is None
    with pytest.raises(ValueError, match="no trunk"):
        heads_only(latents(), timesteps=torch.zeros(4, dtype=torch.long))
    fresh = gan_disc(build_dit("tiny", sample_size=8, in_channels=4, num_classes=3, seed=0))
    torch.nn.init.zeros_(fresh.heads[0][0].bias)
    fresh.load_state_dict(heads_only.state_dict())
    x, t = latents(), torch.tensor([1, 2, 3, 4])
    disc.eval(), fresh.eval()
    assert torch.allclose(disc(x, timesteps=t).logits, fresh(x, timesteps=t).logits)


def test_bad_trunks_are_refused_with_the_mismatch(tmp_path, dit):
    with pytest.raises(ValueError, match="in_channels=4 but the disc input has 3 channels"):
        check_dit_trunk(dit, 3, 8, 3, (0,), "T", "the disc input")
    with pytest.raises(ValueError, match="sample_size=8 but the disc input is 16x16"):
        check_dit_trunk(dit, 4, 16, 3, (0,), "T", "the disc input")
    with pytest.raises(ValueError, match="T has 3 classes but the data has 10 classes"):
        check_dit_trunk(dit, 4, 8, 10, (0,), "T")
    with pytest.raises(ValueError, match=r"--disc_trunk_blocks 1,7: T has blocks 0..3, not 7"):
        check_dit_trunk(dit, 4, 8, 3, (1, 7), "T")
    with pytest.raises(ValueError, match="must be frozen"):
        DiTTimestepDiscriminator(**LATENT, trunk_hidden_size=128, trunk_patch_size=2, trunk_num_classes=3,
                                 trunk_blocks=[0], dit=dit)  # fmt: skip
    with pytest.raises(ValueError, match=f"--disc_trunk_path {tmp_path / 'nowhere'}"):
        load_dit_trunk(str(tmp_path / "nowhere"))
    dit.save_pretrained(tmp_path / "pipe" / "transformer")
    assert load_dit_trunk(str(tmp_path / "pipe")).config.num_layers == 4  # a pipeline folder: its transformer/
    weights = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({"pos_embed.proj.weight": torch.zeros(1)}, str(weights))  # wrong weights
    with pytest.raises(ValueError, match="no DiTTransformer2DModel could be loaded"):
        load_dit_trunk(str(tmp_path / "pipe"))


# ---- train_sadm.py with the dit trunk
TINY = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "4", "--validation_steps", "0", "--report_to", "none"]  # fmt: skip
DIT_TERMS = ["--gan_loss_weight", "0.05", "--gan_disc_trunk", "dit", "--structure_loss_weight", "10",
             "--structure_formulation", "mmd", "--structure_timestep_weighting", "none", "--structure_reverse_step", "5",
             "--structure_min_active", "2", "--structure_warmup_steps", "0", "--disc_backbone", "dit"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A data folder and a 5-step tiny export to fine-tune (the trunk's pretrained weights)."""
    root = tmp_path_factory.mktemp("dit_trunk")
    data = write_class_folder(root / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    result = run_script("train_sadm.py", *TINY, "--train_data_dir", str(data), "--output_dir", str(root / "base"),
                        "--max_train_steps", "5", launch=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "base"


def test_fine_tuning_with_dit_trunks_resumes_exactly(tmp_path, base):
    data, pretrained = base
    common = [*TINY, *DIT_TERMS, "--train_data_dir", str(data), "--pretrained_model_name_or_path", str(pretrained),
              "--checkpointing_steps", "2", "--gradient_checkpointing", "--diffusion_gan_r1_interval", "1"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script("train_sadm.py", *common, "--output_dir", str(straight), "--max_train_steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    for sub in ("discriminator", "timestep_discriminator"):  # heads only: the trunk is never saved
        for folder in (straight / sub, straight / "checkpoint-2" / sub):
            assert all(k.split(".")[0] in ("heads", "projection") for k in weights(folder))
    first = run_script("train_sadm.py", *common, "--output_dir", str(resumed), "--max_train_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script("train_sadm.py", *common, "--output_dir", str(resumed), "--max_train_steps", "4",
                        "--resume_from_checkpoint", "latest")  # fmt: skip
    assert second.returncode == 0 and "Resuming from" in second.stdout + second.stderr, second.stderr[-3000:]
    for sub in ("transformer", "discriminator", "timestep_discriminator"):
        a, b = weights(straight / sub), weights(resumed / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {sub} differs from the uninterrupted run"


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_train_sadm_refuses_bad_dit_trunks(tmp_path, base):
    data, pretrained = base
    gan = ["--gan_loss_weight", "0.05", "--gan_disc_trunk", "dit"]
    scratch = run_script("train_sadm.py", *TINY, *gan, "--train_data_dir", str(data), "--output_dir",
                         str(tmp_path / "a"), launch=False)  # fmt: skip
    assert scratch.returncode != 0 and "trained from scratch has none" in scratch.stderr
    deep = run_script("train_sadm.py", *TINY, *gan, "--train_data_dir", str(data), "--output_dir", str(tmp_path / "b"),
                      "--pretrained_model_name_or_path", str(pretrained), "--disc_trunk_blocks", "0,9", launch=False)  # fmt: skip
    assert deep.returncode != 0 and "--disc_trunk_blocks 0,9" in deep.stderr and "not 9" in deep.stderr
    assert not (tmp_path / "b" / "checkpoint-1").exists()
    other = tmp_path / "other"
    build_dit("tiny", sample_size=8, in_channels=1, num_classes=5).save_pretrained(other / "transformer")
    classes = run_script("train_sadm.py", *TINY, *gan, "--train_data_dir", str(data), "--output_dir", str(tmp_path / "c"),
                         "--pretrained_model_name_or_path", str(pretrained), "--disc_trunk_path", str(other), launch=False)  # fmt: skip
    assert classes.returncode != 0 and f"--disc_trunk_path {other} has 5 classes but the data has 2" in classes.stderr


def _script(name):
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_dit_arms_parse_as_dit_trunk_runs(tmp_path):
    arms, train = _script("benchmark_quality").ARMS, _script("train_sadm")

    def parse(arm):
        script, flags = arms[arm]
        assert script == "train_sadm.py"
        return train.parse_args([f.replace("{base}", str(tmp_path)) for f in flags] + ["--output_dir", str(tmp_path)])

    gan, mmd = parse("ft_gan_dit"), parse("ft_sadm_mmd_dit")
    gan_run, mmd_run = train.run_config(gan), train.run_config(mmd)
    assert train.uses_dit_trunk(gan, gan_run) and train.uses_dit_trunk(mmd, mmd_run)
    gan_term = train.run_config(parse("ft_gan_term"))
    assert gan_run.structure.weight == 0 and gan_run.diffusion_gan.weight == gan_term.diffusion_gan.weight == 0.01
    reference = train.run_config(parse("ft_sadm_mmd"))
    assert mmd_run.diffusion_gan.weight == 0 and mmd_run.structure == reference.structure  # ft_sadm_mmd, dit encoder
    assert mmd.pretrained_model_name_or_path == str(tmp_path) and mmd.disc_backbone == "dit"
