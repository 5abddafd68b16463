"""Drifts between the two training scripts that their shared frame (sadm/frame.py, sadm/terms.py) removed:

(a) a skipped (non-finite) timestep-discriminator step does not feed `AdaptiveDiffusion.update`, in both scripts;
(b) train_sadm.py's timestep discriminator has the t-table of the config (`t_max`) and no t under `mode none`;
(c) `--*disc_spectral_norm` of the timestep discriminator has one default in both scripts and reaches it;
(d) both scripts log the effective method configs to the tracker.
"""

import importlib.util
import json

import pytest
import torch
import yaml
from helpers import REPO, run_script, write_class_folder

from sadm.diffusion_gan import DiffusionGANConfig

COMMON = [
    "--resolution", "8", "--validation_steps", "0", "--no-use_ema", "--lr_warmup_steps", "0", "--max_train_steps", "2",
    "--checkpointing_steps", "2", "--train_batch_size", "4",
]  # fmt: skip
# R1 γ = 3e38: γ/2·interval overflows float32, so every discriminator step of the GAN term has an infinite loss
NON_FINITE_GAN_DISC = ["--diffusion_gan_r1_gamma", "3e38", "--diffusion_gan_r1_interval", "1", "--max_bad_steps", "10"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


def train(script: str, out, data_dir, *flags: str):
    result = run_script(script, *COMMON, "--train_data_dir", str(data_dir), "--output_dir", str(out), *flags,
                        launch=False, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged_config(out) -> dict:
    (path,) = out.glob("logs/**/hparams.yml")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def sadm_gan_run(tmp_path_factory, data_dir):
    """train_sadm.py with the Diffusion-GAN term whose every discriminator step is non-finite, logged to TensorBoard."""
    out = tmp_path_factory.mktemp("sadm_gan")
    train("train_sadm.py", out, data_dir, "--gan_loss_weight", "0.05", "--gan_timestep_weighting", "none",
          "--report_to", "tensorboard", *NON_FINITE_GAN_DISC)  # fmt: skip
    return out


def test_a_skipped_gan_discriminator_step_does_not_update_the_adaptive_diffusion(sadm_gan_run):
    state = json.loads((sadm_gan_run / "checkpoint-2" / "train_state.json").read_text())
    assert state["bad_steps"]["total"] == {"transformer": 0, "timestep_discriminator": 2}  # both D steps skipped
    diffusion = torch.load(sadm_gan_run / "timestep_discriminator" / "adaptive_diffusion.pt", weights_only=True)
    # as train_diffusion_gan.py: the r_d of a skipped step is not used
    assert diffusion["_extra_state"]["num_updates"] == 0


def test_a_the_gan_trainer_skips_the_update_as_well(tmp_path, data_dir):
    train("train_diffusion_gan.py", tmp_path, data_dir, "--report_to", "none", *NON_FINITE_GAN_DISC)
    state = torch.load(tmp_path / "checkpoint-2" / "adaptive_diffusion.pt", weights_only=True)
    assert state["_extra_state"]["num_updates"] == 0


def test_b_timestep_discriminator_follows_the_diffusion_gan_config(tmp_path, data_dir):
    train("train_sadm.py", tmp_path, data_dir, "--report_to", "none", "--gan_loss_weight", "0.05",
          "--diffusion_gan_mode", "none", "--diffusion_gan_t_max", "500")  # fmt: skip
    config = json.loads((tmp_path / "timestep_discriminator" / "config.json").read_text())
    assert config["t_conditioning"] is False  # mode none: t is always 0, as in train_diffusion_gan.py
    assert config["max_timesteps"] == 500  # the t-table of the config's T_max


def test_c_spectral_norm_flags_reach_their_discriminators(tmp_path, data_dir):
    train("train_sadm.py", tmp_path, data_dir, "--report_to", "none", "--gan_loss_weight", "0.05",
          "--gan_disc_spectral_norm", "--structure_loss_weight", "0.05", "--no-structure_disc_spectral_norm")  # fmt: skip
    assert json.loads((tmp_path / "timestep_discriminator" / "config.json").read_text())["spectral_norm"] is True
    assert json.loads((tmp_path / "discriminator" / "config.json").read_text())["spectral_norm"] is False


def test_c_timestep_discriminator_spectral_norm_has_one_default(tmp_path):
    sadm_args = load_script("train_sadm").parse_args(["--output_dir", str(tmp_path)])
    gan_args = load_script("train_diffusion_gan").parse_args(["--output_dir", str(tmp_path)])
    assert sadm_args.gan_disc_spectral_norm is gan_args.disc_spectral_norm is False
    assert sadm_args.structure_disc_spectral_norm is True  # the structure encoder's own flag (spectral norm on)


def test_d_both_scripts_log_the_effective_method_configs(sadm_gan_run, tmp_path, data_dir):
    logged = logged_config(sadm_gan_run)
    assert logged["diffusion_gan.weight"] == 0.05 and logged["diffusion_gan.timestep_weighting"] == "none"
    assert logged["diffusion_gan.t_max"] == DiffusionGANConfig().t_max  # resolved from the preset
    assert logged["structure.weight"] == 0.0 and logged["structure.distance"] == "kl"
    train("train_diffusion_gan.py", tmp_path, data_dir, "--report_to", "tensorboard", "--max_train_steps", "1")
    assert logged_config(tmp_path)["diffusion_gan.t_max"] == DiffusionGANConfig().t_max
