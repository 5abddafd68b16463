#!/usr/bin/env python
"""Train a one-step GAN generator against a timestep-dependent discriminator with Diffusion-GAN's adaptive diffusion.

    accelerate launch scripts/train_diffusion_gan.py --max_train_steps 5000 --output_dir runs/digits-gan

Diffusion-GAN (Wang et al., ICLR 2023, arXiv 2206.02262): real and generated images pass through the same forward
diffusion y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε before D(y, t); the diffusion length T adapts to the discriminator's overfitting
r_d = E[sign(D(y_real, t))]. `--diffusion fixed` (T = T_max) and `--diffusion none` (a plain GAN) are the ablations.

Schedule: every data micro-batch feeds one phase, as diffusers' VQGAN example: `disc_update_ratio` discriminator
optimizer steps, then one generator step (each of `--gradient_accumulation_steps` micro-batches, each inside
`accelerator.accumulate` of the model it steps). The generator phase only takes the class labels of its batches.
A training step (`--max_train_steps`, checkpoints, validation) is one generator step.

Networks fit for small data (docs/BENCHMARKS.md): `--disc_trunk resnet` (residual D with minibatch std and a fully
connected layer over its last 4x4 map), `--generator_layers_per_block 2`, `--ema_kimg 10` (an EMA half-life in
thousands of images), at `--resolution 8` for the 8x8 digits.

The output folder is a diffusers pipeline (`DiffusionGANPipeline`, EMA weights when `--use_ema`) with the
discriminator in `discriminator/`, `T.png` / `T_history.json` (the diffusion length over training) and `checkpoint-N/`
folders beside it (the adaptive diffusion state is in `checkpoint-N/adaptive_diffusion.pt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from sadm.pipelines import pipeline_diffusion_gan
from sadm.pipelines.pipeline_diffusion_gan import DiffusionGANPipeline
from tqdm.auto import tqdm

import sadm
from sadm.accelerate_setup import make_accelerator
from sadm.checkpointing import assert_finite_parameters, check_output_dir, register_model_hooks, save_checkpoint
from sadm.cli import (
    HelpFormatter,
    adamw_from_flags,
    add_data_args,
    add_dataclass_args,
    add_eval_args,
    add_training_args,
    add_validation_args,
    check_optimizer_args,
    data_config_from_args,
    dataclass_from_args,
    eval_config_from_args,
    parse_args_with_config,
)
from sadm.data import collate_fn, load_train_dataset, make_dataloader
from sadm.diffusion_augment import AdaptiveDiffusion
from sadm.diffusion_gan import (
    DiffusionGANConfig,
    build_adaptive_diffusion,
    build_timestep_discriminator,
    diffusion_gan_discriminator_loss,
    diffusion_gan_generator_loss,
    max_p_change,
)
from sadm.evaluation import preserve_rng_state, setup_in_training_evaluation
from sadm.export import copy_pipeline_file, write_model_card
from sadm.frame import (
    ScalarLogger,
    ema_weights,
    evaluate_and_keep_best,
    export_pipeline,
    init_trackers,
    log_preemption_stop,
    resume_train_state,
    run_periodic_jobs,
    save_validation_grid,
    tracker_config,
    validation_labels,
)
from sadm.models.generator import GANGenerator
from sadm.models.pretrained_trunks import INPUT_ADAPTERS
from sadm.models.timestep_discriminator import TRUNKS, TimestepDiscriminator
from sadm.preemption import PreemptionHandler
from sadm.step import BadStepCounter, step_if_finite

logger = get_logger(__name__)

ADAPTIVE_STATE_NAME = "adaptive_diffusion.pt"
T_HISTORY_NAME = "T_history.json"
# logged every step and shown in the progress bar
# --diffusion_gan_<field> for every DiffusionGANConfig field but these (`weight` is the DiT trainer's λ_adv)
DIFFUSION_GAN_PREFIX = "diffusion_gan_"
DIFFUSION_GAN_RENAME = {"mode": "diffusion"}
DIFFUSION_GAN_SKIP = (  # the DiT trainer's λ_adv, its gate and its schedule
    "weight",
    "timestep_weighting",
    "t_threshold",
    "start_step",
    "warmup_steps",
    "grad_ratio",
)
# warn when the whole run cannot move p by more than this (the diffusion would stay near T_min throughout)
MIN_P_CHANGE = 0.1
MONITORS = ("g_loss", "d_loss", "r_d", "p", "T", "d_real_acc", "d_fake_acc", "d_real_logit_mean", "d_fake_logit_mean")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(parser)
    add_training_args(parser)
    # GAN defaults for the generator's optimizer (StyleGAN2: Adam β = (0, 0.99), no clipping) and a GAN-scale EMA
    parser.set_defaults(
        learning_rate=2e-4, adam_beta1=0.0, adam_beta2=0.99, max_grad_norm=0.0, ema_max_decay=0.999, lr_warmup_steps=0
    )
    g = parser.add_argument_group("generator")
    g.add_argument("--latent_dim", type=int, default=64, help="Size of z (and of the mapped code w).")
    g.add_argument("--generator_base_channels", type=int, default=64, help="Width of the generator's last block.")
    g.add_argument(
        "--generator_layers_per_block",
        type=int,
        default=1,
        help="Modulated 3x3 convolutions per resolution (StyleGAN2: 2; 1 keeps the DCGAN-sized generator).",
    )
    g.add_argument(
        "--ema_kimg",
        type=float,
        default=None,
        help="EMA half-life in thousands of real images (StyleGAN2-ADA's auto config: batch·10/32, so 10 at batch 32): "
        "decay 0.5^(batch/(ema_kimg·1000)) per step, ramped in by diffusers' (1+s)/(10+s). None: --ema_max_decay with "
        "the --ema_inv_gamma warm-up.",
    )
    d = parser.add_argument_group("discriminator")
    d.add_argument(
        "--disc_trunk",
        type=str,
        default="conv",
        choices=TRUNKS,
        help="conv, resnet (residual, minibatch std, fully connected over the 4x4 map; --resolution >= 8), vit or "
        "projected (frozen timm features; pair it with --diffusion_gan_preset projected_gan).",
    )
    d.add_argument(
        "--disc_base_channels", type=int, default=64, help="Width of the discriminator's first layer / tokens / heads."
    )
    d.add_argument("--disc_num_layers", type=int, default=3, help="Conv layers or ViT blocks of the discriminator.")
    d.add_argument(
        "--disc_minibatch_std_group_size",
        type=int,
        default=4,
        help="resnet trunk: samples per minibatch-std group (StyleGAN2: 4; 1 turns the statistic off).",
    )
    d.add_argument("--disc_spectral_norm", action=argparse.BooleanOptionalAction, default=False,
                   help="Spectral norm on every trainable layer of the timestep discriminator.")  # fmt: skip
    d.add_argument(
        "--disc_timm_model_name",
        type=str,
        default="resnet18",
        help="Backbone of the projected trunk (random init unless a local path is given).",
    )
    d.add_argument("--disc_timm_pretrained_path", type=str, default=None,
                   help="Local weights file (.safetensors or torch state dict) for that backbone, saved from the timm "
                   "classifier model or its features_only model; checked against the architecture before training.")  # fmt: skip
    d.add_argument("--disc_input_adapter", type=str, default="adapt", choices=list(INPUT_ADAPTERS),
                   help="A pretrained stem whose input channels differ from the images': adapt (timm's adapt_input_conv: "
                   "RGB filters summed for grey), strict (an error) or reinit (an untrained stem that trains with the heads).")  # fmt: skip
    d.add_argument(
        "--disc_timm_input_size", type=int, default=None, help="Resize inputs before the backbone (ProjectedGAN: 224)."
    )
    d.add_argument("--disc_learning_rate", type=float, default=2e-4, help="Discriminator learning rate.")
    d.add_argument("--disc_adam_beta1", type=float, default=0.0, help="Discriminator Adam β1 (StyleGAN2: 0).")
    d.add_argument("--disc_adam_beta2", type=float, default=0.99, help="Discriminator Adam β2 (StyleGAN2: 0.99).")
    # --diffusion adaptive|fixed|none (the config's `mode`) and --diffusion_gan_<field> for every other field;
    # `weight` is the DiT trainer's λ_adv and has no meaning here
    add_dataclass_args(
        parser, DiffusionGANConfig, DIFFUSION_GAN_PREFIX, rename=DIFFUSION_GAN_RENAME, skip=DIFFUSION_GAN_SKIP
    )
    add_validation_args(parser, project_name="sadm-diffusion-gan")
    add_eval_args(parser, diffusion_sampling=False)  # one-step generator: no sampling steps, no guidance
    args = parse_args_with_config(parser, argv)

    if args.resolution < 4 or args.resolution & (args.resolution - 1):
        parser.error(f"--resolution must be a power of two >= 4 for the generator, got {args.resolution}")
    if args.gradient_accumulation_steps < 1:
        parser.error(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.latent_dim < 1:
        parser.error(f"--latent_dim must be >= 1, got {args.latent_dim}")
    if args.generator_layers_per_block < 1:
        parser.error(f"--generator_layers_per_block must be >= 1, got {args.generator_layers_per_block}")
    if args.disc_trunk == "resnet" and args.resolution < 8:
        parser.error(
            f"--disc_trunk resnet halves the image down to 4x4 and needs --resolution >= 8, got {args.resolution}"
        )
    if args.disc_minibatch_std_group_size < 1:
        parser.error(f"--disc_minibatch_std_group_size must be >= 1, got {args.disc_minibatch_std_group_size}")
    if args.disc_timm_pretrained_path is not None:
        if args.disc_trunk != "projected":
            parser.error(f"--disc_timm_pretrained_path is read by --disc_trunk projected, not {args.disc_trunk}")
        if not os.path.isfile(args.disc_timm_pretrained_path):
            parser.error(f"--disc_timm_pretrained_path {args.disc_timm_pretrained_path} is not a file")
    if args.ema_kimg is not None and args.ema_kimg <= 0:
        parser.error(f"--ema_kimg (the EMA half-life in kimg) must be > 0, got {args.ema_kimg}")
    if args.ema_kimg is not None and not args.use_ema:
        parser.error("--ema_kimg sets the EMA half-life and needs --use_ema (not --no-use_ema)")
    data_config_from_args(args, parser), eval_config_from_args(args, parser)  # validate before any work
    check_optimizer_args(args, parser)
    try:
        diffusion_gan_config(args)
    except ValueError as error:
        parser.error(diffusion_gan_flag_error(error))
    return args


def diffusion_gan_config(args: argparse.Namespace) -> DiffusionGANConfig:
    """The effective `DiffusionGANConfig` of the flags (`args` itself is never changed)."""
    return dataclass_from_args(
        DiffusionGANConfig, args, DIFFUSION_GAN_PREFIX, rename=DIFFUSION_GAN_RENAME, skip=DIFFUSION_GAN_SKIP
    )


def diffusion_gan_flag_error(error: ValueError) -> str:
    """A `DiffusionGANConfig` error prefixed with the flag(s) of the field(s) it names, in the order they appear
    (`--diffusion_gan_ada_kimg: ada_kimg=0.0 must be > 0.`)."""
    message = str(error)
    named = []
    for f in dataclasses.fields(DiffusionGANConfig):
        match = re.search(rf"(?<![\w-]){re.escape(f.name)}\b", message)
        if match and f.name not in DIFFUSION_GAN_SKIP:
            named.append((match.start(), "--" + DIFFUSION_GAN_RENAME.get(f.name, DIFFUSION_GAN_PREFIX + f.name)))
    if not named:
        return f"Diffusion-GAN flags (--diffusion_gan_* / --diffusion): {message}"
    return f"{' / '.join(flag for _, flag in sorted(named))}: {message}"


def p_budget_warning(config: DiffusionGANConfig, total_batch: int, max_train_steps: int) -> str | None:
    """A warning when the run is too short for p to move by more than `MIN_P_CHANGE` (None otherwise, or when p does
    not adapt): at most total_batch·D steps/(ada_kimg·1000), with max_train_steps·disc_update_ratio D steps."""
    if config.mode != "adaptive":
        return None
    d_steps = max_train_steps * config.disc_update_ratio
    change = max_p_change(total_batch, d_steps, config.ada_kimg)
    if change > MIN_P_CHANGE:
        return None
    largest_T = config.t_min + round(min(change, 1.0) * (config.t_max - config.t_min))
    return (
        f"--max_train_steps {max_train_steps} x {config.disc_update_ratio} D step(s) x batch {total_batch} with "
        f"--diffusion_gan_ada_kimg {config.ada_kimg:g}: p can move by at most {change:.3g} (<= {MIN_P_CHANGE}) in this "
        f"run, so T stays <= {largest_T} (T_min {config.t_min}, T_max {config.t_max}) and the adaptive diffusion can "
        "barely act. Raise --max_train_steps or lower --diffusion_gan_ada_kimg "
        "(max p change = batch·D steps/(ada_kimg·1000))."
    )


# StyleGAN2-ADA (`training_loop.py`): ema_beta = 0.5 ** (batch / ema_nimg), a half-life counted in images.
def ema_decay_from_half_life(ema_kimg: float, total_batch: int) -> float:
    """Per-step EMA decay β whose weight on the current weights halves every `ema_kimg`·1000 real images:
    β^(ema_kimg·1000/total_batch) = 0.5."""
    if ema_kimg <= 0:
        raise ValueError(f"ema_kimg={ema_kimg} must be > 0.")
    return 0.5 ** (total_batch / (ema_kimg * 1000))


def build_discriminator(
    args, config: DiffusionGANConfig, num_channels: int, num_classes: int
) -> TimestepDiscriminator:
    return build_timestep_discriminator(
        config,
        num_channels,
        args.resolution,
        num_classes,
        trunk=args.disc_trunk,
        base_channels=args.disc_base_channels,
        num_layers=args.disc_num_layers,
        minibatch_std_group_size=args.disc_minibatch_std_group_size,
        spectral_norm=args.disc_spectral_norm,
        timm_model_name=args.disc_timm_model_name,
        timm_pretrained_path=args.disc_timm_pretrained_path,
        timm_input_size=args.disc_timm_input_size,
        input_adapter=args.disc_input_adapter,
    )


def register_diffusion_hooks(accelerator, diffusion: AdaptiveDiffusion, t_history: list) -> None:
    """Save the adaptive diffusion state (p, T, t-table, running r_d, table RNG) and the T history with every checkpoint."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            torch.save(diffusion.state_dict(), os.path.join(output_dir, ADAPTIVE_STATE_NAME))
            with open(os.path.join(output_dir, T_HISTORY_NAME), "w") as f:
                json.dump(t_history, f)

    def load_hook(models, input_dir):
        state = torch.load(os.path.join(input_dir, ADAPTIVE_STATE_NAME), map_location="cpu", weights_only=True)
        diffusion.load_state_dict(state)
        with open(os.path.join(input_dir, T_HISTORY_NAME)) as f:
            t_history[:] = json.load(f)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def set_requires_grad(params: list[torch.nn.Parameter], flag: bool) -> None:
    for param in params:
        param.requires_grad_(flag)


