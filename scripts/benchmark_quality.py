#!/usr/bin/env python
"""Quality benchmark on the embedded digits: training arms x seeds at a fixed budget, evaluated the same way.

    python scripts/benchmark_quality.py --arms dsm sadm --seeds 0 1 2 --max_train_steps 2000 --jobs 2

Each (arm, seed) trains with `scripts/train_sadm.py` (DiT arms) or `scripts/train_diffusion_gan.py` (GAN arms) into
`<output_root>/<arm>/seed<k>`. Each DiT run is then sampled with every `--samplers` entry (default DDPM 100 steps and
DDIM 10 steps: adversarial terms are expected to matter most at few steps) by `scripts/sample.py` into an `.npz`, which
`scripts/evaluate.py` measures in two feature spaces: the digit classifier (accuracy, digits-FID, precision/recall) and
raw pixels (pixel-FID, which sees the speckle the classifier is blind to). GAN arms are sampled in their one step. The
report (`--report`) has a table of mean ± std over seeds per sampler, and the paired per-seed differences of each arm
to the first one. Finished runs and samples are reused, so the benchmark can be extended arm by arm.

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
import threading
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
    # the quickstart at the native 8x8 (16 tokens, ~4x cheaper per step) for twice the steps (issue 16, docs/DIGITS.md)
    "dsm8_4000": ("train_sadm.py", ["--structure_loss_weight", "0", "--resolution", "8", "--max_train_steps", "4000"]),
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
# The consistent variants (docs/METHODS.md §1.2b, tests/test_structure_consistency.py), pre-registered in
# docs/BENCHMARKS.md before they were run. λ follows the gradient-norm rule (structure gradient at the denoiser's output
# = 0.1 x the denoising loss's, capped at 100): the 'mmd' gradient at x̂0 is scaled by the small reverse-step coefficient,
# so no fixed λ is comparable across formulations.
MMD = ["--structure_formulation", "mmd", "--structure_timestep_weighting", "none", "--structure_reverse_step", "10"]
ADAPTIVE = ["--structure_loss_weight", "100", "--structure_grad_ratio", "0.1"]
PAIRED_FIX = ["--structure_columns", "active", "--structure_renoise_offset", "0", "--structure_t_threshold", "200"]
ARMS.update({
    "sadm_mmd": ("train_sadm.py", [*MMD, *ADAPTIVE]),
    "sadm_paired_fix": ("train_sadm.py", [*PAIRED_FIX, *ADAPTIVE]),
    "ft_sadm_mmd": ("train_sadm.py", [*FINETUNE, *MMD, *ADAPTIVE]),
    "ft_sadm_paired_fix": ("train_sadm.py", [*FINETUNE, *PAIRED_FIX, *ADAPTIVE]),
})  # fmt: skip
# Issue 14: the same terms judged by a frozen copy of the model being fine-tuned (its start-of-run weights), heads on the
# script's default blocks (a quarter and half of the depth: blocks 0, 1 of the tiny preset's 4, where a DiT's features are
# most separable and the trunk costs half a forward) and the default head width (--disc_base_channels 64, as the conv D).
DIT_TRUNK = ["--gan_disc_trunk", "dit", "--disc_backbone", "dit"]
ARMS.update({
    "ft_gan_dit": ("train_sadm.py", [*FINETUNE, "--structure_loss_weight", "0", "--gan_loss_weight", "0.01", *DIT_TRUNK]),
    "ft_sadm_mmd_dit": ("train_sadm.py", [*FINETUNE, *MMD, *ADAPTIVE, *DIT_TRUNK]),
})  # fmt: skip
# Issue 14 item 4, pre-registered in docs/BENCHMARKS.md: λ_adv of the fine-tuning GAN term from the gradient-norm rule
# (the term's gradient at the denoiser's output = 0.1x resp. 0.3x the denoising loss's, λ_adv capped at 100 as the SADM
# arms' λ), ramped in over the first 100 steps as the structure term is; the conv D and everything else as `ft_gan_term`.
GAN_RATIO = ["--structure_loss_weight", "0", "--gan_loss_weight", "100", "--gan_warmup_steps", "100"]
ARMS.update({
    "ft_gan_r01": ("train_sadm.py", [*FINETUNE, *GAN_RATIO, "--gan_grad_ratio", "0.1"]),
    "ft_gan_r03": ("train_sadm.py", [*FINETUNE, *GAN_RATIO, "--gan_grad_ratio", "0.3"]),
})  # fmt: skip
# The random-stream control (pre-registered in docs/BENCHMARKS.md): with --per_sample_noise every sample's t and ε come
# from its own generator, so a term that draws noise of its own no longer changes what the denoiser sees.
PSN = ["--per_sample_noise"]
ARMS.update({
    "ft_dsm_psn": ("train_sadm.py", [*ARMS["ft_dsm"][1], *PSN]),
    "ft_gan_term_psn": ("train_sadm.py", [*ARMS["ft_gan_term"][1], *PSN]),
    "ft_sadm_mmd_psn": ("train_sadm.py", [*ARMS["ft_sadm_mmd"][1], *PSN]),
    "ft_gan_r03_psn": ("train_sadm.py", [*ARMS["ft_gan_r03"][1], *PSN]),
})  # fmt: skip
# Issue 14's second target (pre-registered in docs/BENCHMARKS.md): the recommended GAN term together with SADM's
# consistent critic, each term's λ from its own gradient-norm rule (GAN 0.3x, structure 0.1x the DSM gradient), with
# the per-sample streams so that it pairs with ft_gan_r03_psn and ft_dsm_psn on the same bases.
ARMS["ft_gan_r03+sadm_mmd_psn"] = (
    "train_sadm.py",
    [*FINETUNE, "--gan_loss_weight", "100", "--gan_warmup_steps", "100", "--gan_grad_ratio", "0.3", *MMD, *ADAPTIVE, *PSN],
)
# Diffusion-GAN with networks fit for small data (issue 15; not yet run): the native 8x8 digits, the residual D with
# minibatch std (0.58 M parameters), two convolutions per generator resolution, a 10 kimg EMA half-life. Give them
# --max_train_steps for 0.5-2 Mimg (batch 32: 15,625-62,500 steps); ada_kimg stays the paper's 100, which p can
# cross 5-20 times in that budget. "_200": a random subset of 200 digits, the same for every seed (sadm.data's
# subset_indices; the older gan_*_200 arms ran when --max_train_samples kept the first 200 files: 178 zeros, 22 ones).
GAN8 = ["--resolution", "8", "--disc_trunk", "resnet", "--generator_layers_per_block", "2", "--ema_kimg", "10"]
ARMS.update({
    "gan8_none_200": ("train_diffusion_gan.py", [*GAN8, "--diffusion", "none", "--max_train_samples", "200"]),
    "gan8_adaptive_200": ("train_diffusion_gan.py", [*GAN8, "--diffusion", "adaptive", "--max_train_samples", "200"]),
    "gan8_fixed_200": ("train_diffusion_gan.py", [*GAN8, "--diffusion", "fixed", "--max_train_samples", "200"]),
    "gan8_none": ("train_diffusion_gan.py", [*GAN8, "--diffusion", "none"]),
    "gan8_adaptive": ("train_diffusion_gan.py", [*GAN8, "--diffusion", "adaptive"]),
    "gan8_fixed": ("train_diffusion_gan.py", [*GAN8, "--diffusion", "fixed"]),
})  # fmt: skip
# Issue 13 item 4 (not yet run; docs/BENCHMARKS.md): the 'mmd' structure term judged by frozen features with a
# low-capacity adversarial head. The encoder is a frozen timm `test_resnet` trained by scripts/train_feature_network.py
# on a seeded half of the 16 px digits (another architecture and another split than the evaluation classifier, so that
# digits-FID is not the encoder's own feature space), plus the trainable level embedding of the noise-conditional
# encoder and an orthonormal 96 -> 64 projection. "{feature_net}" is that file, trained once under --output_root.
FEATURE_NET = ["scripts/train_feature_network.py", "--model_name", "test_resnet", "--resolution", "16",
               "--split_seed", "1", "--seed", "0"]  # fmt: skip
FROZEN = ["--disc_backbone", "timm", "--disc_timm_model_name", "test_resnet", "--disc_timm_pretrained_path",
          "{feature_net}", "--disc_freeze_backbone", "--disc_head", "orthonormal", "--disc_embed_dim", "64"]  # fmt: skip
ARMS.update({
    "sadm_mmd_frozen": ("train_sadm.py", [*MMD, *ADAPTIVE, *FROZEN]),
    "ft_sadm_mmd_frozen": ("train_sadm.py", [*FINETUNE, *MMD, *ADAPTIVE, *FROZEN]),
    # with the per-sample streams, so that it pairs with ft_sadm_mmd_psn and ft_dsm_psn on the same bases
    "ft_sadm_mmd_frozen_psn": ("train_sadm.py", [*FINETUNE, *MMD, *ADAPTIVE, *FROZEN, *PSN]),
})  # fmt: skip
METRICS = ("accuracy", "fid", "pixel_fid", "precision", "recall")
LOWER_IS_BETTER = ("fid", "pixel_fid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arms", nargs="+", default=["dsm", "sadm"], choices=sorted(ARMS), help="Arms; the first is the baseline."
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples per evaluation (equal per class).")
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=["ddpm:100", "ddim:10"],
        help="scheduler:steps pairs the DiT arms are sampled with (schedulers of scripts/sample.py).",
    )
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
        "--eval_num_inference_steps", type=int, default=25, help="DDPM steps of each in-training evaluation."
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=0,
        help="Passed to the training runs (0: one checkpoint at the end). A run folder that holds a checkpoint but no "
        "export is continued from its latest complete checkpoint (--resume_from_checkpoint latest) instead of being "
        "trained again, so that long runs (the gan8 arms) can span several invocations.",
    )
    parser.add_argument(
        "--plots_dir", type=str, default="docs/benchmarks", help="Where the curve and sample-grid PNGs go."
    )
    args = parser.parse_args(argv)
    for flag in ("eval_steps", "checkpointing_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for sampler in args.samplers:
        name, _, steps = sampler.partition(":")
        if name not in ("ddpm", "ddim") or not steps.isdigit() or int(steps) < 1:
            parser.error(f"--samplers entry {sampler!r} must be ddpm:<steps> or ddim:<steps>.")
    if args.num_samples % 10:
        parser.error(f"--num_samples {args.num_samples} must be a multiple of the 10 digit classes.")
    return args


def run(cmd: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if result.returncode != 0:
        raise RuntimeError(f"Command failed ({log}): {shlex.join(cmd)}")


_FEATURE_NET_LOCK = threading.Lock()


def feature_network(args) -> Path:
    """The frozen feature network of the `*_frozen` arms (`FEATURE_NET`), trained once (~30 s) under --output_root."""
    path = Path(args.output_root) / "feature_network" / "test_resnet_r16_split1.safetensors"
    with _FEATURE_NET_LOCK:  # parallel arms wait for the one that trains it
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            script, *flags = FEATURE_NET
            run([sys.executable, str(REPO / script), *flags, "--output_path", str(path)], path.with_suffix(".log"), 1)
    return path


def train_command(args, arm: str, seed: int, out: Path) -> list[str]:
    script, flags = ARMS[arm]
    base = Path(args.output_root) / FINETUNE_BASE / f"seed{seed}"
    if "{base}" in flags and not (base / "model_index.json").exists():
        raise FileNotFoundError(
            f"Arm {arm} fine-tunes {base}, which does not exist: run --arms {FINETUNE_BASE} first."
        )
    flags = [flag.replace("{base}", str(base)) for flag in flags]
    if "{feature_net}" in flags:
        feature_net = str(feature_network(args))
        flags = [flag.replace("{feature_net}", feature_net) for flag in flags]
    evaluation = []
    if args.eval_steps:  # in-training evaluation with the script's digits defaults (accuracy, digits-FID)
        evaluation = ["--eval_steps", str(args.eval_steps), "--eval_num_samples", str(args.eval_num_samples)]
        if script == "train_sadm.py":
            evaluation += ["--eval_num_inference_steps", str(args.eval_num_inference_steps)]
    return [
        sys.executable, str(REPO / "scripts" / script), "--output_dir", str(out), "--seed", str(seed),
        "--max_train_steps", str(args.max_train_steps), "--validation_steps", "0", "--report_to", "none",
        "--checkpointing_steps", str(args.checkpointing_steps or args.max_train_steps), *flags, *evaluation, *shlex.split(args.extra),
    ]  # fmt: skip


def samplers_of(arm: str, args) -> list[str]:
    """The samplers an arm is measured with: the DiT arms' `--samplers`, the GAN arms' single step."""
    return args.samplers if ARMS[arm][0] == "train_sadm.py" else ["onestep"]


def evaluate_run(args, arm: str, out: Path, log: Path, threads: int) -> dict[str, dict[str, float]]:
    """{sampler tag: metrics} of one trained run: sample once per sampler into an .npz, measure it in both spaces."""
    results = {}
    for sampler in samplers_of(arm, args):
        name, _, steps = sampler.partition(":")
        tag = name + steps  # e.g. ddpm100
        folder = out / f"samples_{tag}"
        if not (folder / "samples.npz").exists():
            sample = [
                sys.executable, str(REPO / "scripts" / "sample.py"), "--pipeline", str(out), "--output_dir", str(folder),
                "--num_per_class", str(args.num_samples // 10), "--no_png", "--overwrite", "--seed", "0",
            ]  # fmt: skip
            if steps:
                sample += ["--scheduler", name, "--num_inference_steps", steps]
            run(sample, log, threads)
        metrics = {}
        flags = ARMS[arm][1]
        resolution = flags[flags.index("--resolution") + 1] if "--resolution" in flags else None
        for network, names in (("digits", "accuracy,fid,precision,recall"), ("pixels", "fid")):
            report = folder / f"metrics_{network}.json"
            if not report.exists():
                evaluate = [
                    sys.executable, str(REPO / "scripts" / "evaluate.py"), "--samples", str(folder / "samples.npz"),
                    "--feature_network", network, "--metrics", names, "--output_json", str(report),
                ]  # fmt: skip
                if network == "pixels" and resolution:  # raw pixels at the training resolution (the digits net resizes)
                    evaluate += ["--resolution", resolution]
                run(evaluate, log, threads)
            values = json.loads(report.read_text())
            if network == "digits":
                metrics.update({m: values[m] for m in ("accuracy", "fid", "precision", "recall")})
            else:
                metrics["pixel_fid"] = values["fid"]
        results[tag] = metrics
    return results


def run_one(args, arm: str, seed: int, threads: int) -> dict[str, dict[str, float]]:
    out = Path(args.output_root) / arm / f"seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"seed{seed}.log"
    if not (out / "model_index.json").exists():
        start = time.time()
        # continue an interrupted run from its checkpoints; train anything else from the start
        resume = any(out.glob("checkpoint-*"))
        restart = ["--resume_from_checkpoint", "latest"] if resume else ["--overwrite_output_dir"]
        run(train_command(args, arm, seed, out) + restart, log, threads)
        with open(out / "train_wall_s.txt", "a") as f:  # one line per invocation that trained
            f.write(f"{time.time() - start:.1f}\n")
    result = evaluate_run(args, arm, out, log, threads)
    summary = "; ".join(f"{tag}: " + ", ".join(f"{m} {v:.4g}" for m, v in r.items()) for tag, r in result.items())
    print(f"{arm} seed {seed}: {summary}", flush=True)
    return result


def paired_differences(results: dict[tuple[str, int], dict], arms: list[str], seeds: list[int], tag: str) -> list[str]:
    """Markdown rows: per arm and metric, arm − baseline per seed, then mean ± std of those differences."""
    base = arms[0]
    rows = [
        f"| arm − {base} | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for arm in arms[1:]:
        if tag not in results[(arm, seeds[0])] or tag not in results[(base, seeds[0])]:
            continue
        for metric in ("fid", "pixel_fid", "accuracy"):
            diffs = np.array([results[(arm, s)][tag][metric] - results[(base, s)][tag][metric] for s in seeds])
            std = diffs.std(ddof=1) if len(diffs) > 1 else 0.0
            rows.append(
                f"| {arm} | {metric} | "
                + " | ".join(f"{d:+.3g}" for d in diffs)
                + f" | {diffs.mean():+.3g} ± {std:.2g} |"
            )
    return rows


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
    """Side-by-side grids of 10 samples per class (one row per class) of seed 0 of each arm with the first sampler, as
    scripts/sample.py writes them (cached in `<run>/samples_grid/`); False when no arm has a seed-0 pipeline."""
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
            ]  # fmt: skip
            if ARMS[arm][0] == "train_sadm.py":  # the first (many-step) sampler
                name, _, steps = args.samplers[0].partition(":")
                sample += ["--scheduler", name, "--num_inference_steps", steps]
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
        results = dict(zip(jobs, pool.map(lambda job: run_one(args, job[0], job[1], threads), jobs)))
    tags = list(dict.fromkeys(tag for result in results.values() for tag in result))

    tables = []
    for tag in tags:
        arms = [arm for arm in args.arms if tag in results[(arm, args.seeds[0])]]
        rows = [
            f"**{tag}**",
            "",
            "| arm | " + " | ".join(METRICS) + " | seeds |",
            "|---|" + "---|" * (len(METRICS) + 1),
        ]
        for arm in arms:
            cells = []
            for metric in METRICS:
                values = np.array([results[(arm, seed)][tag][metric] for seed in args.seeds])
                cells.append(f"{values.mean():.4g} ± {values.std(ddof=1) if len(values) > 1 else 0:.2g}")
            rows.append(f"| {arm} | " + " | ".join(cells) + f" | {len(args.seeds)} |")
        if len(arms) > 1 and arms[0] == args.arms[0]:
            rows += ["", *paired_differences(results, args.arms, args.seeds, tag)]
        tables += [*rows, ""]
    per_seed = ["| arm | seed | sampler | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for (arm, seed), result in results.items():
        for tag, metrics in result.items():
            cells = " | ".join(f"{metrics.get(m, float('nan')):.4g}" for m in METRICS)
            per_seed.append(f"| {arm} | {seed} | {tag} | {cells} |")
    # plots, linked from the report section (paths relative to the report)
    name = "_".join(arm.replace("+", "-") for arm in args.arms) + f"_{args.max_train_steps}"
    curves_png = Path(args.plots_dir) / f"{name}_curves.png"
    samples_png = Path(args.plots_dir) / f"{name}_samples.png"
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
        f"Machine: {machine}; {args.num_samples} samples per run and sampler (DiT arms: {', '.join(args.samplers)}).  ",
        "accuracy: share of samples a held-out digit classifier reads as the requested class; fid: Fréchet distance in "
        "that classifier's features vs the 1797 real digits; pixel_fid: the same on raw pixels; precision/recall: k=3 "
        "manifolds in the classifier's features. Differences: arm − first arm on the same seed (lower FID is better).",
        "",
        *tables,
        "<details><summary>per seed</summary>",
        "",
        *per_seed,
        "",
        "</details>",
        "",
        *[line for figure in figures for line in (figure, "")],
    ]
    print("\n".join(tables))
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    with open(report, "a") as f:
        f.write("\n".join(section) + "\n")
    base = args.arms[0]
    ratios = {
        f"{arm}_over_{base}_{tag}_{metric}": float(
            np.mean([results[(arm, s)][tag][metric] for s in args.seeds])
            / np.mean([results[(base, s)][tag][metric] for s in args.seeds])
        )
        for tag in tags
        for arm in args.arms[1:]
        for metric in ("accuracy", "fid", "pixel_fid")
        if tag in results[(arm, args.seeds[0])] and tag in results[(base, args.seeds[0])]
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main(parse_args())
