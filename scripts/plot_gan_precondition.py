#!/usr/bin/env python
"""Plot a GAN run's discriminator overfitting r_d and its in-training FID against thousands of real images (kimg).

    python scripts/plot_gan_precondition.py --run_dir runs/gan8_none_200 --output docs/benchmarks/gan_precondition.png

The precondition of Diffusion-GAN's data-efficiency claim (issue 15): on little data the plain GAN's discriminator
overfits, r_d = E[sign(D(x_real))] → 1, and the generator's FID gets worse with more steps. Reads what
`scripts/train_diffusion_gan.py` writes: `T_history.json` (rows [generator step, p, T, r_d], one per adjustment of p,
r_d over the last `ada_interval` D steps) and `eval_history.json` (`--eval_steps`: {"step", "fid", ...} per evaluation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

T_HISTORY_NAME = "T_history.json"
EVAL_HISTORY_NAME = "eval_history.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=str, required=True, help="Output folder of a train_diffusion_gan.py run.")
    parser.add_argument(
        "--batch_size", type=int, default=32, help="Global batch of real images per generator step (kimg axis)."
    )
    parser.add_argument(
        "--smooth", type=int, default=25, help="Width of the running mean drawn over r_d (in adjustments of p)."
    )
    parser.add_argument("--title", type=str, default=None, help="Figure title (default: the run folder's name).")
    parser.add_argument("--output", type=str, required=True, help="PNG path to write.")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    for name in (T_HISTORY_NAME, EVAL_HISTORY_NAME):
        if not (run / name).is_file():
            parser.error(f"--run_dir {run} has no {name} (run train_diffusion_gan.py with --eval_steps > 0).")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    return args


def running_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Mean over the last `width` values (fewer at the start), the same length as `values`."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - width, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def plot_precondition(
    t_history: list[list[float]],
    eval_history: list[dict],
    batch_size: int,
    path: str | Path,
    smooth: int = 25,
    title: str | None = None,
) -> None:
    """r_d (left axis, raw and running mean) and FID (right axis, with recall when logged) against kimg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = np.asarray(t_history[1:], dtype=float)  # the first row is the state at step 0 (no r_d measured yet)
    steps, r_d = (rows[:, 0], rows[:, 3]) if len(rows) else (np.zeros(0), np.zeros(0))
    kimg = steps * batch_size / 1000
    figure = Figure(figsize=(7.5, 3.8))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.plot(kimg, r_d, color="tab:orange", alpha=0.25, linewidth=0.6)
    axis.plot(kimg, running_mean(r_d, smooth), color="tab:orange", label=f"r_d (running mean of {smooth})")
    axis.set_xlabel("kimg (thousands of real images shown to D)")
    axis.set_ylabel("r_d = E[sign D(x_real)]; recall", color="tab:orange")
    axis.set_ylim(-1.05, 1.05)
    right = axis.twinx()
    eval_kimg = [record["step"] * batch_size / 1000 for record in eval_history]
    right.plot(eval_kimg, [record["fid"] for record in eval_history], "o-", color="tab:blue", label="FID")
    right.set_ylabel("FID (digit-classifier features)", color="tab:blue")
    right.set_ylim(bottom=0)
    if eval_history and "recall" in eval_history[0]:
        axis.plot(eval_kimg, [r["recall"] for r in eval_history], "s--", color="tab:green", label="recall")
    handles = axis.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    axis.legend(handles=handles, loc="upper center", fontsize=8, ncol=3)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(args: argparse.Namespace) -> None:
    run = Path(args.run_dir)
    t_history = json.loads((run / T_HISTORY_NAME).read_text())
    eval_history = json.loads((run / EVAL_HISTORY_NAME).read_text())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    plot_precondition(t_history, eval_history, args.batch_size, args.output, args.smooth, args.title or run.name)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(parse_args())