# Diffusion-GAN (arXiv 2206.02262) eq. 2, generator side, on diffused generated samples.
def generator_phase_loss(
    generator, discriminator, diffusion: AdaptiveDiffusion, z, labels, config: DiffusionGANConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_G(D(y_g, t)) with y_g the diffused G(z) (logistic: softplus(−D)), `[B]`, and its statistics.

    D is frozen by the caller; gradients reach G through y_g."""
    x_fake = generator(z, class_labels=labels).sample  # [B, C, H, W]
    return diffusion_gan_generator_loss(discriminator, diffusion, x_fake, labels, config)


# Diffusion-GAN (arXiv 2206.02262) eq. 2, discriminator side, with StyleGAN2's lazy R1.
def discriminator_phase_loss(
    generator, discriminator, diffusion: AdaptiveDiffusion, x_real, z, labels, config: DiffusionGANConfig, d_step: int
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """L_D on diffused reals and diffused detached fakes G(z) (+ lazy R1, taken w.r.t. the clean reals through the
    noising, as the official code), `[B]`, its statistics and the real logits."""
    with torch.no_grad():  # fakes are detached for D
        x_fake = generator(z, class_labels=labels).sample  # [B, C, H, W]
    return diffusion_gan_discriminator_loss(discriminator, diffusion, x_real, x_fake, labels, config, d_step)


def plot_T(history: list[list[float]], config: DiffusionGANConfig, path: str) -> None:
    """T (left axis) and r_d against its target (right axis) over generator steps, written with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, _, lengths, r_d = zip(*history) if history else ((), (), (), ())
    figure = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.step(steps, lengths, where="post", color="tab:blue", label="T")
    axis.set_xlabel("generator step")
    axis.set_ylabel("diffusion length T", color="tab:blue")
    axis.set_ylim(bottom=0)
    right = axis.twinx()
    right.plot(steps, r_d, color="tab:orange", alpha=0.7, label="r_d")
    right.axhline(config.target, color="tab:orange", linestyle="--", linewidth=0.8)
    right.set_ylabel("r_d (dashed: target)", color="tab:orange")
    right.set_ylim(-1.05, 1.05)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def mean(values: list[float | torch.Tensor]) -> float:
    """Mean of logged statistics (0-d tensors are synced to the host here, once per logged value)."""
    return float(sum(values) / len(values)) if values else math.nan


def main(
    args: argparse.Namespace,
    on_step: Callable[[int], None] | None = None,
    preemption: PreemptionHandler | None = None,
) -> None:
    """Train and export. `on_step(global_step)` is called after every generator (optimizer) step. When `preemption`
    (entered by the caller) reports a SIGTERM/SIGUSR1, the run checkpoints at that step and returns without exporting."""
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    config = diffusion_gan_config(args)  # validated by parse_args
    ratio = config.disc_update_ratio
    accumulation = args.gradient_accumulation_steps

    # ---- data: the class count and names come from the data and go into the export
    dataset = load_train_dataset(data_config_from_args(args))
    num_classes, id2label = dataset.num_classes, dataset.id2label
    logger.info(f"{len(dataset)} training images, {dataset.num_channels} channel(s), {num_classes or 'no'} classes")

    # ---- models, adaptive diffusion, optimizers, EMA
    generator = GANGenerator(
        out_channels=dataset.num_channels,
        sample_size=args.resolution,
        latent_dim=args.latent_dim,
        base_channels=args.generator_base_channels,
        num_classes=num_classes or None,
        layers_per_block=args.generator_layers_per_block,
    )
    discriminator = build_discriminator(args, config, dataset.num_channels, num_classes)
    diffusion = build_adaptive_diffusion(config, seed=args.seed).to(accelerator.device)
    logger.info(f"Diffusion-GAN: {config}")

    ema = None
    if args.use_ema:
        # --ema_kimg: a half-life in images per generator step (one global batch of fakes each)
        total_batch = args.train_batch_size * accelerator.num_processes * accumulation
        half_life = args.ema_kimg is not None
        ema = EMAModel(
            generator.parameters(),
            decay=ema_decay_from_half_life(args.ema_kimg, total_batch) if half_life else args.ema_max_decay,
            use_ema_warmup=not half_life,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=GANGenerator,
            model_config=generator.config,
        )
        ema.to(accelerator.device)

    # the trainable discriminator parameters: the projected trunk's backbone stays frozen throughout
    d_params = [p for p in discriminator.parameters() if p.requires_grad]
    g_optimizer = adamw_from_flags(
        args, generator.parameters(), args.learning_rate, (args.adam_beta1, args.adam_beta2)
    )
    d_optimizer = adamw_from_flags(
        args, d_params, args.disc_learning_rate, (args.disc_adam_beta1, args.disc_adam_beta2)
    )

    train_dataloader = make_dataloader(
        dataset, args.train_batch_size, args.seed, args.dataloader_num_workers, collate_fn
    )
    # an optimizer-step slot = `accumulation` micro-batches; a cycle = `ratio` D slots then one G slot
    slots_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / accumulation)
    max_train_steps = args.max_train_steps  # derived values stay out of `args`
    if max_train_steps is None:
        max_train_steps = max(args.num_train_epochs * slots_per_epoch // (ratio + 1), 1)
    g_lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=g_optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    d_lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=d_optimizer,
        num_warmup_steps=args.lr_warmup_steps * ratio * accelerator.num_processes,
        num_training_steps=max_train_steps * ratio * accelerator.num_processes,
    )
    generator, discriminator, g_optimizer, d_optimizer, train_dataloader, g_lr_scheduler, d_lr_scheduler = (
        accelerator.prepare(
            generator, discriminator, g_optimizer, d_optimizer, train_dataloader, g_lr_scheduler, d_lr_scheduler
        )
    )
    register_model_hooks(accelerator, ["generator", "discriminator"], ema=ema, ema_name="generator_ema")
    t_history: list[list[float]] = []  # [generator step, p, T, r_d] at the start and after each adjustment of p
    register_diffusion_hooks(accelerator, diffusion, t_history)
    slots_per_epoch = math.ceil(len(train_dataloader) / accumulation)
    num_epochs = math.ceil(max_train_steps * (ratio + 1) / slots_per_epoch)
    unwrapped_generator = accelerator.unwrap_model(generator)
    unwrapped_discriminator = accelerator.unwrap_model(discriminator)

    if accelerator.is_main_process:
        effective = {**vars(args), "max_train_steps": max_train_steps}
        init_trackers(
            accelerator,
            args.tracker_project_name,
            args.run_name,
            tracker_config(effective, {"diffusion_gan": config}),
        )

    # ---- resume: the next slot after `global_step` completed cycles is global_step·(ratio + 1)
    global_step, first_epoch, skip_batches, bad_steps = 0, 0, 0, None
    train_state = resume_train_state(accelerator, args.output_dir, args.resume_from_checkpoint)
    if train_state is not None:
        global_step, bad_steps = train_state["global_step"], train_state.get("bad_steps")
        next_slot = global_step * (ratio + 1)
        first_epoch = next_slot // slots_per_epoch
        skip_batches = (next_slot % slots_per_epoch) * accumulation
    if not t_history:
        t_history.append([global_step, diffusion.p, diffusion.T, diffusion.r_d])
    num_adjustments = diffusion.num_updates // diffusion.ada_interval
    # ---- in-training evaluation: feature network and reference statistics, once (None with --eval_steps 0)
    evaluator = setup_in_training_evaluation(
        eval_config_from_args(args), dataset, accelerator, args.output_dir, start_step=global_step
    )

    total_batch = args.train_batch_size * accelerator.num_processes * accumulation
    logger.info(
        f"Generator steps {max_train_steps} ({ratio} D step(s) each), total batch {total_batch}, "
        f"epochs {num_epochs}, starting at step {global_step}"
    )
    budget_warning = p_budget_warning(config, total_batch, max_train_steps)
    if budget_warning is not None:
        logger.warning(budget_warning)
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    log_scalars = ScalarLogger(accelerator, total_batch, start_step=global_step)
    bad_steps = BadStepCounter(args.max_bad_steps, bad_steps)  # skipped non-finite steps per model
    window_real_logits: list[torch.Tensor] = []  # real logits of the current D optimizer step (all micro-batches)
    d_stats: list[dict[str, float]] = []  # per D micro-batch since the last log
    g_stats: list[dict[str, float]] = []  # per G micro-batch since the last log

    def optimizer_step(name: str, model, optimizer, lr_scheduler) -> bool:
        """Clip, then step unless the gradient is non-finite (counted per model, stops after --max_bad_steps in a row)."""
        finite, _ = step_if_finite(accelerator, model, optimizer, args.max_grad_norm, lr_scheduler)
        bad_steps.update(name, finite, global_step)
        return finite

    def run_validation(step: int) -> None:
        with ema_weights(ema, unwrapped_generator.parameters(), unwrapped_generator):
            pipeline = DiffusionGANPipeline(gan=unwrapped_generator, id2label=id2label)
            pipeline.set_progress_bar_config(disable=True)
            images = pipeline(
                class_labels=validation_labels(args.num_validation_images, num_classes),
                batch_size=args.num_validation_images,
                generator=torch.Generator(device=accelerator.device).manual_seed(args.seed),
                output_type="np",
            ).images
        save_validation_grid(accelerator, images, args.output_dir, step)

    def run_evaluation(step: int) -> None:
        """Measure the EMA generator on every process (sharded, collective), log eval/<metric>, keep the best in best/.

        The RNG states are restored afterwards: a run with evaluation trains exactly as one without."""
        with preserve_rng_state(accelerator), ema_weights(ema, unwrapped_generator.parameters(), unwrapped_generator):
            pipeline = DiffusionGANPipeline(gan=unwrapped_generator, id2label=id2label)

            def write_best(folder: str) -> None:
                pipeline.save_pretrained(folder)
                copy_pipeline_file(pipeline_diffusion_gan.__file__, folder)

            evaluate_and_keep_best(
                accelerator, evaluator, step, pipeline, write_best, {"generator": unwrapped_generator}
            )
        accelerator.wait_for_everyone()

    def log_statistics(step: int) -> None:
        """Log the means of the statistics gathered since the last log (the building blocks return detached 0-d
        tensors; `mean` syncs them here, once per value and log)."""
        logs = {
            "g_loss": mean([s["g_adv_loss"] for s in g_stats]),
            **{k: mean([s[k] for s in d_stats]) for k in MONITORS if k.startswith("d_")},
            **diffusion.stats(),
            "lr": g_lr_scheduler.get_last_lr()[0],
            "disc_lr": d_lr_scheduler.get_last_lr()[0],
            **bad_steps.stats(),
        }
        r1 = [s["r1"] for s in d_stats if not math.isnan(s["r1"])]
        if r1:
            logs["r1"] = mean(r1)
        if ema is not None:
            logs["ema_decay"] = ema.cur_decay_value
        g_stats.clear()
        d_stats.clear()
        logs = log_scalars(logs, step)  # averaged over the processes, with img/s and s/step
        progress.set_postfix({k: f"{logs[k]:.4g}" for k in MONITORS})

    # ---- loop
    generator.train()
    discriminator.train()
    stop = False  # a SIGTERM/SIGUSR1 agreed by all processes: checkpoint at this step and return (sadm/preemption.py)
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        start = skip_batches if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, start) if start else train_dataloader
        for index, batch in enumerate(batches, start=start):
            slot = epoch * slots_per_epoch + index // accumulation  # global optimizer-step slot
            cycle, position = divmod(slot, ratio + 1)
            x_real = batch["pixel_values"]  # [B, C, H, W] in [-1, 1]
            labels = batch["class_labels"]  # [B] or None

            if position < ratio:
                # ---- discriminator phase: diffused reals vs diffused detached fakes (+ lazy R1)
                with accelerator.accumulate(discriminator):
                    d_step = cycle * ratio + position  # index of this D optimizer step, for the lazy R1
                    z = torch.randn(x_real.shape[0], args.latent_dim, device=x_real.device)
                    loss, stats, real_logits = discriminator_phase_loss(
                        unwrapped_generator, discriminator, diffusion, x_real, z, labels, config, d_step
                    )
                    accelerator.backward(loss.mean())
                    window_real_logits.append(real_logits)
                    d_stats.append(stats)
                    if accelerator.sync_gradients:
                        if optimizer_step("discriminator", discriminator, d_optimizer, d_lr_scheduler):
                            # once per D optimizer step, on the global batch of real logits: r_d -> p -> T
                            diffusion.update(accelerator.gather(torch.cat(window_real_logits)))
                        window_real_logits.clear()
                    d_optimizer.zero_grad(set_to_none=True)
                continue

            # ---- generator phase: D frozen, gradients reach G through the diffused fakes
            set_requires_grad(d_params, False)
            with accelerator.accumulate(generator):
                z = torch.randn(x_real.shape[0], args.latent_dim, device=x_real.device)
                loss, stats = generator_phase_loss(generator, unwrapped_discriminator, diffusion, z, labels, config)
                accelerator.backward(loss.mean())
                g_stats.append(stats)
                if accelerator.sync_gradients:
                    optimizer_step("generator", generator, g_optimizer, g_lr_scheduler)
                g_optimizer.zero_grad(set_to_none=True)
            set_requires_grad(d_params, True)
            if not accelerator.sync_gradients:
                continue

            if ema is not None:
                ema.step(unwrapped_generator.parameters())
            global_step += 1
            progress.update(1)
            if on_step is not None:
                on_step(global_step)
            if diffusion.num_updates // diffusion.ada_interval != num_adjustments:
                num_adjustments = diffusion.num_updates // diffusion.ada_interval
                t_history.append([global_step, diffusion.p, diffusion.T, diffusion.r_d])
            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                log_statistics(global_step)

            stop = preemption is not None and preemption.should_stop(accelerator) and global_step < max_train_steps
            if stop or global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                assert_finite_parameters({"generator": unwrapped_generator, "discriminator": unwrapped_discriminator})
                save_checkpoint(
                    accelerator,
                    args.output_dir,
                    global_step,
                    {"epoch": epoch, "bad_steps": bad_steps.state_dict()},
                    args.checkpoints_total_limit,
                )
            if stop:
                break
            run_periodic_jobs(
                accelerator, global_step, args.validation_steps, run_validation, args.eval_steps, run_evaluation
            )
            if global_step >= max_train_steps:
                break
        if stop or global_step >= max_train_steps:
            break
    if stop:
        log_preemption_stop(accelerator, preemption, args.output_dir, global_step)
        accelerator.end_training()
        return

    # ---- export: a pipeline folder with EMA weights, discriminator/, T.png, a model card and a pipeline.py
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped_generator.parameters())
        assert_finite_parameters({"generator": unwrapped_generator, "discriminator": unwrapped_discriminator})
        pipeline = DiffusionGANPipeline(gan=unwrapped_generator.eval(), id2label=id2label)

        def write(folder: str) -> None:
            pipeline.save_pretrained(folder)
            unwrapped_discriminator.save_pretrained(os.path.join(folder, "discriminator"))
            copy_pipeline_file(pipeline_diffusion_gan.__file__, folder)
            with open(os.path.join(folder, T_HISTORY_NAME), "w") as f:
                json.dump(t_history, f)
            plot_T(
                t_history + [[global_step, diffusion.p, diffusion.T, diffusion.r_d]],
                config,
                os.path.join(folder, "T.png"),
            )
            data = args.dataset_name or args.train_data_dir or "the embedded scikit-learn digits (8x8, 10 classes)"
            disc = unwrapped_discriminator.config
            write_model_card(
                folder,
                "One-step GAN generator trained with Diffusion-GAN (sadm)",
                [
                    f"- Data: {data}, {len(dataset)} images at {args.resolution}px, {num_classes or 'no'} classes.",
                    f"- Generator: `GANGenerator`, {sum(p.numel() for p in unwrapped_generator.parameters()) / 1e6:.2f}M "
                    f"parameters, latent_dim {args.latent_dim}; EMA: {args.use_ema}"
                    + (f" (half-life {args.ema_kimg:g} kimg)." if args.ema_kimg is not None else "."),
                    f"- Discriminator (`discriminator/`): `TimestepDiscriminator`, trunk {disc.trunk}, t-conditioned "
                    f"{disc.t_conditioning}, class-conditional {disc.num_classes is not None}.",
                    f"- Diffusion-GAN: preset {config.preset}, diffusion {config.mode}, loss {config.loss_type}, "
                    f"R1 γ {config.r1_gamma}, T in [{config.t_min}, {config.t_max}], final p {diffusion.p:.4f} and "
                    f"T {diffusion.T} (`T.png`, `T_history.json`); {global_step} generator steps, {ratio} D step(s) "
                    f"each, batch {total_batch}.",
                    f"- Sampler sadm {sadm.__version__}: `DiffusionGANPipeline` (one forward pass). Loading needs sadm "
                    "installed: the generator class is `sadm.models.generator.GANGenerator`, which `pipeline.py` "
                    "does not define.",
                ],
                loads_without_sadm=False,
            )

        export_pipeline(args.output_dir, write)
    accelerator.end_training()


if __name__ == "__main__":
    cli_args = parse_args()
    with PreemptionHandler(timeout_s=cli_args.ddp_timeout) as handler:  # the default handlers are back afterwards
        main(cli_args, preemption=handler)
