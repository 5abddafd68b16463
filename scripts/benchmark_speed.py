#!/usr/bin/env python
"""Speed benchmark: what the adversarial terms cost next to the denoiser, and our sampler next to diffusers'.

    python scripts/benchmark_speed.py                      # CPU: tiny and DiT-S/2, pixel and latent (<= 10 min)
    python scripts/benchmark_speed.py --device cuda --mixed_precision bf16 --presets DiT-S/2 DiT-B/2 --latent_size 32
    bash scripts/gpu_check.sh                             # DiT-B/2 and DiT-XL/2 at 32x32x4 latents, batch 32

Training arms, per (preset, space) configuration, all with the same model, batch, optimizer and data:

- `bare`:  a plain PyTorch loop on random tensors: DiT forward + ε-MSE + backward + AdamW (the floor);
- `dsm`:   **the training step of scripts/train_sadm.py** (its `main` run in-process on an in-memory random dataset,
           with a timer as its per-step callback), DSM loss only;
- `sadm`:  the same with the SADM structure loss (default structure discriminator, λ = 0.01, no λ warm-up);
- `gan`:   the same with the Diffusion-GAN term (default timestep discriminator, λ_adv = 0.01);
- `both`:  both terms;
- `sadm_mmd` (on request): SADM's 'mmd' critic on reverse-step samples with the gradient-norm λ.

"latent" means 4-channel inputs at the VAE's 1/8 resolution, fed directly (the VAE encode is not part of the timed
step). Every step is timed; the first `--warmup_steps` of each run are dropped and
the median over all repeats is reported. Arms run round-robin (`--repeats` rounds, every other one reversed) so
background load hits each alike.
The script steps run with `--no-use_ema` (the bare loop has no EMA); `--arms ... dsm_ema` adds the EMA's cost.

Peak memory: `torch.cuda.max_memory_allocated` on GPU; on CPU the peak resident set size (RSS) of this process
sampled every millisecond during the arm's steps (it includes the interpreter and libraries, ~0.5 GB, so compare rows,
not absolute values).

Sampling: `SADMDiTPipeline` vs diffusers' `DiTPipeline` on the same 1000-class latent DiT, the same tiny random
`AutoencoderKL`, the same DDPM scheduler, steps and guidance scale, interleaved the same way.

The table (median step time, img/s, ratios, peak memory) goes to stdout, the last line is JSON with the headline
ratios (the small preset, latent) and every configuration's step times, img/s and peak MiB, and `--write_docs`
rewrites the results block of docs/PERFORMANCE.md (a CUDA run its own block, never the CPU one).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT_ARMS: dict[str, list[str]] = {
    "dsm": [],
    "dsm_ema": ["--use_ema"],
    "sadm": ["--structure_loss_weight", "0.01", "--structure_warmup_steps", "0"],
    "gan": ["--gan_loss_weight", "0.01"],
    "both": ["--structure_loss_weight", "0.01", "--structure_warmup_steps", "0", "--gan_loss_weight", "0.01"],
}
# the consistent SADM critic with the gradient-norm λ (two extra gradients at the output per step)
SCRIPT_ARMS["sadm_mmd"] = ["--structure_loss_weight", "100", "--structure_grad_ratio", "0.1", "--structure_formulation",
                           "mmd", "--structure_timestep_weighting", "none", "--structure_warmup_steps", "0"]  # fmt: skip
ARMS = ["bare", *SCRIPT_ARMS]
DEFAULT_ARMS = ["bare", "dsm", "sadm", "gan", "both"]  # dsm_ema on request: it fits the 10-minute CPU budget
HEADLINE_RATIOS = {  # JSON key: (numerator arm, denominator arm)
    "dsm_over_bare": ("dsm", "bare"),
    "sadm_over_dsm": ("sadm", "dsm"),
    "gan_over_dsm": ("gan", "dsm"),
    "both_over_dsm": ("both", "dsm"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda.")
    parser.add_argument(
        "--mixed_precision", default="no", choices=["no", "bf16", "fp16"], help="Autocast of the steps."
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "DiT-S/2"], help="DiT presets; the last is 'small'.")
    parser.add_argument("--spaces", nargs="+", default=["pixel", "latent"], choices=["pixel", "latent"])
    parser.add_argument("--pixel_size", type=int, default=8, help="Pixel-space resolution (3 channels).")
    parser.add_argument("--latent_size", type=int, default=8, help="Latent resolution (4 channels; image = 8x).")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: 32 for tiny, 8 for the others.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per arm and repeat.")
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps at the start of every run.")
    parser.add_argument("--repeats", type=int, default=2, help="Round-robin rounds over the arms.")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=ARMS, help=f"Default: {DEFAULT_ARMS}.")
    parser.add_argument("--sample_preset", default=None, help="Preset of the sampling comparison (default: the last).")
    parser.add_argument("--sample_batch", type=int, default=8)
    parser.add_argument("--sample_steps", type=int, default=20, help="Denoising steps per sampling call.")
    parser.add_argument("--sample_repeats", type=int, default=3)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="Seconds-long smoke run (tiny only, few steps).")
    parser.add_argument("--write_docs", type=str, default=None, help="Write the results into this markdown file.")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available.")
    if args.quick:
        args.presets, args.pixel_size, args.latent_size, args.batch_size = ["tiny"], 8, 8, 4
        args.steps, args.warmup_steps, args.repeats = 2, 1, 1
        args.sample_batch, args.sample_steps, args.sample_repeats = 2, 2, 1
    if min(args.steps, args.repeats, args.sample_repeats, args.sample_steps) < 1 or args.warmup_steps < 0:
        parser.error("--steps, --repeats, --sample_steps and --sample_repeats must be >= 1, --warmup_steps >= 0.")
    for needed in ("bare", "dsm"):
        if needed not in args.arms:
            parser.error(f"--arms must include '{needed}' (the ratios are relative to it).")
    return args


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_sadm", REPO / "scripts" / "train_sadm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory over a `with` block: CUDA allocator peak, or the sampled RSS of this process on CPU (bytes)."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.001)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


class _Finished(Exception):
    pass


class StepTimer:
    """The script's `on_step` callback, called once per optimizer step: the gaps between calls are the step times.

    The first call only starts the clock (the run's first step is never timed, on top of `warmup`); after
    `warmup + steps` timed gaps it stops the run (before any checkpoint or export) by raising `_Finished`."""

    def __init__(self, device: str, warmup: int, steps: int, memory: PeakMemory):
        self.device, self.warmup, self.steps, self.memory = device, warmup, steps, memory
        self.times: list[float] = []
        self.last = None

    def __call__(self, global_step: int) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        if len(self.times) == self.warmup:
            self.memory.__enter__()
        if len(self.times) >= self.warmup + self.steps:
            raise _Finished
        self.last = time.perf_counter()


class RandomDataset(torch.utils.data.Dataset):
    """In-memory random samples in [-1, 1] with labels: the training data of the benchmark (no image decoding)."""

    def __init__(self, num_items: int, channels: int, size: int, num_classes: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(num_items, channels, size, size, generator=generator) * 2 - 1  # [N, C, H, W]
        self.labels = torch.randint(0, num_classes, (num_items,), generator=generator)  # [N]
        self.num_classes, self.num_channels = num_classes, channels
        self.id2label = {i: str(i) for i in range(num_classes)}
        self.augment_seed = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        index = key % len(self.images)
        return {"pixel_values": self.images[index], "class_labels": self.labels[index]}


def time_script_arm(train_sadm, arm: str, cfg: dict, args) -> tuple[list[float], int]:
    """Run train_sadm.main in-process for warm-up + timed steps; returns (timed step seconds, peak memory bytes)."""
    dataset = RandomDataset(cfg["batch"] * 4, cfg["channels"], cfg["size"], cfg["num_classes"])
    memory = PeakMemory(args.device)
    timer = StepTimer(args.device, args.warmup_steps, args.steps, memory)
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [
            "--output_dir", output_dir, "--model", cfg["preset"], "--resolution", str(cfg["size"]),
            "--train_batch_size", str(cfg["batch"]), "--max_train_steps", str(args.warmup_steps + args.steps + 2),
            "--mixed_precision", args.mixed_precision, "--report_to", "none", "--validation_steps", "0",
            "--checkpointing_steps", "1000000", "--x0_clip", "1" if cfg["space"] == "pixel" else "0",
            "--no-use_ema", *SCRIPT_ARMS[arm],
        ]  # fmt: skip
        try:
            train_sadm.main(train_sadm.parse_args(argv), dataset=dataset, on_step=timer)
        except _Finished:
            pass
        finally:
            memory.__exit__(None, None, None)
    gc.collect()
    return timer.times[args.warmup_steps :], memory.peak


def time_bare_arm(cfg: dict, args) -> tuple[list[float], int]:
    """The floor: DiT forward + ε-MSE + backward + AdamW on random tensors, nothing else."""
    from sadm.models.dit import build_dit

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_dit(cfg["preset"], cfg["size"], cfg["channels"], cfg["num_classes"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    b, c, s = cfg["batch"], cfg["channels"], cfg["size"]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16)
        if args.mixed_precision != "no"
        else contextlib.nullcontext()
    )
    memory = PeakMemory(args.device)
    times = []
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            memory.__enter__()
        start = time.perf_counter()
        x_t = torch.randn(b, c, s, s, device=device)
        noise = torch.randn(b, c, s, s, device=device)
        t = torch.randint(0, 1000, (b,), device=device)
        labels = torch.randint(0, cfg["num_classes"], (b,), device=device)
        with autocast:
            prediction = model(x_t, timestep=t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    memory.__exit__(None, None, None)
    del model, optimizer
    gc.collect()
    return times[args.warmup_steps :], memory.peak


# ------------------------------------------------------------------------------------------------------- sampling
def tiny_vae() -> AutoencoderKL:
    """A random 4-channel AutoencoderKL with the SD VAE's 8x down-sampling (4 levels), small enough for a CPU."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()


def time_sampling(args) -> dict[str, float]:
    """Images/s of SADMDiTPipeline and DiTPipeline on the same 1000-class latent DiT, VAE, scheduler and settings."""
    from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline

    from sadm.models.dit import build_dit

    device = torch.device(args.device)
    preset = args.sample_preset or args.presets[-1]
    transformer = build_dit(preset, args.latent_size, 4, 1000, seed=0).to(device).eval()
    vae = tiny_vae().to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    if dtype != torch.float32:
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    id2label = {i: str(i) for i in range(1000)}  # conditional: guidance with the null class 1000, as DiTPipeline
    pipelines = {
        "sadm": SADMDiTPipeline(transformer=transformer, scheduler=DDPMScheduler.from_config(scheduler.config), vae=vae, id2label=id2label),
        "diffusers": DiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler.from_config(scheduler.config)),
    }  # fmt: skip
    labels = [i % 1000 for i in range(args.sample_batch)]
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for repeat in range(args.sample_repeats + 1):  # round 0 is the warm-up
        for name in list(pipelines) if repeat % 2 else list(pipelines)[::-1]:
            pipeline = pipelines[name]
            pipeline.set_progress_bar_config(disable=True)
            generator = torch.Generator(device=device).manual_seed(0)
            start = time.perf_counter()
            pipeline(
                class_labels=labels,
                guidance_scale=args.guidance_scale,
                num_inference_steps=args.sample_steps,
                generator=generator,
                output_type="np",
            )
            if args.device == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: args.sample_batch / statistics.median(t) for name, t in times.items()}  # images/s


