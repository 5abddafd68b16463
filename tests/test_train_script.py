"""The training script as users run it: `accelerate launch scripts/train_sadm.py ...` in a subprocess."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import run_script, write_class_folder
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline
from safetensors.torch import load_file

from sadm.checkpointing import list_checkpoints

TINY = [
    "--model",
    "tiny",
    "--resolution",
    "8",
    "--train_batch_size",
    "2",
    "--validation_steps",
    "0",
    "--report_to",
    "none",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


def weights(folder, sub="transformer"):
    return load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))


def test_smoke_run_exports_a_loadable_pipeline(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "3",
        "--checkpointing_steps", "2", "--use_ema", "--validation_steps", "2", "--num_validation_images", "4",
        "--num_inference_steps", "2", "--report_to", "tensorboard",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, SADMDiTPipeline)
    assert pipe.config.id2label == {0: "a", 1: "b"} and pipe.transformer.config.num_embeds_ada_norm == 2
    assert pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 1)
    assert (out / "pipeline.py").exists() and "train_sadm.py" in (out / "README.md").read_text()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert (out / "validation" / "step-0000002.png").exists()
    assert any((out / "logs").rglob("events.out.tfevents*"))
    state = json.loads((out / "checkpoint-3" / "train_state.json").read_text())
    assert state["global_step"] == 3
    # the export holds the EMA weights, the checkpoint both
    ema = load_file(str(out / "checkpoint-3" / "transformer_ema" / "diffusion_pytorch_model.safetensors"))
    exported = weights(out)
    assert all(torch.equal(ema[k], exported[k]) for k in exported)


SADM_AND_GAN = ["--structure_loss_weight", "0.05", "--structure_warmup_steps", "0", "--structure_t_threshold", "1000",
                "--gan_loss_weight", "0.05"]  # fmt: skip
# the consistent SADM options: reverse-step samples and re-noising (their own noise draws), adaptive λ
SADM_MMD = ["--structure_loss_weight", "10", "--structure_formulation", "mmd", "--structure_timestep_weighting", "none",
            "--structure_reverse_step", "5", "--structure_renoise_offset", "10", "--structure_grad_ratio", "0.1",
            "--structure_min_active", "2", "--structure_warmup_steps", "0"]  # fmt: skip


@pytest.mark.parametrize(
    "terms",
    [
        ["--structure_loss_weight", "0"],  # plain DSM
        SADM_AND_GAN,
        [*SADM_AND_GAN, "--per_sample_noise"],  # draws seeded per (seed, epoch, sample index, stream)
        SADM_MMD,
        [*SADM_MMD, "--per_sample_noise"],
    ],
    ids=["dsm", "sadm+gan", "sadm+gan_per_sample_noise", "sadm_mmd", "sadm_mmd_per_sample_noise"],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, data_dir, terms):
    common = [*terms, *TINY, "--train_data_dir", str(data_dir), "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3",
              "--use_ema", "--learn_sigma", "--random_flip", "--checkpoints_total_limit", "1"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (
        run_script("train_sadm.py", *common, "--output_dir", str(straight), "--max_train_steps", "6").returncode == 0
    )
    first = run_script("train_sadm.py", *common, "--output_dir", str(resumed), "--max_train_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(
        "train_sadm.py",
        *common,
        "--output_dir",
        str(resumed),
        "--max_train_steps",
        "6",
        "--resume_from_checkpoint",
        "latest",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout + second.stderr
    subs = ["transformer"] + (["discriminator"] if "--structure_formulation" in terms else [])
    subs += ["discriminator", "timestep_discriminator"] if "--gan_loss_weight" in terms else []
    for sub in subs:
        a, b = weights(straight, sub), weights(resumed, sub)
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {sub} differs from the uninterrupted run"
    if "--gan_loss_weight" in terms:  # the adaptive diffusion state (p, T, t-table, RNG) too
        a, b = (
            torch.load(d / "timestep_discriminator" / "adaptive_diffusion.pt", weights_only=True)
            for d in (straight, resumed)
        )
        assert a.keys() == b.keys() and repr(a) == repr(b)
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-6"]  # total limit 1 pruned checkpoint-3


def test_refuses_a_non_empty_output_dir(tmp_path, data_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "1"
    )
    assert result.returncode != 0 and "--output_dir" in result.stderr and "not empty" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_flags_stop_before_training(tmp_path, data_dir):
    result = run_script(
        "train_sadm.py", *TINY[:2], "--resolution", "9", "--output_dir", str(tmp_path / "o"), launch=False
    )
    assert result.returncode != 0 and "not divisible by the patch size 2" in result.stderr
    result = run_script(
        "train_sadm.py",
        *TINY,
        "--train_data_dir",
        str(tmp_path / "nowhere"),
        "--output_dir",
        str(tmp_path / "o2"),
        launch=False,
    )
    assert result.returncode != 0 and "nowhere" in result.stderr
    # the active sub-batch of 'mmd' can never reach --structure_min_active 4 with batches of 2
    result = run_script(
        "train_sadm.py", *TINY, "--structure_loss_weight", "1", "--structure_formulation", "mmd",
        "--structure_timestep_weighting", "none", "--output_dir", str(tmp_path / "o3"), launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "--structure_min_active 4" in result.stderr
    result = run_script(
        "train_sadm.py", *TINY, "--structure_loss_weight", "1", "--structure_formulation", "mmd",
        "--structure_distance", "kl", "--output_dir", str(tmp_path / "o4"), launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "unpaired" in result.stderr
    result = run_script(
        "train_sadm.py", *TINY, "--structure_loss_weight", "1", "--structure_renoise_offset", "950",
        "--output_dir", str(tmp_path / "o5"), launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "no room below T=1000" in result.stderr


def test_sample_script_writes_pngs_npz_and_grid(tmp_path, data_dir):
    pipe_dir = tmp_path / "pipe"
    assert (
        run_script(
            "train_sadm.py",
            *TINY,
            "--train_data_dir",
            str(data_dir),
            "--output_dir",
            str(pipe_dir),
            "--max_train_steps",
            "1",
        ).returncode
        == 0
    )
    out = tmp_path / "samples"
    result = run_script(
        "sample.py", "--pipeline", str(pipe_dir), "--output_dir", str(out), "--num_per_class", "3", "--grid",
        "--num_inference_steps", "2", "--batch_size", "4", launch=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(list(out.glob("*_class1.png"))) == 3 and (out / "grid.png").exists()


def test_fine_tune_an_export_with_sadm_and_a_warm_started_discriminator(tmp_path, data_dir):
    base, tuned, again = tmp_path / "base", tmp_path / "tuned", tmp_path / "again"
    data = [*TINY, "--train_data_dir", str(data_dir), "--max_train_steps", "2"]
    assert (
        run_script("train_sadm.py", *data, "--structure_loss_weight", "0", "--output_dir", str(base)).returncode == 0
    )
    sadm_flags = [
        "--structure_loss_weight",
        "0.05",
        "--structure_warmup_steps",
        "0",
        "--structure_t_threshold",
        "1000",
    ]
    result = run_script(
        "train_sadm.py", *data, *sadm_flags, "--pretrained_model_name_or_path", str(base), "--output_dir", str(tuned),
        "--learning_rate", "1e-3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(base), weights(tuned)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # same architecture, trained further
    from sadm.models.structure_discriminator import StructureDiscriminator

    disc = StructureDiscriminator.from_pretrained(tuned, subfolder="discriminator")
    assert disc.config.in_channels == 1 and disc.config.sample_size == 8
    result = run_script(
        "train_sadm.py", *data, *sadm_flags, "--pretrained_model_name_or_path", str(tuned),
        "--disc_pretrained_path", str(tuned / "discriminator"), "--output_dir", str(again),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (again / "discriminator" / "config.json").exists()


def test_bad_pretrained_and_contradictory_structure_options(tmp_path, data_dir):
    (tmp_path / "empty_pipeline").mkdir()
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data_dir), "--output_dir", str(tmp_path / "o"),
        "--pretrained_model_name_or_path", str(tmp_path / "empty_pipeline"), launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "transformer" in result.stderr
    result = run_script(
        "train_sadm.py", *TINY, "--output_dir", str(tmp_path / "o2"), "--structure_relation", "distance",
        "--structure_distance", "kl", launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "relation" in result.stderr and "kl" in result.stderr
    result = run_script(
        "train_sadm.py",
        *TINY[:-6],
        "--train_batch_size",
        "1",
        "--structure_loss_weight",
        "0.01",
        "--output_dir",
        str(tmp_path / "o3"),
        launch=False,
    )
    assert result.returncode != 0 and "--train_batch_size >= 2" in result.stderr
