#!/usr/bin/env python
"""Quality benchmark on the embedded digits: training arms x seeds at a fixed budget, evaluated the same way.

    python scripts/benchmark_quality.py --arms dsm sadm --seeds 0 1 2 --max_train_steps 2000 --jobs 2

Each (arm, seed) trains with `scripts/train_sadm.py` (DiT arms) or `scripts/train_diffusion_gan.py` (GAN arms) into
`<output_root>/<arm>/seed<k>`, is evaluated with `scripts/evaluate.py` (digit-classifier accuracy, digits-FID,
precision/recall), and the table of mean ± std over seeds is written to `--report` (and the per-run JSON beside the runs).
Finished runs are reused, so the benchmark can be extended arm by arm. Ratios vs the first arm are printed last.

With `--eval_steps N` the training runs also evaluate every N steps (`eval_history.json`), and the report links two
PNGs under `--plots_dir`: the metrics against the step per arm (mean ± std over seeds; runs without a history, e.g.
reused ones trained without `--eval_steps`, have no curve), and the sample grids (10 per class) of seed 0 of each arm.
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

HISTORY_NAME = "eval_history.json"  # written by the training scripts' --eval_steps
CURVE_METRICS = ("accuracy", "fid", "kid_mean", "precision", "recall")  # plotted when a history has them
REPO = Path(__file__).resolve().parents[1]

# arm -> (script, extra flags). Every DiT arm shares the script defaults (tiny preset, lr 1e-3, EMA).
ARMS: dict[str, tuple[str, list[str]]] = {
    "dsm": ("train_sadm.py", ["--structure_loss_weight", "0"]),
    "sadm": ("train_sadm.py", ["--structure_loss_weight", "0.01"]),  # StructureConfig's defaults: t < 100, warm-up 500
    "sadm_snr": ("train_sadm.py", ["--structure_loss_weight", "0.01", "--structure_timestep_weighting", "snr"]),
    "sadm_strong": ("train_sadm.py", ["--structure_loss_weight", "0.1", "--structure_t_threshold", "200"]),
    "gan_term": ("train_sadm.py", ["--structure_loss_weight", "0", "--gan_loss_weight", "0.01"]),
    "sadm+gan_term": ("train_sadm.py", ["--structure_loss_weight", "0.01", "--gan_loss_weight", "0.01"]),
    "gan_adaptive": ("train_diffusion_gan.py", ["--diffusion", "adaptive"]),
    "gan_none": ("train_diffusion_gan.py", ["--diffusion", "none"]),
    "gan_adaptive_200": ("train_diffusion_gan.py", ["--diffusion", "adaptive", "--max_train_samples", "200"]),
    "gan_none_200": ("train_diffusion_gan.py", ["--diffusion", "none", "--max_train_samples", "200"]),
}
# Fine-tuning arms (the paper's setting: improve a converged DSM model). Each seed continues from the export of the same
# seed of the `dsm` arm (which must have been run first), at the fine-tuning lr 1e-4 (the script's default for a
# pretrained model) and with a structure warm-up of 100 steps; `ft_dsm` is their control (continued DSM only).
FINETUNE_BASE = "dsm"
FINETUNE = ["--pretrained_model_name_or_path", "{base}", "--structure_warmup_steps", "100"]
SADM = ["--structure_loss_weight", "0.01"]
ARMS.update({
    "ft_dsm": ("train_sadm.py", [*FINETUNE, "--structure_loss_weight", "0"]),
    "ft_sadm": ("train_sadm.py", [*FINETUNE, *SADM]),
    "ft_sadm_distance": ("train_sadm.py", [*FINETUNE, *SADM, "--structure_relation", "distance",
                                           "--structure_distance", "huber"]),
    "ft_sadm_snr": ("train_sadm.py", [*FINETUNE, *SADM, "--structure_timestep_weighting", "snr"]),
    "ft_sadm_strong": ("train_sadm.py", [*FINETUNE, "--structure_loss_weight", "0.03"]),
    "ft_sadm_ratio2": ("train_sadm.py", [*FINETUNE, *SADM, "--disc_update_ratio", "2"]),
    "ft_sadm_vit": ("train_sadm.py", [*FINETUNE, *SADM, "--disc_backbone", "vit"]),
    "ft_gan_term": ("train_sadm.py", [*FINETUNE, "--structure_loss_weight", "0", "--gan_loss_weight", "0.01"]),
    "ft_sadm+gan_term": ("train_sadm.py", [*FINETUNE, *SADM, "--gan_loss_weight", "0.01"]),
})  # fmt: skip
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
    parser.add_argument(
        "--eval_steps",
        type=int,
        default=0,
        help="Passed to the training runs: evaluate every N steps for the metric-vs-step plot (0: off). Finished runs "
        "are reused as they are.",
    )
    parser.add_argument(
        "--eval_num_samples", type=int, default=500, help="Samples per in-training evaluation (with --eval_steps)."
    )
    parser.add_argument(
        "--plots_dir", type=str, default="docs/benchmarks", help="Where the curve and sample-grid PNGs go."
    )
    args = parser.parse_args(argv)
    if args.eval_steps < 0:
        parser.error(f"--eval_steps must be >= 0, got {args.eval_steps}")
    return args


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
    base = Path(args.output_root) / FINETUNE_BASE / f"seed{seed}"
    if "{base}" in flags and not (base / "model_index.json").exists():
        raise FileNotFoundError(
            f"Arm {arm} fine-tunes {base}, which does not exist: run --arms {FINETUNE_BASE} first."
        )
    flags = [flag.replace("{base}", str(base)) for flag in flags]
    evaluation = []
    if args.eval_steps:  # in-training evaluation with the script's digits defaults (accuracy, digits-FID)
        evaluation = ["--eval_steps", str(args.eval_steps), "--eval_num_samples", str(args.eval_num_samples)]
        if script == "train_sadm.py":
            evaluation += ["--eval_num_inference_steps", str(args.num_inference_steps)]
    return [
        sys.executable, str(REPO / "scripts" / script), "--output_dir", str(out), "--seed", str(seed),
        "--max_train_steps", str(args.max_train_steps), "--validation_steps", "0", "--report_to", "none",
        "--checkpointing_steps", str(args.max_train_steps), *flags, *evaluation, *shlex.split(args.extra),
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


def load_histories(args, arm: str) -> list[list[dict]]:
    """The eval_history.json of every seed of an arm that has one."""
    histories = []
    for seed in args.seeds:
        path = Path(args.output_root) / arm / f"seed{seed}" / HISTORY_NAME
        if path.exists():
            histories.append(json.loads(path.read_text()))
    return histories


def plot_curves(args, path: Path) -> bool:
    """Each metric against the training step, one line per arm (mean over seeds, band ± std); False when no run has a
    history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {arm: load_histories(args, arm) for arm in args.arms}
    logged = {key for histories in curves.values() for history in histories for entry in history for key in entry}
    names = [name for name in CURVE_METRICS if name in logged]
    if not names:
        return False
    figure = Figure(figsize=(5 * len(names), 3.6))
    FigureCanvasAgg(figure)
    for i, name in enumerate(names):
        axis = figure.add_subplot(1, len(names), i + 1)
        for arm, histories in curves.items():
            by_step: dict[int, list[float]] = {}
            for history in histories:
                for entry in history:
                    if name in entry:
                        by_step.setdefault(entry["step"], []).append(entry[name])
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
            line = axis.plot(steps, mean, marker=".", label=f"{arm} ({len(histories)} seeds)")[0]
            axis.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        axis.set_xlabel("training step")
        axis.set_ylabel(name)
        axis.set_title(f"{name} ({'higher' if name in ('accuracy', 'precision', 'recall') else 'lower'} is better)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return True


def plot_sample_grids(args, path: Path, threads: int) -> bool:
    """Side-by-side grids of 10 samples per class (one row per class) of seed 0 of each arm, as scripts/sample.py
    writes them (cached in `<run>/samples_grid/`); False when no arm has a seed-0 pipeline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    seed = args.seeds[0]
    grids = {}
    for arm in args.arms:
        out = Path(args.output_root) / arm / f"seed{seed}"
        grid = out / "samples_grid" / "grid.png"
        if not grid.exists() and (out / "model_index.json").exists():
            sample = [
                sys.executable, str(REPO / "scripts" / "sample.py"), "--pipeline", str(out), "--output_dir",
                str(grid.parent), "--num_per_class", "10", "--grid", "--no_png", "--overwrite",
                "--num_inference_steps", str(args.num_inference_steps),
            ]  # fmt: skip
            run(sample, out.parent / f"seed{seed}.log", threads)
        if grid.exists():
            grids[arm] = np.asarray(Image.open(grid).convert("RGB"))
    if not grids:
        return False
    figure = Figure(figsize=(3 * len(grids), 3.4))
    FigureCanvasAgg(figure)
    for i, (arm, image) in enumerate(grids.items()):
        axis = figure.add_subplot(1, len(grids), i + 1)
        axis.imshow(image, interpolation="nearest")
        axis.set_title(f"{arm} (seed {seed})", fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    return True


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
    # plots, linked from the report section (paths relative to the report)
    tag = "_".join(arm.replace("+", "-") for arm in args.arms) + f"_{args.max_train_steps}"
    curves_png = Path(args.plots_dir) / f"{tag}_curves.png"
    samples_png = Path(args.plots_dir) / f"{tag}_samples.png"
    figures = []
    if plot_curves(args, curves_png):
        link = os.path.relpath(curves_png, Path(args.report).parent)
        figures.append(
            f"![metrics vs step]({link})  \nMetrics of the EMA weights during training, mean ± std over seeds."
        )
    if plot_sample_grids(args, samples_png, threads):
        link = os.path.relpath(samples_png, Path(args.report).parent)
        figures.append(
            f"![samples]({link})  \nSeed {args.seeds[0]} of each arm, 10 samples per class (one row per class)."
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
        *[line for figure in figures for line in (figure, "")],
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