# ------------------------------------------------------------------------------------------------------------ run
def configurations(args) -> list[dict]:
    configs = []
    for preset in args.presets:
        batch = args.batch_size or (32 if preset == "tiny" else 8)
        for space in args.spaces:
            channels, size = (3, args.pixel_size) if space == "pixel" else (4, args.latent_size)
            configs.append(
                {
                    "preset": preset,
                    "space": space,
                    "channels": channels,
                    "size": size,
                    "batch": batch,
                    "num_classes": 10,
                }
            )
    return configs


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores visible{load} (5 min, at the end), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def main(args: argparse.Namespace) -> dict:
    import logging

    logging.disable(logging.WARNING)  # the script's per-run INFO lines would drown the table
    train_sadm = load_train_script()
    configs = configurations(args)
    results = []
    for cfg in configs:
        times: dict[str, list[float]] = {arm: [] for arm in args.arms}
        peaks: dict[str, int] = {arm: 0 for arm in args.arms}
        for repeat in range(args.repeats):
            for arm in args.arms if repeat % 2 == 0 else args.arms[::-1]:  # A B C, C B A, ...: drifts hit all alike
                step_times, peak = (
                    time_bare_arm(cfg, args) if arm == "bare" else time_script_arm(train_sadm, arm, cfg, args)
                )
                times[arm] += step_times
                peaks[arm] = max(peaks[arm], peak)
        median = {arm: statistics.median(t) for arm, t in times.items()}
        results.append({**cfg, "median_s": median, "peak_bytes": peaks})
        print(f"done: {cfg['preset']} {cfg['space']}", file=sys.stderr, flush=True)
    sampling = time_sampling(args)
    logging.disable(logging.NOTSET)

    headline = next(r for r in reversed(results) if r["space"] == "latent") if "latent" in args.spaces else results[-1]
    ratios = {
        key: headline["median_s"][a] / headline["median_s"][b]
        for key, (a, b) in HEADLINE_RATIOS.items()
        if a in headline["median_s"]
    }
    ratios["sampler_over_diffusers"] = sampling["diffusers"] / sampling["sadm"]  # time ratio: >1 means we are slower
    table = format_table(results, args, sampling)
    print(table)
    summary = {
        **ratios,
        "headline": f"{headline['preset']} {headline['space']}",
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "configs": {
            f"{r['preset']} {r['space']}": {
                **{f"{a}_ms": round(1000 * r["median_s"][a], 3) for a in r["median_s"]},
                **{f"{a}_img_per_s": round(r["batch"] / r["median_s"][a], 2) for a in r["median_s"]},
                **{f"{a}_peak_mib": round(r["peak_bytes"][a] / 2**20, 1) for a in r["median_s"]},
                **{f"{a}_over_dsm": round(r["median_s"][a] / r["median_s"]["dsm"], 4) for a in r["median_s"]},
            }
            for r in results
        },
        "sampling_images_per_s": sampling,
    }
    if args.write_docs:
        write_docs(args, table, summary)
    print(json.dumps(summary))
    return summary


