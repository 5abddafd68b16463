"""scripts/benchmark_speed.py --quick: runs the real training step of every arm and the two samplers (no timing asserts)."""

import importlib.util
import json
import math

from helpers import REPO, run_script


def test_quick_mode_prints_the_ratios_as_json_and_writes_the_docs(tmp_path):
    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text("# Performance\n\nIntro kept.\n")
    env = {"OMP_NUM_THREADS": "1"}  # tiny ops: a second thread only spin-waits on a shared CPU
    arms = ("--arms", "bare", "dsm", "dsm_ema", "sadm", "gan", "both")
    result = run_script(
        "benchmark_speed.py", "--quick", *arms, "--write_docs", str(docs), launch=False, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("dsm_over_bare", "sadm_over_dsm", "gan_over_dsm", "both_over_dsm", "sampler_over_diffusers"):
        assert math.isfinite(summary[key]) and summary[key] > 0, (key, summary[key])
    assert set(summary["configs"]) == {"tiny pixel", "tiny latent"}
    assert all(v > 0 for v in summary["sampling_images_per_s"].values())
    for arm in ("bare", "dsm", "dsm_ema", "sadm", "gan", "both"):
        assert f"| tiny latent 4x8x8 | 4 | {arm} |" in result.stdout
    text = docs.read_text()
    assert text.startswith("# Performance\n\nIntro kept.") and "benchmark_speed.py --quick" in text
    assert "| tiny latent 4x8x8 | 4 | sadm |" in text and text.count("results start") == 1

    # a second run replaces the results block instead of appending one
    benchmark = load_benchmark_module()
    args = benchmark.parse_args(["--quick", "--write_docs", str(docs)])
    benchmark.write_docs(args, "| new table |", summary)
    text = docs.read_text()
    assert text.count("results start") == 1 and "| new table |" in text and "| tiny latent 4x8x8 |" not in text
    assert text.startswith("# Performance\n\nIntro kept.")


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_speed", REPO / "scripts" / "benchmark_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_flags_stop_before_any_work(capsys):
    benchmark = load_benchmark_module()
    for argv, message in (
        (["--arms", "sadm", "gan"], "--arms must include 'bare'"),
        (["--steps", "0"], "--steps, --repeats"),
    ):
        try:
            benchmark.parse_args(argv)
            raise AssertionError(f"{argv} was accepted")
        except SystemExit:
            assert message in capsys.readouterr().err
