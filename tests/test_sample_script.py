"""scripts/sample.py as evaluators run it: per-image seeds, 1 process equals 2 gloo processes byte for byte, the ADM
`.npz`, any diffusers scheduler by class name, the guidance flags, and every bad-input error."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import REPO, run_script, write_class_folder

TINY = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0",
        "--report_to", "none"]  # fmt: skip
TWO_GLOO_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
# MKL's strict conditional numerical reproducibility: its float32 GEMMs give every row the same bits whatever the
# number of rows, so that batches of 7 and of 4 + 3 round alike (without it they differ in the last float bits)
BATCH_INVARIANT_BLAS = {"MKL_CBWR": "AVX2,STRICT"}


def _sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", REPO / "scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _sample_script()


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A tiny class-conditional pixel DiT with a learned σ, trained for one step (2 classes, 8x8 greyscale)."""
    root = tmp_path_factory.mktemp("sample")
    data = write_class_folder(root / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data), "--output_dir", str(root / "pipe"),
        "--max_train_steps", "1", "--learn_sigma",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "pipe"


def launch_two_processes(args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *TWO_GLOO_PROCESSES,
        str(REPO / "scripts" / "sample.py"),
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **env}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=full_env, cwd=str(REPO))


@pytest.mark.slow
def test_two_processes_with_batch_4_equal_one_process_with_batch_7_byte_for_byte(tmp_path, pipe_dir):
    # DDPM draws noise at every step and guidance runs part of the way: per-image generators make image i the same
    common = ["--pipeline", str(pipe_dir), "--num_images", "7", "--num_inference_steps", "3", "--scheduler", "ddpm",
              "--guidance_scale", "2", "--guidance_interval", "0.3", "1", "--seed", "5", "--grid"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_script(
        "sample.py", *common, "--batch_size", "7", "--output_dir", str(one), "--adm_npz", str(tmp_path / "one.npz"),
        launch=False, env={**BATCH_INVARIANT_BLAS, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch_two_processes(
        [*common, "--batch_size", "4", "--output_dir", str(two), "--adm_npz", str(tmp_path / "two.npz")],
        env=BATCH_INVARIANT_BLAS,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((two / "sampling.json").read_text())["num_processes"] == 2
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert a["images"].shape == (7, 8, 8, 1) and a["images"].dtype == np.uint8
    assert a["images"].tobytes() == b["images"].tobytes()
    assert a["labels"].tolist() == b["labels"].tolist() and set(a["labels"].tolist()) <= {0, 1}
    pngs = sorted(p.name for p in one.glob("*.png"))
    assert pngs == sorted(p.name for p in two.glob("*.png")) and len(pngs) == 8  # 7 images and the grid
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in pngs)
    assert not list(two.glob("shard-*.npz"))  # merged, then removed
    # the ADM evaluator's layout: arr_0 uint8 [N, H, W, 3] (greyscale repeated), arr_1 the labels
    adm_one, adm_two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert adm_one["arr_0"].shape == (7, 8, 8, 3) and adm_one["arr_0"].dtype == np.uint8
    assert adm_one["arr_0"].tobytes() == adm_two["arr_0"].tobytes()
    np.testing.assert_array_equal(adm_one["arr_0"][..., 2], a["images"][..., 0])
    assert adm_two["arr_1"].tolist() == a["labels"].tolist()


def test_scheduler_class_names_kwargs_guidance_flags_and_overwrite(tmp_path, pipe_dir):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "000009_class1.png").write_bytes(b"stale")  # a sample of an earlier run with more images
    (out / "notes.txt").write_text("mine")
    result = run_script(
        "sample.py", "--pipeline", str(pipe_dir), "--output_dir", str(out), "--num_per_class", "2",
        "--batch_size", "3", "--num_inference_steps", "4", "--scheduler", "DPMSolverMultistepScheduler",
        "--scheduler_kwargs", '{"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": true}',
        "--guidance_scale", "3", "--guidance_interval", "0", "0.5", "--guidance_channels", "1", "--grid",
        "--overwrite",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (4, 8, 8, 1) and data["labels"].tolist() == [0, 0, 1, 1]
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["scheduler"] == "DPMSolverMultistepScheduler"
    assert settings["scheduler_config"]["use_karras_sigmas"] is True
    assert settings["scheduler_config"]["algorithm_type"] == "sde-dpmsolver++"
    assert settings["guidance_interval"] == [0.0, 0.5] and settings["guidance_channels"] == 1
    assert not (out / "000009_class1.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "000000_class0.png", "000001_class0.png", "000002_class1.png", "000003_class1.png", "grid.png"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ddpm", "DDPMScheduler"),
        ("ddim", "DDIMScheduler"),
        ("DDPMScheduler", "DDPMScheduler"),
        ("DDIMScheduler", "DDIMScheduler"),
        ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler"),
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
        ("HeunDiscreteScheduler", "HeunDiscreteScheduler"),
    ],
)
def test_every_scheduler_name_samples_the_export(script, pipe_dir, name, expected):
    pipeline = DiffusionPipeline.from_pretrained(pipe_dir)
    pipeline.set_progress_bar_config(disable=True)
    args = script.parse_args(["--pipeline", str(pipe_dir), "--output_dir", "unused", "--num_images", "2",
                              "--scheduler", name])  # fmt: skip
    pipeline.scheduler = script.build_scheduler(pipeline.scheduler, args.scheduler, {})
    assert type(pipeline.scheduler).__name__ == expected
    images, labels = script.sample_batches(
        pipeline, [0, 1], [[0, 1]], seed=0, disable_progress=True, num_inference_steps=3, guidance_scale=2.0
    )
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8 and labels.tolist() == [0, 1]


def test_images_come_from_per_image_seeds(script, pipe_dir):
    pipeline = DiffusionPipeline.from_pretrained(pipe_dir)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 1.0, "disable_progress": True}
    images, _ = script.sample_batches(pipeline, [0, 1, 0], [[0, 1, 2]], seed=3, **kwargs)
    generator = torch.Generator().manual_seed(3 * 2**32 + 1)  # image 1 alone, from its own seed
    alone = pipeline(class_labels=[1], generator=[generator], num_inference_steps=3, output_type="np").images
    np.testing.assert_allclose(images[1:2].astype(float), (alone * 255).round(), atol=1)
    shifted, _ = script.sample_batches(pipeline, [0, 1, 0], [[1, 2]], seed=3, **kwargs)  # indices 1, 2 alone
    assert np.abs(shifted.astype(int) - images[1:].astype(int)).max() <= 1
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() > 10  # same class, other seed: other image


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scheduler", "NoSuchScheduler"], "has no scheduler class 'NoSuchScheduler'"),
        (["--scheduler", "DPMSolverMultistep"], "Did you mean DPMSolverMultistepScheduler"),
        (["--scheduler", "DiffusionPipeline"], "has no scheduler class 'DiffusionPipeline'"),
        (["--guidance_interval", "0.8", "0.2"], "--guidance_interval LOW HIGH needs 0 <= LOW < HIGH <= 1"),
        (["--guidance_interval", "-0.1", "0.5"], "got -0.1 0.5"),
        (["--guidance_interval", "0.5", "1.5"], "got 0.5 1.5"),
        (["--guidance_channels", "0"], "--guidance_channels must be at least 1"),
        (["--scheduler_kwargs", "{use_karras_sigmas: true}"], "not valid JSON"),
        (["--scheduler_kwargs", "[1, 2]"], "must be a JSON object"),
        (["--scheduler", "ddim", "--scheduler_kwargs", '{"use_karras_sigmas": true}'],
         "--scheduler_kwargs ['use_karras_sigmas'] are not options of DDIMScheduler"),
        (["--adm_npz", "samples/arr"], "--adm_npz must end in .npz"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
    ],
)  # fmt: skip
def test_bad_flags_are_parser_errors_naming_them(script, capsys, flags, message):
    with pytest.raises(SystemExit):
        script.parse_args(["--pipeline", "p", "--output_dir", "o", "--num_images", "4", *flags])
    assert message in capsys.readouterr().err


