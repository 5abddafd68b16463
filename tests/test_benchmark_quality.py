"""The quality benchmark's report maths and flags (no training: fabricated results)."""

import importlib.util

import pytest
from helpers import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_quality", REPO / "scripts" / "benchmark_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_differences_are_per_seed_arm_minus_baseline():
    benchmark = _benchmark()
    metrics = {"fid": 10.0, "pixel_fid": 2.0, "accuracy": 0.9}
    results = {
        ("dsm", 0): {"ddpm100": metrics},
        ("dsm", 1): {"ddpm100": {**metrics, "fid": 12.0}},
        ("new", 0): {"ddpm100": {**metrics, "fid": 8.0}},
        ("new", 1): {"ddpm100": {**metrics, "fid": 11.0}},
    }
    rows = benchmark.paired_differences(results, ["dsm", "new"], [0, 1], "ddpm100")
    fid_row = next(row for row in rows if "| new | fid |" in row)
    assert fid_row == "| new | fid | -2 | -1 | -1.5 ± 0.71 |"  # differences -2, -1: mean -1.5, std 0.707
    assert "| new | pixel_fid | +0 | +0 | +0 ± 0 |" in rows


def test_bad_sampler_and_sample_count_are_refused():
    benchmark = _benchmark()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--samplers", "euler:10"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--num_samples", "1005"])
    args = benchmark.parse_args(["--arms", "dsm", "sadm_mmd"])
    assert args.samplers == ["ddpm:100", "ddim:10"]
    assert benchmark.samplers_of("sadm_mmd", args) == ["ddpm:100", "ddim:10"]
    assert benchmark.samplers_of("gan_none", args) == ["onestep"]


def test_a_run_with_checkpoints_is_continued_and_a_fresh_one_trained_from_the_start(tmp_path, monkeypatch):
    benchmark = _benchmark()
    commands = []

    def fake_run(cmd, log, threads):  # the training script creates its --output_dir
        commands.append(cmd)
        (tmp_path / "gan8_adaptive_200" / "seed0").mkdir(exist_ok=True)

    monkeypatch.setattr(benchmark, "run", fake_run)
    monkeypatch.setattr(benchmark, "evaluate_run", lambda *a: {})
    args = benchmark.parse_args(
        ["--arms", "gan8_adaptive_200", "--output_root", str(tmp_path), "--max_train_steps", "300",
         "--checkpointing_steps", "100"]
    )  # fmt: skip
    benchmark.run_one(args, "gan8_adaptive_200", 0, 1)
    (tmp_path / "gan8_adaptive_200" / "seed0" / "checkpoint-100").mkdir()  # what an interrupted run leaves
    benchmark.run_one(args, "gan8_adaptive_200", 0, 1)
    fresh, continued = commands
    assert "--overwrite_output_dir" in fresh and "--resume_from_checkpoint" not in fresh
    assert continued[-2:] == ["--resume_from_checkpoint", "latest"] and "--overwrite_output_dir" not in continued
    assert fresh[fresh.index("--checkpointing_steps") + 1] == "100"
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--checkpointing_steps", "-1"])
