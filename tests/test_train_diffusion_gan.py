"""The Diffusion-GAN trainer: the one-step generator, its pipeline, one G/D step, and `train_diffusion_gan.py` runs."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import REPO, run_script, write_class_folder
from sadm.pipelines.pipeline_diffusion_gan import DiffusionGANPipeline
from safetensors.torch import load_file

import sadm
from sadm.checkpointing import list_checkpoints
from sadm.diffusion_gan import DiffusionGANConfig, build_adaptive_diffusion
from sadm.models.generator import GANGenerator
from sadm.models.timestep_discriminator import TimestepDiscriminator

TINY = ["--resolution", "8", "--train_batch_size", "2", "--latent_dim", "8", "--generator_base_channels", "8",
        "--disc_base_channels", "8", "--disc_num_layers", "2", "--validation_steps", "0", "--report_to", "none"]  # fmt: skip
# the networks for small data: residual D with minibatch std, two convolutions per generator resolution, EMA half-life
NEW_NETWORKS = ["--disc_trunk", "resnet", "--generator_layers_per_block", "2", "--ema_kimg", "0.01"]
# p moves at every D step (ada_interval 1, tiny ada_kimg, low target), so T changes within a few steps
MOVING_T = ["--diffusion_gan_ada_interval", "1", "--diffusion_gan_ada_kimg", "0.01", "--diffusion_gan_target", "-0.5",
            "--disc_learning_rate", "0.01"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_diffusion_gan", REPO / "scripts" / "train_diffusion_gan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_generator(num_classes=3, sample_size=8, channels=1):
    torch.manual_seed(0)
    return GANGenerator(
        out_channels=channels, sample_size=sample_size, latent_dim=8, base_channels=8, num_classes=num_classes
    )


# ------------------------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize("sample_size,num_classes,channels", [(4, None, 3), (8, 3, 1), (16, 2, 3)])
def test_generator_shapes_range_and_save_load(tmp_path, sample_size, num_classes, channels):
    model = tiny_generator(num_classes, sample_size, channels)
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1, 1]) if num_classes else None
    images = model(z, class_labels=labels).sample
    assert images.shape == (5, channels, sample_size, sample_size)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.05  # tanh range, not collapsed at init
    assert torch.equal(model(z, labels, return_dict=False)[0], images)
    model.save_pretrained(tmp_path)
    loaded = GANGenerator.from_pretrained(tmp_path)
    assert loaded.config.num_classes == num_classes and loaded.config.sample_size == sample_size
    assert torch.equal(loaded(z, class_labels=labels).sample, images)


def test_generator_class_changes_the_image():
    model = tiny_generator(num_classes=3)
    z = torch.randn(1, 8).repeat(3, 1)
    images = model(z, class_labels=torch.tensor([0, 1, 2])).sample
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])


def test_generator_layers_per_block_adds_same_size_blocks():
    one, two = tiny_generator(sample_size=16), None
    torch.manual_seed(0)
    two = GANGenerator(
        out_channels=1, sample_size=16, latent_dim=8, base_channels=8, num_classes=3, layers_per_block=2
    )
    assert len(one.blocks) == 3 and len(two.blocks) == 6  # resolutions 4, 8, 16
    assert [b.upsample for b in two.blocks] == [False, False, True, False, True, False]
    assert sum(p.numel() for p in two.parameters()) > sum(p.numel() for p in one.parameters())
    images = two(torch.randn(2, 8), class_labels=torch.tensor([0, 2])).sample
    assert images.shape == (2, 1, 16, 16) and images.std() > 0.05


def test_ema_decay_from_half_life():
    script = load_train_script()
    # StyleGAN2's 10 kimg at batch 32: 312.5 steps halve the weight of the current generator
    beta = script.ema_decay_from_half_life(10, total_batch=32)
    assert beta == pytest.approx(0.5 ** (32 / 10_000)) and beta**312.5 == pytest.approx(0.5)
    assert script.ema_decay_from_half_life(10, total_batch=64) < beta  # a bigger batch sees the images sooner
    with pytest.raises(ValueError, match="ema_kimg=0"):
        script.ema_decay_from_half_life(0, total_batch=32)


def test_generator_bad_arguments_raise():
    with pytest.raises(ValueError, match="sample_size=12"):
        GANGenerator(out_channels=1, sample_size=12)
    with pytest.raises(ValueError, match="base_channels=12"):
        GANGenerator(out_channels=1, sample_size=8, base_channels=12, norm_num_groups=8)
    with pytest.raises(ValueError, match="layers_per_block=0"):
        GANGenerator(out_channels=1, sample_size=8, layers_per_block=0)
    model = tiny_generator(num_classes=3)
    with pytest.raises(ValueError, match=r"z must have shape \[B, 8\]"):
        model(torch.randn(2, 4), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels must be given iff num_classes is set; num_classes=3"):
        model(torch.randn(2, 8))


# ------------------------------------------------------------------------------------------------------------- pipeline
def sample(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_pipeline_round_trip_through_diffusion_pipeline(tmp_path):
    pipe = DiffusionGANPipeline(gan=tiny_generator(num_classes=3).eval(), id2label={0: "zero", 1: "one", 2: "two"})
    expected = sample(pipe, class_labels=[2, 0, 1])
    drawn = sample(pipe, batch_size=4)  # labels drawn from the generator, then z
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["gan"] == ["sadm.models.generator", "GANGenerator"]  # resolved from sys.modules after `import sadm`
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is DiffusionGANPipeline and isinstance(loaded.gan, GANGenerator)
    assert loaded.config.id2label == {0: "zero", 1: "one", 2: "two"} and loaded.get_label_ids(["two"]) == [2]
    assert loaded.num_classes == 3
    np.testing.assert_array_equal(sample(loaded, class_labels=[2, 0, 1]), expected)
    np.testing.assert_array_equal(sample(loaded, batch_size=4), drawn)
    assert expected.shape == (3, 8, 8, 1) and 0 <= expected.min() and expected.max() <= 1
    pt = loaded(class_labels=[2, 0, 1], generator=torch.Generator().manual_seed(0), output_type="pt").images
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), expected)
    assert loaded(class_labels=[0, 1], output_type="pil").images[0].mode == "L"
    assert "DiffusionGANPipeline" in sadm.__all__ and "GANGenerator" in sadm.__all__


def test_pipeline_argument_errors():
    conditional = DiffusionGANPipeline(gan=tiny_generator(num_classes=3))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 2\]"):
        conditional(class_labels=[3])
    with pytest.raises(ValueError, match="guidance_scale=2.0"):
        conditional(class_labels=[0], guidance_scale=2.0)
    with pytest.raises(ValueError, match="output_type"):
        conditional(class_labels=[0], output_type="latent")
    unconditional = DiffusionGANPipeline(gan=tiny_generator(num_classes=None))
    assert unconditional.num_classes == 0 and sample(unconditional, batch_size=2).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(class_labels=[0])
    with pytest.raises(ValueError, match="id2label"):
        DiffusionGANPipeline(gan=tiny_generator(num_classes=None), id2label={0: "a"})


# ---------------------------------------------------------------------------------------------------- one G and D step
def test_one_discriminator_and_one_generator_step_change_every_trainable_parameter():
    script = load_train_script()
    torch.manual_seed(0)
    generator = tiny_generator(num_classes=2)
    discriminator = TimestepDiscriminator(
        in_channels=1, sample_size=8, base_channels=8, num_layers=2, num_classes=2, max_timesteps=1000
    )
    config = DiffusionGANConfig(r1_interval=1)  # R1 on this D step too
    diffusion = build_adaptive_diffusion(config)
    labels = torch.tensor([0, 1, 0, 1])
    x_real = torch.rand(4, 1, 8, 8) * 2 - 1
    g_before = {n: p.detach().clone() for n, p in generator.named_parameters()}
    d_before = {n: p.detach().clone() for n, p in discriminator.named_parameters()}
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    d_params = [p for p in discriminator.parameters() if p.requires_grad]
    d_optimizer = torch.optim.Adam(d_params, lr=1e-3, betas=(0.0, 0.99))

    # discriminator step: fakes detached, so G gets no gradient
    loss, stats, real_logits = script.discriminator_phase_loss(
        generator, discriminator, diffusion, x_real, torch.randn(4, 8), labels, config, d_step=0
    )
    loss.mean().backward()
    assert all(p.grad is None for p in generator.parameters())
    assert not np.isnan(stats["r1"]) and real_logits.shape == (4,) and not real_logits.requires_grad
    d_optimizer.step()
    d_optimizer.zero_grad(set_to_none=True)
    diffusion.update(real_logits)

    # generator step: D frozen, gradients reach G through the diffused fakes
    script.set_requires_grad(d_params, False)
    loss, stats = script.generator_phase_loss(generator, discriminator, diffusion, torch.randn(4, 8), labels, config)
    loss.mean().backward()
    assert all(p.grad is None for p in discriminator.parameters())
    g_optimizer.step()
    script.set_requires_grad(d_params, True)

    unchanged = [n for n, p in generator.named_parameters() if torch.equal(p, g_before[n])]
    unchanged += [n for n, p in discriminator.named_parameters() if torch.equal(p, d_before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert all(p.requires_grad for p in discriminator.parameters())


# ------------------------------------------------------------------------------------------------------------- script
def test_smoke_run_exports_pipeline_discriminator_and_T_plot(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_script(
        "train_diffusion_gan.py", *TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out),
        "--max_train_steps", "3", "--checkpointing_steps", "2", "--use_ema", "--validation_steps", "2",
        "--num_validation_images", "4", "--report_to", "tensorboard",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for monitor in ("g_loss=", "d_loss=", "r_d=", "p=", "T=", "d_real_acc=", "d_fake_logit_mean="):
        assert monitor in result.stderr  # the tqdm postfix
    # 3 steps x batch 2 over ada_kimg 100: p cannot move, and the run says so (naming the flags and the numbers)
    assert "--max_train_steps 3 x 1 D step(s) x batch 2 with --diffusion_gan_ada_kimg 100" in result.stderr
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, DiffusionGANPipeline) and pipe.config.id2label == {0: "a", 1: "b"}
    assert pipe(class_labels=[0, 1, 1], output_type="np").images.shape == (3, 8, 8, 1)
    discriminator = TimestepDiscriminator.from_pretrained(out / "discriminator")
    assert discriminator.config.num_classes == 2 and discriminator.config.t_conditioning
    assert (out / "pipeline.py").exists() and "train_diffusion_gan.py" in (out / "README.md").read_text()
    assert (out / "T.png").stat().st_size > 0 and json.loads((out / "T_history.json").read_text())[0][0] == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "adaptive_diffusion.pt").exists() and (checkpoint / "discriminator").is_dir()
    assert (out / "validation" / "step-0000002.png").exists() and any((out / "logs").rglob("events.out.tfevents*"))
    # the export holds the EMA weights
    ema = load_file(str(checkpoint / "generator_ema" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(out / "gan" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in exported)


@pytest.mark.parametrize("networks", [[], NEW_NETWORKS], ids=["conv", "resnet_ema_kimg"])
def test_resume_equals_an_uninterrupted_run(tmp_path, data_dir, networks):
    # 2 D steps per G step, 2 micro-batches per optimizer step, 4 batches per epoch: a 3-slot cycle straddles epochs
    # and the step-3 checkpoint falls mid-epoch
    common = [*TINY, *MOVING_T, "--train_data_dir", str(data_dir), "--gradient_accumulation_steps", "2",
              "--diffusion_gan_disc_update_ratio", "2", "--diffusion_gan_r1_interval", "2", "--use_ema",
              "--random_flip", "--checkpointing_steps", "3", *networks]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # launch=False: a plain single-process run, the same code path as one `accelerate launch` CPU process
    first = run_script(
        "train_diffusion_gan.py", *common, "--output_dir", str(straight), "--max_train_steps", "6", launch=False
    )
    assert first.returncode == 0, first.stderr[-3000:]
    # the run interrupted after step 3 is the same run's checkpoint-3: resume from a copy of it
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    second = run_script(
        "train_diffusion_gan.py", *common, "--output_dir", str(resumed), "--max_train_steps", "6",
        "--resume_from_checkpoint", "latest", launch=False,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout + second.stderr
    for folder in ("gan", "discriminator", "checkpoint-6/generator", "checkpoint-6/generator_ema"):
        a = load_file(str(straight / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(resumed / folder / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {folder} weights differ from the uninterrupted run"
    a = torch.load(straight / "checkpoint-6" / "adaptive_diffusion.pt", weights_only=True)["_extra_state"]
    b = torch.load(resumed / "checkpoint-6" / "adaptive_diffusion.pt", weights_only=True)["_extra_state"]
    assert (a["p"], a["T"], a["r_d"], a["num_updates"]) == (b["p"], b["T"], b["r_d"], b["num_updates"])
    assert torch.equal(a["timestep_table"], b["timestep_table"])
    history = json.loads((straight / "T_history.json").read_text())
    assert history == json.loads((resumed / "T_history.json").read_text())
    assert len({T for _, _, T, _ in history}) > 1, "T never moved: the test would not cover the adaptive state"
    # the export holds the EMA generator, which is not the raw one
    ema = load_file(str(straight / "checkpoint-6" / "generator_ema" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(straight / "checkpoint-6" / "generator" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(straight / "gan" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in exported)
    assert not all(torch.equal(raw[k], exported[k]) for k in exported)
    if networks:  # --ema_kimg 0.01 at a total batch of 4: decay 0.5^(4/10) per step, saved with the EMA
        ema_config = json.loads((straight / "checkpoint-6" / "generator_ema" / "config.json").read_text())
        assert ema_config["decay"] == pytest.approx(0.5 ** (4 / 10)) and not ema_config["use_ema_warmup"]
        assert TimestepDiscriminator.from_pretrained(straight / "discriminator").config.trunk == "resnet"
        assert GANGenerator.from_pretrained(straight / "gan").config.layers_per_block == 2


def test_bad_flags_stop_before_training(tmp_path, capsys):
    script = load_train_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--resolution", "12", "--output_dir", str(tmp_path / "o")])
    assert "--resolution must be a power of two >= 4 for the generator, got 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--diffusion_gan_t_min", "0", "--output_dir", str(tmp_path / "o")])
    assert "t_min=0 must be >= 1" in capsys.readouterr().err
    args = script.parse_args(["--diffusion_gan_preset", "insgen", "--diffusion_gan_t_max", "200", "--diffusion", "fixed",
                              "--no-diffusion_gan_class_conditional_disc", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    config = script.diffusion_gan_config(args)
    assert (config.t_max, config.ts_dist, config.mode, config.class_conditional_disc) == (
        200,
        "uniform",
        "fixed",
        False,
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ema_kimg", "0"], "--ema_kimg (the EMA half-life in kimg) must be > 0, got 0.0"),
        (["--ema_kimg", "-2"], "--ema_kimg (the EMA half-life in kimg) must be > 0, got -2.0"),
        (["--ema_kimg", "10", "--no-use_ema"], "--ema_kimg sets the EMA half-life and needs --use_ema"),
        (
            ["--disc_trunk", "resnet", "--resolution", "4"],
            "--disc_trunk resnet halves the image down to 4x4 and needs --resolution >= 8, got 4",
        ),  # fmt: skip
        (["--disc_minibatch_std_group_size", "0"], "--disc_minibatch_std_group_size must be >= 1, got 0"),
        (["--generator_layers_per_block", "0"], "--generator_layers_per_block must be >= 1, got 0"),
        (["--diffusion_gan_ada_kimg", "0"], "--diffusion_gan_ada_kimg: ada_kimg=0.0 must be > 0"),
        (["--diffusion_gan_ada_kimg", "-1"], "--diffusion_gan_ada_kimg: ada_kimg=-1.0 must be > 0"),
        (["--diffusion_gan_target", "1.5"], "--diffusion_gan_target: target=1.5 must be in (-1, 1)"),
        (["--diffusion_gan_target", "-1"], "--diffusion_gan_target: target=-1.0 must be in (-1, 1)"),
        (["--diffusion_gan_r1_interval", "0"], "--diffusion_gan_r1_interval: r1_interval=0 must be >= 1"),
        (["--diffusion", "sometimes"], "--diffusion: mode 'sometimes' is not one of"),
    ],
)
def test_bad_diffusion_gan_flags_name_the_flag(tmp_path, capsys, flags, message):
    script = load_train_script()
    with pytest.raises(SystemExit):
        script.parse_args([*flags, "--output_dir", str(tmp_path / "o")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_warning_when_the_budget_cannot_move_p():
    script = load_train_script()
    config = DiffusionGANConfig(ada_kimg=100, disc_update_ratio=1)
    # 300 D steps x batch 32 over ada_kimg 100: p can move by 0.096 at most
    message = script.p_budget_warning(config, total_batch=32, max_train_steps=300)
    assert message is not None
    for part in ("--max_train_steps 300", "--diffusion_gan_ada_kimg 100", "0.096", "batch 32"):
        assert part in message, (part, message)
    # a long enough budget, or a second D step per generator step, moves p by more than 0.1: no warning
    assert script.p_budget_warning(config, total_batch=32, max_train_steps=1500) is None
    two_d_steps = DiffusionGANConfig(ada_kimg=100, disc_update_ratio=2)
    assert script.p_budget_warning(two_d_steps, total_batch=32, max_train_steps=300) is None
    # p does not adapt in the ablations: nothing to warn about
    assert script.p_budget_warning(DiffusionGANConfig(mode="fixed"), total_batch=2, max_train_steps=1) is None
