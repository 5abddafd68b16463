"""scripts/gpu_check.sh on a machine without CUDA, and the GPU section its report writes (CPU only)."""

import importlib.util
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from helpers import REPO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_stops_at_once_with_a_clear_message_without_cuda(tmp_path):
    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text("# Performance\n")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "LOG_DIR": str(tmp_path / "log"),
           "DOCS": str(docs)}  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1
    assert "no CUDA device" in result.stderr and "nothing was run" in result.stderr
    assert time.perf_counter() - start < 60  # one `import torch`, nothing else
    assert not (tmp_path / "log").exists() and docs.read_text() == "# Performance\n"


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu" name="test_bf16_training" time="12.5"/>
<testcase classname="tests.test_fsdp" name="test_single_process_fsdp_trains[dsm]" time="30.1"/>
<testcase classname="tests.test_fsdp" name="test_single_process_fsdp_trains[sadm+gan]" time="20.0">
<failure message="RuntimeError: FSDP double backward&#10;second line">traceback</failure></testcase>
</testsuite></testsuites>
"""


def test_report_writes_the_gpu_section_and_replaces_it_on_the_next_run(tmp_path):
    report, benchmark = load_script("gpu_check_report"), load_script("benchmark_speed")
    log = tmp_path / "log"
    log.mkdir()
    (log / "parts.tsv").write_text("gpu_tests\t1\t140\nspeed_B2\t0\t50\nspeed_XL2\t124\t120\n")
    (log / "gpu_tests.xml").write_text(JUNIT)
    table = "| config | batch | arm | median step ms | img/s |\n|---|---|---|---|---|\n| DiT-B/2 latent | 32 | dsm | 90.0 | 355.6 |"
    args = SimpleNamespace(write_docs=str(log / "benchmark_1_DiT-B2.md"), device="cuda", mixed_precision="bf16")
    benchmark.machine_description = lambda device: "NVIDIA Test GPU, torch x"  # no CUDA here
    benchmark.write_docs(args, table, {"headline": "DiT-B/2 latent", "dsm_over_bare": 1.01})
    assert benchmark.GPU_RESULTS_START in (log / "benchmark_1_DiT-B2.md").read_text()  # the CUDA block, not the CPU one

    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text("# Performance\n\nIntro.\n\n## GPU\n\nold text\n\n## Later section\n\nkept\n")
    for _ in range(2):
        report.main(SimpleNamespace(log_dir=str(log), docs=str(docs)))
    text = docs.read_text()
    assert text.startswith("# Performance\n\nIntro.\n\n## GPU\n") and text.count("## GPU") == 1
    assert "old text" not in text and text.rstrip().endswith("## Later section\n\nkept")
    assert "| gpu_tests | failed (exit 1) | 140 |" in text and "| speed_XL2 | timed out | 120 |" in text
    assert "dsm passed; sadm+gan failed (RuntimeError: FSDP double backward)" in text
    assert "| `test_gpu::test_bf16_training` | passed | 12.5 |" in text
    assert "| DiT-B/2 latent | 32 | dsm | 90.0 | 355.6 |" in text and "NVIDIA Test GPU" in text
    assert "<!--" not in text.split("## GPU", 1)[1]

    # without a GPU section the section is appended; missing outputs are named
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "OTHER.md"
    other.write_text("# Performance\n")
    report.main(SimpleNamespace(log_dir=str(empty), docs=str(other)))
    text = other.read_text()
    assert text.startswith("# Performance\n\n## GPU\n") and "no gpu_tests*.xml" in text and "FSDP: no result" in text
    assert "No speed results" in text