def test_refuses_earlier_samples_and_incompatible_schedulers(script, tmp_path, pipe_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"samples of other settings")
    args = script.parse_args(["--pipeline", str(pipe_dir), "--output_dir", str(out), "--num_images", "2"])
    with pytest.raises(ValueError, match=r"--output_dir .*taken is not empty .*pass --overwrite"):
        script.main(args)
    assert (out / "samples.npz").read_bytes() == b"samples of other settings"  # nothing written, nothing lost
    (tmp_path / "adm.npz").write_bytes(b"an earlier ADM batch")
    args = script.parse_args(["--pipeline", str(pipe_dir), "--output_dir", str(tmp_path / "new"), "--num_images",
                              "2", "--adm_npz", str(tmp_path / "adm.npz")])  # fmt: skip
    with pytest.raises(ValueError, match=r"--adm_npz .*adm\.npz exists; pass --overwrite"):
        script.main(args)
    assert (tmp_path / "adm.npz").read_bytes() == b"an earlier ADM batch" and not (tmp_path / "new").exists()

    pipeline = DiffusionPipeline.from_pretrained(pipe_dir)
    flow = script.scheduler_class("FlowMatchEulerDiscreteScheduler")  # a diffusers scheduler of another process
    with pytest.raises(ValueError, match="--scheduler FlowMatchEulerDiscreteScheduler cannot replace .*DDPMScheduler"):
        script.build_scheduler(pipeline.scheduler, flow, {})
    with pytest.raises(ValueError, match=r"--scheduler_kwargs \['karras'\] are not options of DDPMScheduler"):
        script.build_scheduler(pipeline.scheduler, None, {"karras": True})
    with pytest.raises(ValueError, match="this pipeline has no scheduler"):  # a DiffusionGANPipeline
        script.build_scheduler(None, flow, {})