def format_table(results: list[dict], args, sampling: dict[str, float]) -> str:
    memory_name = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    lines = [
        f"| config | batch | arm | median step ms | img/s | × bare | × dsm | {memory_name} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"{r['preset']} {r['space']} {r['channels']}x{r['size']}x{r['size']}"
        for arm, seconds in r["median_s"].items():
            lines.append(
                f"| {name} | {r['batch']} | {arm} | {1000 * seconds:.1f} | {r['batch'] / seconds:.1f} | "
                f"{seconds / r['median_s']['bare']:.3f} | {seconds / r['median_s']['dsm']:.3f} | "
                f"{r['peak_bytes'][arm] / 2**20:.0f} |"
            )
    preset = args.sample_preset or args.presets[-1]
    lines += [
        "",
        f"Sampling ({preset}, 4x{args.latent_size}x{args.latent_size} latents, 1000 classes, batch {args.sample_batch}, "
        f"{args.sample_steps} DDPM steps, guidance {args.guidance_scale}):",
        "",
        "| pipeline | images/s |",
        "|---|---|",
        f"| SADMDiTPipeline | {sampling['sadm']:.2f} |",
        f"| diffusers DiTPipeline | {sampling['diffusers']:.2f} |",
    ]
    return "\n".join(lines)


RESULTS_START, RESULTS_END = "<!-- benchmark_speed results start -->", "<!-- benchmark_speed results end -->"
# a CUDA run has a block of its own, so that it never replaces the CPU results (scripts/gpu_check.sh)
GPU_RESULTS_START = "<!-- benchmark_speed gpu results start -->"
GPU_RESULTS_END = "<!-- benchmark_speed gpu results end -->"


def write_docs(args, table: str, summary: dict) -> None:
    """Replace the results block of the markdown file (or append one) with this run's command, machine and table.

    CPU and CUDA runs write separate blocks (`RESULTS_*`, `GPU_RESULTS_*`)."""
    start, end = (GPU_RESULTS_START, GPU_RESULTS_END) if args.device == "cuda" else (RESULTS_START, RESULTS_END)
    path = Path(args.write_docs)
    command = "python scripts/benchmark_speed.py " + " ".join(sys.argv[1:])
    ratios = ", ".join(f"{k} {summary[k]:.3f}" for k in (*HEADLINE_RATIOS, "sampler_over_diffusers") if k in summary)
    block = "\n".join(
        [
            start,
            f"Command: `{command}`",
            "",
            f"Machine: {machine_description(args.device)}; mixed precision: {args.mixed_precision}; "
            f"{time.strftime('%Y-%m-%d')}.",
            "",
            table,
            "",
            f"Headline ({summary['headline']}): {ratios}.",
            end,
        ]
    )
    text = path.read_text() if path.exists() else "# Performance\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main(parse_args())
