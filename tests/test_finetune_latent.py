"""Fine-tuning a pretrained DiT in the diffusers layout, on VAE latents: the tiny `facebook/DiT-XL-2-256` replica of
tests/helpers.py, the latent cache and its flips, the discriminators on decoded pixels, and every bad-input error."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel
from helpers import run_script, write_class_folder, write_dit_replica
from PIL import Image
from safetensors.torch import load_file

import sadm  # registers SADMDiTPipeline on diffusers
from sadm.data import DataConfig, load_train_dataset
from sadm.diffusion_gan import DiffusionGANConfig, build_adaptive_diffusion, diffusion_gan_generator_loss
from sadm.latents import (
    build_latent_cache,
    check_noise_schedule,
    check_transformer_fits_latents,
    check_vae_fits,
    decode_latents,
    encode_moments,
    load_latent_cache,
    load_vae,
    pretrained_components,
    sample_latents,
)
from sadm.losses import predict_x0
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.models.timestep_discriminator import TimestepDiscriminator
from sadm.structure import StructureConfig, structure_denoiser_loss, structure_inputs

COMMON = ["--resolution", "16", "--train_batch_size", "4", "--report_to", "none", "--validation_steps", "0"]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return write_dit_replica(tmp_path_factory.mktemp("dit") / "DiT-XL-2-256-tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # integer class names keep their ids: the data's labels fit the pretrained 1000-class table
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("0", "207", "999"), per_class=3, size=16)


def weights(folder, sub="transformer"):
    return load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))


def test_finetune_replica_exports_a_latent_pipeline_that_dit_pipeline_loads(tmp_path, replica, data_dir):
    out = tmp_path / "run"
    result = run_script(
        "train_sadm.py", *COMMON, "--pretrained_model_name_or_path", str(replica), "--train_data_dir", str(data_dir),
        "--output_dir", str(out), "--max_train_steps", "2", "--random_flip", "--disc_input", "pixel",
        "--structure_loss_weight", "0.05", "--structure_warmup_steps", "0", "--structure_t_threshold", "1000",
        "--gan_loss_weight", "0.05",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "SADMDiTPipeline" and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.transformer.config.out_channels == 8 and pipe.transformer.config.num_embeds_ada_norm == 1000
    images = pipe(class_labels=[0, 999], num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    # fine-tuned: the transformer moved, the frozen VAE is exported unchanged
    before, after = weights(replica), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    vae_before, vae_after = weights(replica, "vae"), weights(out, "vae")
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    # the discriminators judged decoded 16x16 RGB images, not 4x8x8 latents
    for sub in ("discriminator", "timestep_discriminator"):
        config = json.loads((out / sub / "config.json").read_text())
        assert (config["in_channels"], config["sample_size"]) == (3, 16)
    # diffusers' own DiTPipeline with another scheduler built from the export's (it drops the learned σ)
    dit = DiTPipeline.from_pretrained(out, scheduler=DDIMScheduler.from_pretrained(out, subfolder="scheduler"))
    generator = torch.Generator().manual_seed(0)
    images = dit(class_labels=[0, 999], num_inference_steps=2, guidance_scale=4.0, generator=generator).images
    assert len(images) == 2 and images[0].size == (16, 16)


def test_dit_pipeline_samples_a_learned_sigma_export_as_it_is(tmp_path, replica, data_dir):
    # the export saves a fixed-variance DDPMScheduler: DiTPipeline drops the σ channels and steps it, while
    # SADMDiTPipeline reads the learned σ off the transformer (8 = 2 x 4 output channels) and steps "learned_range"
    out = tmp_path / "run"
    result = run_script(
        "train_sadm.py", *COMMON, "--pretrained_model_name_or_path", str(replica), "--train_data_dir", str(data_dir),
        "--output_dir", str(out), "--max_train_steps", "1", "--structure_loss_weight", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "fixed_small"
    images = DiTPipeline.from_pretrained(out)(class_labels=[0], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()  # guidance 4 (its default): null class 1000
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.transformer.config.out_channels == 8 and type(pipe.scheduler).__name__ == "DDPMScheduler"
    learned = type(pipe.scheduler).from_config(pipe.scheduler.config, variance_type="learned_range")
    expected = sadm.SADMDiTPipeline(pipe.transformer, learned, pipe.vae, pipe.config.id2label)

    def draw(p):
        return p(class_labels=[0, 999], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images

    assert [np.asarray(a).tobytes() for a in draw(pipe)] == [np.asarray(b).tobytes() for b in draw(expected)]
    assert "DiTPipeline.from_pretrained('" in (out / "README.md").read_text()


def logged(folder, tag="loss_dsm") -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in (folder / "logs").rglob("events.out.tfevents*"):  # one file holds the scalars, one the hparams
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            return [event.value for event in accumulator.Scalars(tag)]
    raise AssertionError(f"no {tag} logged under {folder}")


@pytest.mark.slow
def test_cached_latents_train_as_uncached_and_resume_exactly(tmp_path, replica, data_dir):
    common = [*COMMON, "--pretrained_model_name_or_path", str(replica), "--train_data_dir", str(data_dir),
              "--random_flip", "--no-use_ema", "--checkpointing_steps", "2", "--report_to", "tensorboard",
              "--logging_steps", "1"]  # fmt: skip
    runs = {
        "uncached": [*common, "--max_train_steps", "4"],
        "cached": [*common, "--cache_latents", "--max_train_steps", "4"],
        "resumed": [*common, "--cache_latents", "--max_train_steps", "2"],
    }
    for name, args in runs.items():
        result = run_script("train_sadm.py", *args, "--output_dir", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
    result = run_script(
        "train_sadm.py", *runs["resumed"][:-1], "4", "--resume_from_checkpoint", "latest",
        "--output_dir", str(tmp_path / "resumed"),
    )  # fmt: skip
    assert result.returncode == 0 and "Resuming from" in result.stdout + result.stderr, result.stderr[-3000:]
    (folder,) = (tmp_path / "cached" / "latent_cache").glob("latents-*")  # one process: one finished shard
    assert [p.suffix for p in sorted(folder.iterdir())] == [".json", ".npy"]
    cached, resumed = weights(tmp_path / "cached"), weights(tmp_path / "resumed")
    assert all(torch.equal(cached[k], resumed[k]) for k in cached), "a resumed cached run differs"
    # the same flips and posterior noise at every step: the same losses, up to the VAE's batch-size-dependent float
    # rounding (a wrong flip or another noise draw changes the latents, hence the loss, by far more than 1e-4)
    uncached_losses, cached_losses = logged(tmp_path / "uncached"), logged(tmp_path / "cached")
    assert len(uncached_losses) == 4 and len(set(uncached_losses)) == 4
    np.testing.assert_allclose(cached_losses, uncached_losses, rtol=1e-4)


def test_latent_cache_replays_flips_and_holds_the_flipped_images_moments(tmp_path, replica, data_dir):
    images = load_train_dataset(DataConfig(train_data_dir=str(data_dir), resolution=16, random_flip=True))
    images.augment_seed = 3
    vae, source = load_vae(None, str(replica), pretrained_components(str(replica)))
    path = build_latent_cache(images, vae, tmp_path / "cache", batch_size=4, disable_progress=True)
    cache = load_latent_cache(path, images)
    assert len(cache) == len(images) == 9 and path.is_dir() and len(list(path.glob("shard-*.npy"))) == 1
    flips = []
    for key in range(2 * len(images)):  # two epochs of sampler keys
        expected = encode_moments(vae, images[key]["pixel_values"][None])[0]  # the uncached path, flips included
        item = cache[key]
        assert torch.allclose(item["latent_moments"], expected, atol=1e-5), key
        assert item["class_labels"] == images[key]["class_labels"]
        flips.append(images.draw_flip(key))
    assert 0 < sum(flips) < len(flips)  # both branches are exercised
    flipped = flips.index(True)
    plain = encode_moments(vae, images.pixels(flipped % len(images))[None])[0]
    assert not torch.allclose(plain, cache[flipped]["latent_moments"], atol=1e-3)  # the flip matters
    # reused as is; other settings get another file
    assert build_latent_cache(images, vae, tmp_path / "cache", disable_progress=True) == path
    other = load_train_dataset(
        DataConfig(train_data_dir=str(data_dir), resolution=16, random_flip=True, center_crop=True)
    )
    assert build_latent_cache(other, vae, tmp_path / "cache", disable_progress=True) != path


def test_latent_cache_refuses_random_crops(tmp_path, replica):
    data = write_class_folder(tmp_path / "wide", classes=("0",), per_class=1, size=16)
    Image.new("RGB", (24, 16)).save(data / "0" / "wide.png")
    images = load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16))
    vae, _ = load_vae(None, str(replica), pretrained_components(str(replica)))
    with pytest.raises(ValueError, match=r"wide\.png is 24x16 after resizing.*--center_crop"):
        build_latent_cache(images, vae, tmp_path / "cache", disable_progress=True)


def test_sample_latents_is_the_scaled_posterior_sample():
    moments = torch.randn(2, 8, 3, 3)
    mean, logvar = moments.chunk(2, dim=1)
    expected = 0.5 * (
        mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    )
    torch.testing.assert_close(sample_latents(moments, 0.5, torch.Generator().manual_seed(1)), expected)


@pytest.mark.parametrize("term", ["structure", "gan"])
def test_discriminator_on_decoded_pixels_sends_gradients_into_the_denoiser(replica, term):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel.from_pretrained(replica, subfolder="transformer")
    vae, _ = load_vae(None, str(replica), pretrained_components(str(replica)))
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    x0 = sample_latents(torch.randn(4, 8, 8, 8), vae.config.scaling_factor)  # [4, 4, 8, 8] latents
    timesteps = torch.tensor([10, 20, 30, 40])
    noise = torch.randn_like(x0)
    a = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = transformer(x_t, timestep=timesteps, class_labels=torch.tensor([0, 1, 2, 3])).sample[:, :4]
    x0_hat = predict_x0(eps, x_t, timesteps, alphas_cumprod, "epsilon")
    with torch.no_grad():
        real = decode_latents(vae, x0)
    fake = decode_latents(vae, x0_hat)  # [4, 3, 16, 16]
    assert fake.shape == real.shape == (4, 3, 16, 16) and fake.requires_grad
    if term == "structure":  # the discriminators are frozen in the denoiser step, as in the script
        disc = StructureDiscriminator(in_channels=3, sample_size=16, embed_dim=16, base_channels=8)
        config = StructureConfig(weight=1.0, t_threshold=1000, warmup_steps=0)
        loss, _ = structure_denoiser_loss(
            disc.requires_grad_(False), structure_inputs(real, fake, timesteps, alphas_cumprod, config), config
        )
    else:
        disc = TimestepDiscriminator(in_channels=3, sample_size=16, base_channels=8, num_layers=2, embed_dim=16)
        config = DiffusionGANConfig(weight=1.0)
        diffusion = build_adaptive_diffusion(config)
        loss, _ = diffusion_gan_generator_loss(disc.requires_grad_(False), diffusion, fake, None, config)
    loss.mean().backward()
    grads = [p.grad for p in transformer.parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in vae.parameters())  # the decoder is frozen
    assert all(p.grad is None for p in disc.parameters())


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("component", ["transformer", "vae", "scheduler"])
def test_missing_component_is_named(tmp_path, component):
    folder = write_dit_replica(tmp_path / "broken", drop=(component,))
    with pytest.raises(ValueError, match=rf"has no {component}/ component.*{component}/"):
        pretrained_components(str(folder))


def test_transformer_that_does_not_fit_the_vae_latents_is_named(tmp_path, replica):
    vae, source = load_vae(None, str(replica), pretrained_components(str(replica)))
    transformer = DiTTransformer2DModel.from_pretrained(replica, subfolder="transformer")
    with pytest.raises(
        ValueError, match=r"sample_size=8 but the VAE .*vae.*downsampling 2x: --resolution 32 -> 16x16"
    ):
        check_transformer_fits_latents(transformer, vae, source, 32, "replica/transformer")
    eight = AutoencoderKL.from_config({**vae.config, "latent_channels": 8})
    with pytest.raises(ValueError, match=r"in_channels=4 but the VAE other .*latent_channels=8"):
        check_transformer_fits_latents(transformer, eight, "other", 16, "replica/transformer")
    with pytest.raises(ValueError, match=r"encodes 3-channel images but the data has 1 channel.*--num_channels 3"):
        check_vae_fits(vae, source, 16, 1)
    with pytest.raises(ValueError, match=r"--resolution 15 is not divisible by the VAE's downsampling factor 2"):
        check_vae_fits(vae, source, 15, 3)
    with pytest.raises(ValueError, match=r"scheduler was trained with num_train_timesteps=1000 but .*=500"):
        check_noise_schedule(str(replica), 500)
    check_noise_schedule(str(replica), 1000)


def test_script_stops_on_a_resolution_the_pretrained_dit_does_not_fit(tmp_path, replica, data_dir):
    out = tmp_path / "run"
    result = run_script(
        "train_sadm.py", *COMMON[2:], "--resolution", "32", "--pretrained_model_name_or_path", str(replica),
        "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "1",
    )  # fmt: skip
    assert result.returncode != 0
    assert "transformer has sample_size=8" in result.stderr and "--resolution 32 -> 16x16 latents" in result.stderr
    assert not list(out.glob("checkpoint-*"))


def test_small_images_are_upscaled_with_a_warning_or_refused(tmp_path):
    data = write_class_folder(tmp_path / "small", classes=("a",), per_class=2, size=8)
    with pytest.warns(UserWarning, match=r"2 image\(s\) are smaller than --resolution 16 .*8x8.*upscaled"):
        dataset = load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16))
    assert dataset[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"smaller than --resolution 16, e\.g\. .*0\.png is 8x8.*--small_images"):
        load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16, small_images="refuse"))


def test_vae_from_its_own_folder_a_pipeline_folder_or_nowhere(tmp_path, replica):
    vae, source = load_vae(str(replica / "vae"), None, {})  # a VAE folder
    assert isinstance(vae, AutoencoderKL) and source == str(replica / "vae") and not vae.training
    assert all(not p.requires_grad for p in vae.parameters())
    vae, source = load_vae(str(replica), None, {})  # a pipeline folder with a vae/
    assert source == str(replica / "vae")
    assert load_vae(None, None, {}) == (None, None)  # pixel space
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--vae_name_or_path .*empty has neither a config\.json nor a vae/config"):
        load_vae(str(tmp_path / "empty"), None, {})
    AutoencoderKL.from_config({**vae.config, "shift_factor": 0.1159}).save_pretrained(tmp_path / "shifted")
    with pytest.raises(ValueError, match=r"shift_factor=0\.1159"):
        load_vae(str(tmp_path / "shifted"), None, {})


def test_script_refuses_latent_options_that_cannot_work(tmp_path, replica, data_dir):
    result = run_script(
        "train_sadm.py", *COMMON, "--train_data_dir", str(data_dir), "--output_dir", str(tmp_path / "o"),
        "--cache_latents", launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "--cache_latents needs a VAE" in result.stderr
    # a preset trained from scratch on latents: its patch size must divide the latent size
    result = run_script(
        "train_sadm.py", *COMMON[2:], "--resolution", "10", "--model", "tiny", "--vae_name_or_path",
        str(replica / "vae"), "--train_data_dir", str(data_dir), "--output_dir", str(tmp_path / "o2"), launch=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--model tiny has patch size 2, which does not divide the 5x5 latents" in result.stderr


@pytest.mark.slow
def test_two_processes_build_one_shard_each_and_train_on_both(tmp_path, replica):
    import os
    import subprocess
    import sys

    from helpers import REPO

    data = write_class_folder(tmp_path / "data", classes=("0", "207", "999"), per_class=12, size=16)  # 2 batches of 32
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "scripts" / "train_sadm.py"), *COMMON, "--pretrained_model_name_or_path", str(replica),
           "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "2", "--cache_latents",
           "--latent_cache_dtype", "bfloat16", "--structure_loss_weight", "0", "--random_flip"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-4000:]
    (folder,) = (out / "latent_cache").glob("latents-*")
    manifests = [json.loads(p.read_text()) for p in sorted(folder.glob("shard-*.json"))]
    assert [(m["start"], m["stop"], m["dtype"]) for m in manifests] == [(0, 32, "bfloat16"), (32, 36, "bfloat16")]
    assert len(list((out / "image_scan").glob("image-scan-*.json"))) == 1  # scanned by the main process only
    images = load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16, random_flip=True))
    vae, _ = load_vae(None, str(replica), pretrained_components(str(replica)))
    alone = build_latent_cache(images, vae, tmp_path / "alone", disable_progress=True, dtype="bfloat16")
    both, one = load_latent_cache(folder, images), load_latent_cache(alone, images)
    assert all(torch.equal(both[key]["latent_moments"], one[key]["latent_moments"]) for key in range(len(images)))
