#!/usr/bin/env python
"""Quality benchmark on the embedded digits: training arms x seeds at a fixed budget, evaluated the same way.

    python scripts/benchmark_quality.py --arms dsm sadm --seeds 0 1 2 --max_train_steps 2000 --jobs 2

Each (arm, seed) trains with `scripts/train_sadm.py` (DiT arms) or `scripts/train_diffusion_gan.py` (GAN arms) into
`<output_root>/<arm>/seed<k>`, is evaluated with `scripts/evaluate.py` (digit-classifier accuracy, digits-FID,
precision/recall), and the table of mean ± std over seeds is written to `--report` (and the per-run JSON beside the runs).
Finished runs are reused, so the benchmark can be extended arm by arm. Ratios vs the first arm are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# arm -> (script, extra flags). Every DiT arm shares the script defaults (tiny preset, lr 1e-3, EMA).
ARMS: dict[str, tuple[str, list[str]]] = {
    "dsm": ("train_sadm.py", ["--structure_loss_weight", "0"]),
    "sadm": ("train_sadm.py", []),  # the script's SADM defaults
    "sadm_snr": ("train_sadm.py", ["--structure_timestep_weighting", "snr"]),
    "sadm_strong": ("train_sadm.py", ["--structure_loss_weight", "0.1", "--structure_t_threshold", "200"]),
    "gan_term": ("train_sadm.py", ["--structure_loss_weight", "0", "--gan_loss_weight", "0.01"]),
    "sadm+gan_term": ("train_sadm.py", ["--gan_loss_weight", "0.01"]),
    "gan_adaptive": ("train_diffusion_gan.py", ["--diffusion", "adaptive"]),
    "gan_none": ("train_diffusion_gan.py", ["--diffusion", "none"]),
    "gan_adaptive_200": ("train_diffusion_gan.py", ["--diffusion", "adaptive", "--max_train_samples", "200"]),
    "gan_none_200": ("train_diffusion_gan.py", ["--diffusion", "none", "--max_train_samples", "200"]),
}
METRICS = ("accuracy", "fid", "precision", "recall")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arms", nargs="+", default=["dsm", "sadm"], choices=sorted(ARMS), help="Arms; the first is the baseline."
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples per evaluation (equal per class).")
    parser.add_argument("--num_inference_steps", type=int, default=100, help="DDPM steps of the DiT arms.")
    parser.add_argument("--output_root", type=str, default="runs/benchmark_quality")
    parser.add_argument("--report", type=str, default="docs/BENCHMARKS.md")
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (threads per run = cores / jobs).")
    parser.add_argument("--extra", type=str, default="", help="Extra flags for every training run (quoted).")
    return parser.parse_args(argv)


def run(cmd: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if result.returncode != 0:
        raise RuntimeError(f"Command failed ({log}): {shlex.join(cmd)}")


def train_command(args, arm: str, seed: int, out: Path) -> list[str]:
    script, flags = ARMS[arm]
    return [
        sys.executable, str(REPO / "scripts" / script), "--output_dir", str(out), "--seed", str(seed),
        "--max_train_steps", str(args.max_train_steps), "--validation_steps", "0", "--report_to", "none",
        "--checkpointing_steps", str(args.max_train_steps), *flags, *shlex.split(args.extra),
    ]  # fmt: skip


def evaluate_command(args, arm: str, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "scripts" / "evaluate.py"), "--samples", str(out), "--num_samples", str(args.num_samples),
        "--num_inference_steps", str(args.num_inference_steps), "--metrics", ",".join(METRICS),
        "--output_json", str(out / "metrics.json"),
    ]  # fmt: skip


def run_one(args, arm: str, seed: int, threads: int) -> dict:
    out = Path(args.output_root) / arm / f"seed{seed}"
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"seed{seed}.log"
    start = time.time()
    if not (out / "model_index.json").exists():
        run(train_command(args, arm, seed, out) + ["--overwrite_output_dir"], log, threads)
    run(evaluate_command(args, arm, out), log, threads)
    result = json.loads(metrics_file.read_text())
    result["wall_s"] = time.time() - start
    metrics_file.write_text(json.dumps(result, indent=2))
    print(f"{arm} seed {seed}: " + ", ".join(f"{m} {result[m]:.4g}" for m in METRICS if m in result), flush=True)
    return result


def main(args: argparse.Namespace) -> None:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(args, job[0], job[1], threads), jobs))
    table: dict[str, dict[str, list[float]]] = {}
    for (arm, _), result in zip(jobs, results):
        for metric in METRICS:
            if metric in result:
                table.setdefault(arm, {}).setdefault(metric, []).append(result[metric])

    lines = [
        "| arm | " + " | ".join(METRICS) + " | seeds |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for arm in args.arms:
        cells = []
        for metric in METRICS:
            values = np.asarray(table[arm].get(metric, [np.nan]))
            cells.append(f"{values.mean():.4g} ± {values.std(ddof=1) if len(values) > 1 else 0:.2g}")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {len(args.seeds)} |")
    per_seed = ["| arm | seed | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for (arm, seed), result in zip(jobs, results):
        per_seed.append(
            f"| {arm} | {seed} | " + " | ".join(f"{result.get(m, float('nan')):.4g}" for m in METRICS) + " |"
        )
    command = "python scripts/benchmark_quality.py " + shlex.join(sys.argv[1:])
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    section = [
        f"### {', '.join(args.arms)} — {args.max_train_steps} steps, seeds {args.seeds}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; {args.num_samples} samples per run, {args.num_inference_steps} sampling steps (DiT arms).  ",
        "accuracy: share of samples a held-out digit classifier reads as the requested class; fid: Fréchet distance in "
        "that classifier's features vs the 1797 real digits; precision/recall: k=3 manifolds in the same features.",
        "",
        *lines,
        "",
        "<details><summary>per seed</summary>",
        "",
        *per_seed,
        "",
        "</details>",
        "",
    ]
    print("\n".join(lines))
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    with open(report, "a") as f:
        f.write("\n".join(section) + "\n")
    base = args.arms[0]
    ratios = {
        f"{arm}_over_{base}_{metric}": float(np.mean(table[arm][metric]) / np.mean(table[base][metric]))
        for arm in args.arms[1:]
        for metric in ("accuracy", "fid")
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main(parse_args())
