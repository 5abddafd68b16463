#!/usr/bin/env python
"""Train or fine-tune a DiT with the denoising loss plus, optionally, SADM's structure loss and a Diffusion-GAN term.

    accelerate launch scripts/train_sadm.py --model tiny --max_train_steps 2000 --output_dir runs/digits

With `--structure_loss_weight 0 --gan_loss_weight 0` this is a plain DiT trainer. The output folder is a diffusers
pipeline (`SADMDiTPipeline`, EMA weights when `--use_ema`) with `checkpoint-N/` folders beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from sadm.pipelines import pipeline_sadm_dit
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline
from tqdm.auto import tqdm

import sadm
from sadm.accelerate_setup import check_fsdp, make_accelerator
from sadm.checkpointing import (
    assert_finite_parameters,
    check_output_dir,
    full_state_dict,
    register_model_hooks,
    save_checkpoint,
)
from sadm.cli import (
    LR_SCHEDULERS,
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
from sadm.diffusion_gan import DiffusionGANConfig, build_adaptive_diffusion, build_timestep_discriminator
from sadm.disc_augment import DiffAugment
from sadm.evaluation import preserve_rng_state, setup_in_training_evaluation
from sadm.export import copy_pipeline_file, write_model_card
from sadm.finetune import (
    DEFAULT_LORA_TARGETS,
    LABEL_INITS,
    TRAINABLE_MODES,
    label_spread,
    merged_dit,
    optimizer_param_groups,
    parse_label_map,
    pretrained_id2label,
    relabel_for_data,
    setup_trainable,
    trainable_parameters,
)
from sadm.frame import (
    ScalarLogger,
    ema_weights,
    evaluate_and_keep_best,
    export_pipeline,
    init_trackers,
    log_preemption_stop,
    make_adamw,
    resume_train_state,
    run_periodic_jobs,
    save_validation_grid,
    tracker_config,
    validation_labels,
)
from sadm.latents import (
    build_latent_cache,
    check_noise_schedule,
    check_transformer_fits_latents,
    check_vae_fits,
    collate_latents,
    describe_latents,
    load_latent_cache,
    load_vae,
    pretrained_components,
    vae_downsample_factor,
)
from sadm.models.dit import DIT_PRESETS, build_dit, check_dit_fits, disable_label_dropout, float32_norms
from sadm.models.dit_trunk import (
    DiTStructureEncoder,
    DiTTimestepDiscriminator,
    check_dit_trunk,
    default_trunk_blocks,
    freeze_dit_trunk,
    load_dit_trunk,
)
from sadm.models.pretrained_trunks import INPUT_ADAPTERS
from sadm.models.structure_discriminator import BACKBONES, StructureDiscriminator
from sadm.objective import DenoisingObjective
from sadm.preemption import PreemptionHandler
from sadm.step import BadStepCounter, DenoiserTrainStep, GuardedOptimizerStep
from sadm.structure import StructureConfig
from sadm.terms import AdversarialTerm, DiffusionGANTerm, StructureTerm

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(parser)
    add_training_args(parser)
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        type=str,
        default="tiny",
        choices=sorted(DIT_PRESETS),
        help="DiT preset (ignored with a config/pretrained).",
    )
    g.add_argument(
        "--model_config_name_or_path", type=str, default=None, help="A DiTTransformer2DModel config (json or folder)."
    )
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A pipeline folder or hub id with a transformer/ subfolder to fine-tune: a previous export, or the "
        "facebook/DiT-XL-2-256 layout (transformer/, vae/, scheduler/; its VAE makes the run latent).",
    )
    g.add_argument(
        "--vae_name_or_path",
        type=str,
        default=None,
        help="An AutoencoderKL (folder, hub id, or a pipeline with a vae/): train on its latents. Default: the "
        "pretrained pipeline's vae/ if it has one, else pixel space.",
    )
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode the data once (posterior moments of each image and of its flip) into --data_cache_dir, or "
        "<output_dir>/latent_cache, each process its shard; memory-mapped at training time. A fresh latent is still "
        "sampled every step.",
    )
    g.add_argument(
        "--latent_cache_dtype",
        type=str,
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="How --cache_latents stores the moments (float16/bfloat16: half the disk and page cache; read back as "
        "float32).",
    )
    g.add_argument(
        "--learn_sigma", action="store_true", help="Output 2C channels and train the improved-DDPM hybrid loss."
    )
    g.add_argument(
        "--class_dropout_prob", type=float, default=0.1, help="Label dropout for classifier-free guidance (DiT: 0.1)."
    )
    g.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction", "sample"],
                   help="What the DiT regresses: ε (DiT), v or x₀.")  # fmt: skip
    g.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR-γ loss weighting (5.0 recommended); off by default."
    )
    g.add_argument(
        "--num_train_timesteps", type=int, default=1000, help="DDPM steps (DiT: 1000, linear β 1e-4 → 0.02)."
    )
    g.add_argument(
        "--vlb_weight", type=float, default=0.001, help="λ of L_simple + λ·L_vlb when σ is learned (iDDPM: 0.001)."
    )
    g.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory."
    )
    g.add_argument("--per_sample_noise", action="store_true",
                   help="Draw each sample's label dropout, timestep and noise (and the Diffusion-GAN term's) from generators "
                   "seeded by (seed, sample): the run is then the same on any number of processes or accumulation steps.")  # fmt: skip
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the DiT (in place; same weights and outputs).")  # fmt: skip
    f = parser.add_argument_group("fine-tuning (new label sets, parameter-efficient training; docs/FINETUNING.md)")
    f.add_argument("--label_init", type=str, default=None, choices=list(LABEL_INITS),
                   help="Give the pretrained model a new label table for the data's classes: random rows, the mean of the "
                   "old class rows, or --label_map (unmapped: the mean). The null row is kept. Default: keep the table "
                   "(the class counts must match).")  # fmt: skip
    f.add_argument("--label_map", type=str, default=None,
                   help="With --label_init map: `new_name=old_id,...` or a JSON file {new name: old id or old name}.")  # fmt: skip
    f.add_argument("--trainable", type=str, default="full", choices=list(TRAINABLE_MODES),
                   help="full: every weight; difffit: biases, norms, label tables and per-block scales γ (DiffFit); "
                   "lora: peft LoRA adapters + label tables. Exports are merged into a plain DiT.")  # fmt: skip
    f.add_argument("--label_learning_rate", type=float, default=None,
                   help="LR of the label tables alone. Default with --label_init: the pretrained class rows' spread / "
                   "100, so that Adam can move the new rows as far apart in ~100 steps (at the weights' LR new classes "
                   "were not learned in 400 steps: docs/FINETUNING.md); otherwise --learning_rate.")  # fmt: skip
    f.add_argument("--lora_rank", type=int, default=8, help="LoRA rank r.")
    f.add_argument("--lora_alpha", type=float, default=None, help="LoRA α (scale α/r); default: the rank.")
    f.add_argument("--lora_target_modules", type=str, default=",".join(DEFAULT_LORA_TARGETS),
                   help="Comma-separated module-name suffixes that get LoRA adapters (default: attention q/k/v/out, MLP).")  # fmt: skip
    v = add_validation_args(parser, project_name="sadm")
    v.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale for validation images.")
    v.add_argument("--num_inference_steps", type=int, default=100, help="Sampling steps for validation images.")
    add_eval_args(parser, diffusion_sampling=True)
    # SADM: StructureConfig fields as --structure_* flags (λ is --structure_loss_weight)
    add_dataclass_args(parser, StructureConfig, "structure_", STRUCTURE_FLAGS)
    d = parser.add_argument_group("discriminators (structure and timestep)")
    d.add_argument("--disc_backbone", type=str, default="conv", choices=[*BACKBONES, "dit"],
                   help="Structure discriminator backbone (conv: compact, spectral norm; timm: --disc_timm_*, random init "
                   "unless --disc_timm_pretrained_path; transformers: --disc_transformers_path or _config; "
                   "dit: pooled features of a frozen pretrained DiT, --disc_trunk_*).")  # fmt: skip
    d.add_argument("--disc_embed_dim", type=int, default=128, help="Structure embedding size.")
    d.add_argument("--disc_base_channels", type=int, default=64, help="Width of the conv/ViT discriminators.")
    d.add_argument("--structure_disc_spectral_norm", action=argparse.BooleanOptionalAction, default=True, help="Spectral norm in the structure encoder.")  # fmt: skip
    d.add_argument(
        "--disc_timm_model_name", type=str, default="resnet18", help="timm backbone name (--disc_backbone timm)."
    )
    d.add_argument("--disc_timm_pretrained_path", type=str, default=None,
                   help="Local weights file (.safetensors or torch state dict) of --disc_timm_model_name for the "
                   "structure discriminator (e.g. from scripts/train_feature_network.py); checked before training.")  # fmt: skip
    d.add_argument("--disc_transformers_path", type=str, default=None,
                   help="Local transformers vision model folder (save_pretrained: ViT, Dinov2, ConvNext, ...) for "
                   "--disc_backbone transformers.")  # fmt: skip
    d.add_argument(
        "--disc_transformers_config",
        type=str,
        default=None,
        help="JSON file of a transformers vision config (random init).",
    )
    d.add_argument("--disc_freeze_backbone", action="store_true", help="Freeze the timm/transformers backbone.")
    d.add_argument("--disc_head", type=str, default=None, choices=["linear", "mlp", "orthonormal"],
                   help="Structure encoder head: the backbone's own when unset (linear for conv/vit/timm/transformers, "
                   "with spectral norm per --structure_disc_spectral_norm; mlp for dit), or orthonormal (a projection "
                   "with orthonormal rows: the low-capacity adversarial head over a frozen backbone).")  # fmt: skip
    d.add_argument("--disc_input_adapter", type=str, default="adapt", choices=list(INPUT_ADAPTERS),
                   help="Pretrained timm/transformers trunks of both discriminators whose stem was trained on other input "
                   "channels than the discriminator input (RGB vs 1-channel digits or 4-channel latents): adapt (timm's "
                   "adapt_input_conv: grey = summed RGB filters; for latents a heuristic, not a latent-trained stem), "
                   "strict (an error), reinit (an untrained stem, trained even when the backbone is frozen). For latents, "
                   "--disc_input pixel decodes instead.")  # fmt: skip
    d.add_argument(
        "--disc_class_conditional", action="store_true", help="Condition the structure embedding on the class."
    )
    d.add_argument("--disc_pretrained_path", type=str, default=None,
                   help="Warm-start the structure discriminator from a saved one (e.g. a previous export's discriminator/).")  # fmt: skip
    d.add_argument("--disc_learning_rate", type=float, default=2e-4, help="Discriminators' learning rate.")
    d.add_argument("--disc_adam_beta1", type=float, default=0.5, help="GAN practice: β1 = 0.5.")
    d.add_argument("--disc_adam_beta2", type=float, default=0.999, help="Discriminators' Adam β2.")
    d.add_argument("--disc_adam_weight_decay", type=float, default=0.0, help="Discriminators' weight decay.")
    d.add_argument("--disc_adam_epsilon", type=float, default=1e-8, help="Discriminators' Adam ε.")
    d.add_argument(
        "--disc_lr_scheduler",
        type=str,
        default=None,
        choices=LR_SCHEDULERS,
        help="diffusers' get_scheduler name for the discriminators' LR, stepped with every finite "
        "discriminator step (None: a constant LR, and no scheduler state in the checkpoints).",
    )
    d.add_argument(
        "--grad_ratio_logging_steps",
        type=int,
        default=100,
        help="Every N steps log grad_ratio_<term>: the norm of each adversarial term's gradient at the denoiser's output "
        "over the denoising loss's (one extra backward through its discriminator); 0 disables it.",
    )
    d.add_argument(
        "--disc_lr_warmup_steps", type=int, default=0, help="Warm-up discriminator steps of --disc_lr_scheduler."
    )
    # Diffusion-GAN term: DiffusionGANConfig fields as --diffusion_gan_* flags (λ_adv is --gan_loss_weight)
    add_dataclass_args(parser, DiffusionGANConfig, "diffusion_gan_", GAN_FLAGS)
    d.add_argument("--gan_disc_trunk", type=str, default="conv", choices=["conv", "vit", "projected", "dit"],
                   help="Timestep discriminator trunk (dit: a frozen pretrained DiT at the matched noise level, --disc_trunk_*).")  # fmt: skip
    d.add_argument("--gan_disc_timm_model_name", type=str, default="resnet18",
                   help="timm backbone of --gan_disc_trunk projected (frozen; random init unless --gan_disc_timm_pretrained_path).")  # fmt: skip
    d.add_argument("--gan_disc_timm_pretrained_path", type=str, default=None,
                   help="Local weights file of --gan_disc_timm_model_name for the projected timestep discriminator.")  # fmt: skip
    d.add_argument("--gan_disc_spectral_norm", action=argparse.BooleanOptionalAction, default=False,
                   help="Spectral norm on every trainable layer of the timestep discriminator (as --disc_spectral_norm of "
                   "train_diffusion_gan.py); the dit trunk's heads always have it.")  # fmt: skip
    d.add_argument("--disc_trunk_path", type=str, default=None,
                   help="The dit trunk: a pipeline folder (its transformer/) or a DiTTransformer2DModel folder. Default: the "
                   "model being fine-tuned, its weights at the start of the run (--pretrained_model_name_or_path).")  # fmt: skip
    d.add_argument("--disc_trunk_blocks", type=str, default=None,
                   help="Comma-separated 0-based DiT blocks whose features get a head (dit trunk). Default: a quarter and "
                   "half of the depth (DiT-S/2: 2,5), where a DiT's features are most separable; the trunk runs no deeper.")  # fmt: skip
    d.add_argument("--disc_augment", type=str, default=None,
                   help="DiffAugment of what both discriminators see, one draw per sample shared by its real and fake: "
                   "comma-separated color, translation, cutout in the order applied (the paper: color,translation,cutout). Default: off.")  # fmt: skip
    d.add_argument("--disc_input", type=str, default="latent", choices=["latent", "pixel"],
                   help="Latent models: the discriminators see latents, or VAE-decoded pixels (decoder frozen, gradients flow through it into x̂₀).")  # fmt: skip
    d.add_argument("--x0_clip", type=float, default=None,
                   help="Clamp what the adversarial terms see to [-c, c]; 0 disables. Default: 1 for pixels (data lie in [-1, 1]), 0 for latents.")  # fmt: skip
    args = parse_args_with_config(parser, argv)

    if args.resolution <= 0:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    data_config_from_args(args, parser), eval_config_from_args(args, parser)  # validate before any work
    check_optimizer_args(args, parser)
    if not 0.0 <= args.class_dropout_prob < 1.0:
        parser.error(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}")
    if args.gradient_accumulation_steps < 1:
        parser.error(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    no_model = args.pretrained_model_name_or_path is None and args.model_config_name_or_path is None
    if no_model and args.vae_name_or_path is None:  # with a VAE the latent size is checked once the VAE is loaded
        patch = DIT_PRESETS[args.model]["patch_size"]
        if args.resolution % patch:
            parser.error(
                f"--resolution {args.resolution} is not divisible by the patch size {patch} of --model {args.model}"
            )
    if args.label_learning_rate is not None and not args.label_learning_rate > 0:
        parser.error(f"--label_learning_rate must be positive, got {args.label_learning_rate}")
    if args.label_map is not None and args.label_init != "map":
        parser.error("--label_map needs --label_init map.")
    if args.label_init == "map" and args.label_map is None:
        parser.error("--label_init map needs --label_map (new_name=old_id,... or a JSON file).")
    if args.label_map is not None:
        try:
            parse_label_map(args.label_map)
        except ValueError as error:
            parser.error(str(error))
    if (args.label_init is not None or args.trainable != "full") and args.pretrained_model_name_or_path is None:
        parser.error(
            "--label_init and --trainable difffit/lora fine-tune a model: pass --pretrained_model_name_or_path."
        )
    if args.lora_rank < 1:
        parser.error(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if args.trainable == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--trainable lora needs peft (`pip install peft`), which is not importable here.")
    try:  # validate the method configs before any work is done
        run = run_config(args)
    except ValueError as error:
        parser.error(str(error))
    # Both adversarial terms are opt-in (λ = 0 in their configs): on the digits benchmark (docs/BENCHMARKS.md, 3 seeds)
    # SADM's 'paired' loss doubled digits-FID against DSM-only from scratch and was neutral when fine-tuning; the
    # Diffusion-GAN term was neutral from scratch and helped modestly when fine-tuning.
    if uses_dit_trunk(args, run) and args.pretrained_model_name_or_path is None and args.disc_trunk_path is None:
        parser.error(
            "--disc_backbone dit / --gan_disc_trunk dit judge with a frozen pretrained DiT, and a model trained from "
            "scratch has none: pass --pretrained_model_name_or_path (the trunk is then its start-of-run weights) or "
            "--disc_trunk_path."
        )
    if args.disc_augment is not None:
        try:
            DiffAugment(args.disc_augment)
        except ValueError as error:
            parser.error(f"--disc_augment: {error}")
    check_trunk_flags(args, parser)
    if args.disc_backbone == "dit" and args.disc_pretrained_path is not None:
        parser.error(
            "--disc_pretrained_path warm-starts a StructureDiscriminator; it is not read with --disc_backbone dit."
        )
    if args.grad_ratio_logging_steps < 0:
        parser.error(f"--grad_ratio_logging_steps must be >= 0, got {args.grad_ratio_logging_steps}")
    if args.disc_lr_warmup_steps < 0:
        parser.error(f"--disc_lr_warmup_steps must be >= 0, got {args.disc_lr_warmup_steps}")
    if args.disc_lr_warmup_steps > 0 and args.disc_lr_scheduler is None:
        parser.error("--disc_lr_warmup_steps needs --disc_lr_scheduler (e.g. constant_with_warmup).")
    if run.structure.weight > 0 and run.structure.scope == "local" and args.train_batch_size < 2:
        parser.error(
            "--structure_loss_weight > 0 needs --train_batch_size >= 2 (relations need pairs) or --structure_scope global."
        )
    if run.structure.weight > 0:
        try:
            run.structure.check_schedule(args.num_train_timesteps)
        except ValueError as error:
            parser.error(f"--structure_*: {error}")
        min_active, local = run.structure.min_active, run.structure.scope == "local"
        if run.structure.uses_active_subbatch and local and args.train_batch_size < min_active:
            parser.error(
                f"--train_batch_size {args.train_batch_size} is smaller than --structure_min_active {min_active}: the "
                "active sub-batch of --structure_formulation mmd / --structure_columns active could never be large "
                "enough. Raise the batch size, lower --structure_min_active, or use --structure_scope global."
            )

    return args


class RunConfig(NamedTuple):
    """What the flags resolve to before any data or model is read (`args` itself is never changed).

    Args:
        structure ([`StructureConfig`]): the SADM term's effective config.
        diffusion_gan ([`DiffusionGANConfig`]): the Diffusion-GAN term's, its preset resolved.
        learning_rate (`float`): --learning_rate, or its default for this model and --trainable.
        lora_target_modules (`tuple[str, ...]`): the parsed --lora_target_modules.
        disc_trunk_blocks (`tuple[int, ...]`, *optional*): the parsed --disc_trunk_blocks (None: the trunk's default).
    """

    structure: StructureConfig
    diffusion_gan: DiffusionGANConfig
    learning_rate: float
    lora_target_modules: tuple[str, ...]
    disc_trunk_blocks: tuple[int, ...] | None


def run_config(args: argparse.Namespace) -> RunConfig:
    """Resolve the flags into a [`RunConfig`]; a bad method option raises `ValueError` naming it."""
    learning_rate = args.learning_rate
    if learning_rate is None:  # the paper's 1e-4 for real DiTs; the tiny CPU preset needs more (docs/DIGITS.md)
        tiny = (
            args.model == "tiny"
            and args.pretrained_model_name_or_path is None
            and args.model_config_name_or_path is None
        )
        learning_rate = 1e-3 if tiny else 1e-4
        if args.trainable != "full":  # DiffFit (arXiv 2304.06648) and common LoRA practice: 10x the full-tuning LR
            learning_rate *= 10
    disc_trunk_blocks = None
    if args.disc_trunk_blocks is not None:
        try:
            disc_trunk_blocks = tuple(int(b) for b in args.disc_trunk_blocks.split(","))
        except ValueError:
            raise ValueError(
                f"--disc_trunk_blocks must be comma-separated block indices, got {args.disc_trunk_blocks!r}"
            ) from None
        if min(disc_trunk_blocks) < 0:
            raise ValueError(f"--disc_trunk_blocks must be >= 0, got {disc_trunk_blocks}")
    return RunConfig(
        structure=dataclass_from_args(StructureConfig, args, "structure_", STRUCTURE_FLAGS),
        diffusion_gan=dataclass_from_args(DiffusionGANConfig, args, "diffusion_gan_", GAN_FLAGS),
        learning_rate=learning_rate,
        lora_target_modules=tuple(m.strip() for m in args.lora_target_modules.split(",") if m.strip()),
        disc_trunk_blocks=disc_trunk_blocks,
    )


# flag names of config fields that do not follow the prefix rule
STRUCTURE_FLAGS = {
    "weight": "structure_loss_weight",
    "disc_update_ratio": "disc_update_ratio",
    "r1_gamma": "disc_r1_gamma",
}
GAN_FLAGS = {
    "weight": "gan_loss_weight",
    "timestep_weighting": "gan_timestep_weighting",
    "t_threshold": "gan_t_threshold",
    "start_step": "gan_start_step",
    "warmup_steps": "gan_warmup_steps",
    "grad_ratio": "gan_grad_ratio",
}
# default LR of a new label table: the pretrained rows' spread / 100 (docs/FINETUNING.md: at the weights' LR the new
# classes were not learned in 400 steps; at spread / 100 they were, in full, LoRA and DiffFit tuning, 3 seeds each)
LABEL_SPREAD_STEPS = 100


def build_model(
    args,
    learning_rate: float,
    num_channels: int,
    num_classes: int,
    id2label: dict[int, str] | None = None,
    vae: AutoencoderKL | None = None,
    vae_source: str | None = None,
) -> tuple[DiTTransformer2DModel, float | None]:
    """The denoiser: pretrained (components checked by `pretrained_components`, label table remapped to the data's
    classes with --label_init), from a config, or a preset; on the VAE's latents when there is a VAE, else on pixels.
    Returns it and the learning rate of its label tables (None: the weights' rate)."""
    if args.pretrained_model_name_or_path is not None:
        model = DiTTransformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer")
        source = f"{args.pretrained_model_name_or_path}/transformer"
    elif args.model_config_name_or_path is not None:
        model = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(args.model_config_name_or_path))
        source = args.model_config_name_or_path
    elif vae is not None:
        latent_size, patch = args.resolution // vae_downsample_factor(vae), DIT_PRESETS[args.model]["patch_size"]
        if latent_size % patch:
            raise ValueError(
                f"--model {args.model} has patch size {patch}, which does not divide the {latent_size}x{latent_size} "
                f"latents of {describe_latents(vae_source, vae, args.resolution)}."
            )
        return build_dit(args.model, latent_size, vae.config.latent_channels, num_classes, args.learn_sigma), None
    else:
        return build_dit(args.model, args.resolution, num_channels, num_classes, args.learn_sigma), None
    if vae is not None:
        check_transformer_fits_latents(model, vae, vae_source, args.resolution, source)
    else:
        check_dit_fits(model, args.resolution, num_channels, source)
    old_id2label = pretrained_id2label(args.pretrained_model_name_or_path)
    label_learning_rate = args.label_learning_rate
    if args.label_init is not None and model.config.num_embeds_ada_norm > 1:
        # Adam moves a coordinate by ≲ LR per step: new rows need ~spread / LR steps to lie as far apart as the old ones
        spread = label_spread(model)
        if label_learning_rate is None:  # identical rows (spread 0) give no scale: the weights' LR then
            label_learning_rate = spread / LABEL_SPREAD_STEPS if spread > 0 else learning_rate
        logger.info(
            f"New label tables at LR {label_learning_rate:.3g}: the pretrained class rows differ by {spread:.3g} "
            f"per coordinate (std), ~{spread / label_learning_rate:.0f} steps for the new rows to spread as far "
            "(--label_learning_rate; docs/FINETUNING.md)"
        )
    model = relabel_for_data(
        model, num_classes, id2label, args.label_init, args.label_map, old_id2label, args.seed, source
    )
    return disable_label_dropout(model), label_learning_rate


def check_trunk_flags(args, parser: argparse.ArgumentParser) -> None:
    """The pretrained-trunk flags name a file / folder that exists and go with the backbone that reads them."""
    readers = {
        "--disc_timm_pretrained_path": ("disc_backbone", "timm", os.path.isfile, "file"),
        "--disc_transformers_path": ("disc_backbone", "transformers", os.path.isdir, "folder"),
        "--disc_transformers_config": ("disc_backbone", "transformers", os.path.isfile, "file"),
        "--gan_disc_timm_pretrained_path": ("gan_disc_trunk", "projected", os.path.isfile, "file"),
    }
    for flag, (owner, choice, exists, kind) in readers.items():
        value = getattr(args, flag[2:])
        if value is None:
            continue
        if getattr(args, owner) != choice:
            parser.error(f"{flag} is read by --{owner} {choice}, not --{owner} {getattr(args, owner)}")
        if not exists(value):
            parser.error(f"{flag} {value} is not a {kind}")
    if args.disc_transformers_path is not None and args.disc_transformers_config is not None:
        parser.error(
            "--disc_transformers_path and --disc_transformers_config both give the transformers backbone: pass one."
        )
    if (
        args.disc_backbone == "transformers"
        and args.disc_transformers_path is None
        and args.disc_transformers_config is None
    ):
        parser.error(
            "--disc_backbone transformers needs --disc_transformers_path (a local model folder) or --disc_transformers_config."
        )
    own_head = "mlp" if args.disc_backbone == "dit" else "linear"
    if args.disc_head not in (None, own_head, "orthonormal"):
        parser.error(
            f"--disc_head {args.disc_head} is not a head of --disc_backbone {args.disc_backbone} ({own_head} or orthonormal)."
        )


def build_structure_discriminator(
    args, in_channels: int, sample_size: int, num_classes: int, num_timesteps: int | None = None
) -> StructureDiscriminator:
    if args.disc_pretrained_path is not None:
        disc = StructureDiscriminator.from_pretrained(args.disc_pretrained_path)
        if (disc.config.in_channels, disc.config.sample_size) != (in_channels, sample_size):
            raise ValueError(
                f"--disc_pretrained_path {args.disc_pretrained_path} takes {disc.config.in_channels}x{disc.config.sample_size}px "
                f"inputs but the denoiser's samples are {in_channels}x{sample_size}px."
            )
        if disc.config.num_timesteps != num_timesteps:
            raise ValueError(
                f"--disc_pretrained_path {args.disc_pretrained_path} has num_timesteps={disc.config.num_timesteps}, but "
                f"these structure options need {num_timesteps} (a noise-conditional encoder exactly for "
                "--structure_formulation mmd or --structure_renoise_offset)."
            )
        return disc
    transformers_config = None
    if args.disc_transformers_config is not None:
        with open(args.disc_transformers_config) as f:
            transformers_config = json.load(f)
    return StructureDiscriminator(
        in_channels=in_channels,
        sample_size=sample_size,
        backbone=args.disc_backbone,
        embed_dim=args.disc_embed_dim,
        base_channels=args.disc_base_channels,
        spectral_norm=args.structure_disc_spectral_norm,
        num_classes=num_classes if args.disc_class_conditional and num_classes else None,
        timm_model_name=args.disc_timm_model_name,
        timm_pretrained_path=args.disc_timm_pretrained_path,
        transformers_config=transformers_config,
        transformers_path=args.disc_transformers_path,
        input_adapter=args.disc_input_adapter,
        head_type=args.disc_head or "linear",
        freeze_backbone=args.disc_freeze_backbone,
        num_timesteps=num_timesteps,
    )


def uses_dit_trunk(args, run: RunConfig) -> bool:
    """Whether an adversarial term that is on judges with the frozen DiT trunk."""
    structure = run.structure.weight > 0 and args.disc_backbone == "dit"
    return structure or (run.diffusion_gan.weight > 0 and args.gan_disc_trunk == "dit")


def build_dit_trunk(args, model: DiTTransformer2DModel) -> tuple[DiTTransformer2DModel, str]:
    """The frozen DiT of the `dit` discriminators and its name for messages: --disc_trunk_path, or a copy of the
    denoiser as built (pretrained weights, label table for the data) before any training, so a resumed run rebuilds
    the same trunk from the same files. Called before `setup_trainable` (LoRA / DiffFit wrap the model in place)."""
    if args.disc_trunk_path is not None:
        if os.path.isfile(os.path.join(args.disc_trunk_path, "scheduler", "scheduler_config.json")):
            check_noise_schedule(args.disc_trunk_path, args.num_train_timesteps)
        return load_dit_trunk(args.disc_trunk_path), f"--disc_trunk_path {args.disc_trunk_path}"
    source = f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} (the dit trunk)"
    return freeze_dit_trunk(model), source


def build_dit_discriminators(
    args,
    run: RunConfig,
    trunk: DiTTransformer2DModel,
    source: str,
    in_channels: int,
    sample_size: int,
    num_classes: int,
    diffusion: AdaptiveDiffusion | None,
    num_timesteps: int | None,
) -> tuple[DiTStructureEncoder | None, DiTTimestepDiscriminator | None]:
    """The `dit` discriminators on `trunk` (the --disc_backbone / --gan_disc_trunk choice next to
    `build_structure_discriminator` / `build_timestep_discriminator`): (structure encoder or None, timestep
    discriminator or None). The trunk is checked against the discriminators' inputs once, naming `source`."""
    blocks = run.disc_trunk_blocks or default_trunk_blocks(trunk.config.num_layers)
    inputs = f"the discriminator input ({in_channels}x{sample_size}x{sample_size}, --disc_input {args.disc_input})"
    check_dit_trunk(trunk, in_channels, sample_size, num_classes, blocks, source, inputs)
    shape = {"in_channels": in_channels, "sample_size": sample_size, "trunk_hidden_size": trunk.inner_dim}
    shape.update(trunk_num_classes=trunk.config.num_embeds_ada_norm, trunk_blocks=list(blocks))
    struct_disc = gan_disc = None
    if run.structure.weight > 0 and args.disc_backbone == "dit":
        struct_disc = DiTStructureEncoder(
            **shape,
            embed_dim=args.disc_embed_dim,
            spectral_norm=args.structure_disc_spectral_norm,
            num_classes=trunk.config.num_embeds_ada_norm if args.disc_class_conditional and num_classes else None,
            num_timesteps=num_timesteps,
            head_type=args.disc_head or "mlp",
            dit=trunk,
        )
    if run.diffusion_gan.weight > 0 and args.gan_disc_trunk == "dit":
        gan_disc = DiTTimestepDiscriminator(
            **shape,
            trunk_patch_size=trunk.config.patch_size,
            head_channels=args.disc_base_channels,
            num_train_timesteps=args.num_train_timesteps,
            dit=trunk,
            diffusion=diffusion,
        )
    for disc in (struct_disc, gan_disc):
        if disc is not None and args.gradient_checkpointing:
            disc.enable_gradient_checkpointing()
    return struct_disc, gan_disc


def make_disc_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over a discriminator's trainable parameters, with the --disc_* hyperparameters (torch's AdamW always)."""
    return make_adamw(
        [p for p in model.parameters() if p.requires_grad],
        args.disc_learning_rate,
        (args.disc_adam_beta1, args.disc_adam_beta2),
        args.disc_adam_weight_decay,
        args.disc_adam_epsilon,
        fused=args.adam_fused,
        foreach=args.adam_foreach,
    )


def make_pipeline(transformer, noise_scheduler: DDPMScheduler, id2label, vae: AutoencoderKL | None) -> SADMDiTPipeline:
    # saved with a fixed variance so that diffusers' DiTPipeline, which drops a learned σ, can step it as it is;
    # SADMDiTPipeline sees the learned σ in the transformer (2C outputs) and samples with "learned_range" itself
    scheduler = DDPMScheduler.from_config(noise_scheduler.config, variance_type="fixed_small")
    return SADMDiTPipeline(transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label)


# how diffusers' own DiTPipeline samples a latent export (it hard-codes the null class 1000 and drops a learned σ)
DIT_PIPELINE_NOTE = (
    "- diffusers' `DiTPipeline` samples it as it is: `DiTPipeline.from_pretrained('PATH')` (with the fixed variance of "
    "the saved scheduler); guidance_scale > 1 needs 1000 classes there (this model's null class is {null_class})."
)


def main(
    args: argparse.Namespace,
    dataset: torch.utils.data.Dataset | None = None,
    on_step: Callable[[int], None] | None = None,
    preemption: PreemptionHandler | None = None,
) -> None:
    """Train and export. `dataset` replaces the data the flags name (an in-memory dataset with `num_classes`,
    `id2label` and `num_channels`, e.g. the speed benchmark's); `on_step(global_step)` is called after every
    optimizer step (the speed benchmark times the gaps and ends the run by raising). When `preemption` (entered by
    the caller) reports a SIGTERM/SIGUSR1, the run checkpoints at that optimizer step and returns without exporting."""
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator = make_accelerator(args)
    check_fsdp(accelerator, args.trainable, args.use_ema, args.validation_steps, args.eval_steps)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    # ---- a pretrained pipeline's components and the VAE (latent training), checked before any data is read
    components = {}
    if args.pretrained_model_name_or_path is not None:
        components = pretrained_components(args.pretrained_model_name_or_path)
        if "scheduler" in components:
            check_noise_schedule(args.pretrained_model_name_or_path, args.num_train_timesteps)
    vae, vae_source = load_vae(args.vae_name_or_path, args.pretrained_model_name_or_path, components)
    if vae is None and args.cache_latents:
        raise ValueError("--cache_latents needs a VAE: --vae_name_or_path, or a pretrained pipeline with a vae/.")
    run = run_config(args)  # validated by parse_args
    struct_cfg, gan_cfg = run.structure, run.diffusion_gan
    if vae is not None and args.disc_input == "pixel" and struct_cfg.weight > 0 and struct_cfg.noise_conditional:
        raise ValueError(
            "--structure_formulation mmd and --structure_renoise_offset diffuse the samples in the denoiser's (latent) "
            "space: use --disc_input latent with a VAE."
        )
    x0_clip = args.x0_clip
    if x0_clip is None:  # pixels lie in [-1, 1]; latents have no fixed range
        x0_clip = 0.0 if vae is not None and args.disc_input == "latent" else 1.0

    # ---- data: the class count and names come from the data and go into the export
    if dataset is None:  # the main process decodes every image once; the others read its record of the scan
        data_config = data_config_from_args(args)
        scan_dir = args.data_cache_dir or os.path.join(args.output_dir, "image_scan")
        with accelerator.main_process_first():
            dataset = load_train_dataset(dataclasses.replace(data_config, scan_cache_dir=scan_dir))
    num_classes, id2label = dataset.num_classes, dataset.id2label
    logger.info(f"{len(dataset)} training images, {dataset.num_channels} channel(s), {num_classes or 'no'} classes")
    if vae is not None:
        latent_channels, latent_size = check_vae_fits(vae, vae_source, args.resolution, dataset.num_channels)
        logger.info(f"Latent training: {vae_source} encodes to {latent_channels}x{latent_size}x{latent_size}")
        vae.to(accelerator.device)

    # ---- models, optimizer, EMA
    model, label_learning_rate = build_model(
        args, run.learning_rate, dataset.num_channels, num_classes, id2label, vae, vae_source
    )
    dit_trunk, dit_trunk_source = build_dit_trunk(args, model) if uses_dit_trunk(args, run) else (None, None)
    model = setup_trainable(model, args.trainable, args.lora_rank, args.lora_alpha, list(run.lora_target_modules))
    trained_params = trainable_parameters(model)  # the same tensors after prepare/compile: EMA, swaps and export
    num_trained = sum(p.numel() for p in trained_params)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"--trainable {args.trainable}: {num_trained:,} of {num_params:,} parameters trained")
    learn_sigma = model.config.out_channels == 2 * model.config.in_channels
    null_class = model.config.num_embeds_ada_norm  # the null row of the label table: id = class count
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if accelerator.mixed_precision != "no":
        float32_norms(model)  # LayerNorm in float32 under autocast on every device (CPU's autocast runs it in bf16)
        if dit_trunk is not None:
            float32_norms(dit_trunk)
    if args.torch_compile:
        model.compile()  # nn.Module.compile: in place, so the state dict, EMA and hooks see the same module
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=args.prediction_type,
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=False,
    )
    objective = DenoisingObjective(
        noise_scheduler,
        args.prediction_type,
        channels=model.config.in_channels,
        learn_sigma=learn_sigma,
        snr_gamma=args.snr_gamma,
        vlb_weight=args.vlb_weight,
        class_dropout_prob=args.class_dropout_prob,
        null_class=null_class,
        device=accelerator.device,
    )

    ema = None
    if args.use_ema:  # PEFT: the EMA tracks only what is trained and is saved as its state dict, not as a model
        as_model = (
            {"model_cls": DiTTransformer2DModel, "model_config": model.config} if args.trainable == "full" else {}
        )
        ema = EMAModel(
            trained_params,
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            **as_model,
        )
        ema.to(accelerator.device)

    optimizer = adamw_from_flags(
        args, optimizer_param_groups(model, label_learning_rate), run.learning_rate, (args.adam_beta1, args.adam_beta2)
    )

    # ---- adversarial players: the structure discriminator (SADM) and the timestep discriminator (Diffusion-GAN)
    # (each term owns its discriminator, optimizer, checkpoint state and statistics: sadm/terms.py)
    disc_channels, disc_size = model.config.in_channels, model.config.sample_size
    if vae is not None and args.disc_input == "pixel":  # the discriminators see decoded images
        disc_channels, disc_size = dataset.num_channels, args.resolution
    terms: list[AdversarialTerm] = []
    num_timesteps = args.num_train_timesteps if struct_cfg.noise_conditional else None
    diffusion = (
        build_adaptive_diffusion(gan_cfg, seed=args.seed).to(accelerator.device) if gan_cfg.weight > 0 else None
    )
    struct_disc = gan_disc = None
    if dit_trunk is not None:  # frozen, outside the discriminators' parameters and state: never saved or stepped
        struct_disc, gan_disc = build_dit_discriminators(
            args, run, dit_trunk, dit_trunk_source, disc_channels, disc_size, num_classes, diffusion, num_timesteps
        )
    if struct_cfg.weight > 0:
        if struct_disc is None:
            struct_disc = build_structure_discriminator(args, disc_channels, disc_size, num_classes, num_timesteps)
        terms.append(
            StructureTerm(
                struct_cfg,
                struct_disc,
                make_disc_optimizer(args, struct_disc),
                accelerator,
                class_conditional=args.disc_class_conditional,
            )
        )
    if gan_cfg.weight > 0:
        if gan_disc is None:
            gan_disc = build_timestep_discriminator(
                gan_cfg,
                disc_channels,
                disc_size,
                num_classes,
                trunk=args.gan_disc_trunk,
                base_channels=args.disc_base_channels,
                spectral_norm=args.gan_disc_spectral_norm,
                timm_model_name=args.gan_disc_timm_model_name,
                timm_pretrained_path=args.gan_disc_timm_pretrained_path,
                input_adapter=args.disc_input_adapter,
            )
        gan_opt = make_disc_optimizer(args, gan_disc)
        terms.append(DiffusionGANTerm(gan_cfg, gan_disc, gan_opt, accelerator, diffusion))

    train_set, collate = dataset, collate_fn
    if args.cache_latents:  # every process encodes its shard; all shards are finished before any is read
        cache_dir = args.data_cache_dir or os.path.join(args.output_dir, "latent_cache")
        path = build_latent_cache(
            dataset,
            vae,
            cache_dir,
            disable_progress=not accelerator.is_local_main_process,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            dtype=args.latent_cache_dtype,
        )
        accelerator.wait_for_everyone()
        train_set, collate = load_latent_cache(path, dataset), collate_latents
    train_dataloader = make_dataloader(
        train_set, args.train_batch_size, args.seed, args.dataloader_num_workers, collate
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps  # derived values stay out of `args`
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    for term in terms:
        disc_lr_scheduler = None
        if args.disc_lr_scheduler is not None:  # per discriminator step (accelerate steps it once per process)
            disc_lr_scheduler = get_scheduler(
                args.disc_lr_scheduler,
                optimizer=term.optimizer,
                num_warmup_steps=args.disc_lr_warmup_steps * accelerator.num_processes,
                num_training_steps=max_train_steps * term.config.disc_update_ratio * accelerator.num_processes,
            )
        term.prepare(disc_lr_scheduler)
    register_model_hooks(
        accelerator,
        ["transformer", *(term.model_name for term in terms)],
        ema=ema,
        trainable_only=("transformer",) if args.trainable != "full" else (),
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)

    if accelerator.is_main_process:
        configs = {"structure": struct_cfg, "diffusion_gan": gan_cfg}  # the effective method configs
        effective = {**vars(args), "learning_rate": run.learning_rate, "max_train_steps": max_train_steps}
        effective["x0_clip"] = x0_clip
        init_trackers(accelerator, args.tracker_project_name, args.run_name, tracker_config(effective, configs))

    # ---- resume
    global_step, first_epoch, skip_batches, bad_steps = 0, 0, 0, None
    train_state = resume_train_state(accelerator, args.output_dir, args.resume_from_checkpoint)
    if train_state is not None:
        global_step, bad_steps = train_state["global_step"], train_state["bad_steps"]
        for term in terms:
            term.load_state_dict(train_state)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    bad_steps = BadStepCounter(args.max_bad_steps, bad_steps)  # skipped non-finite steps per model

    # ---- in-training evaluation: feature network and reference statistics, once (None with --eval_steps 0)
    evaluator = setup_in_training_evaluation(
        eval_config_from_args(args), dataset, accelerator, args.output_dir, start_step=global_step
    )

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Steps {max_train_steps}, total batch {total_batch}, epochs {num_epochs}, starting at step {global_step}"
    )
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    log_scalars = ScalarLogger(accelerator, total_batch, start_step=global_step)

    def run_validation(step: int) -> None:
        with ema_weights(ema, trained_params, accelerator.unwrap_model(model)) as unwrapped:
            pipeline = make_pipeline(unwrapped, DDPMScheduler.from_config(noise_scheduler.config), id2label, vae)
            pipeline.set_progress_bar_config(disable=True)
            images = pipeline(
                class_labels=validation_labels(args.num_validation_images, num_classes),
                batch_size=args.num_validation_images,
                guidance_scale=args.guidance_scale,
                num_inference_steps=args.num_inference_steps,
                generator=torch.Generator(device=accelerator.device).manual_seed(args.seed),
                output_type="np",
            ).images
        save_validation_grid(accelerator, images, args.output_dir, step)

    def run_evaluation(step: int) -> None:
        """Measure the EMA weights on every process (sharded, collective), log eval/<metric>, keep the best in best/.

        The RNG states are restored afterwards: a run with evaluation trains exactly as one without."""
        with preserve_rng_state(accelerator), ema_weights(ema, trained_params, accelerator.unwrap_model(model)) as net:
            pipeline = make_pipeline(net, DDPMScheduler.from_config(noise_scheduler.config), id2label, vae)

            def write_best(folder: str) -> None:
                make_pipeline(merged_dit(net), pipeline.scheduler, id2label, vae).save_pretrained(folder)
                copy_pipeline_file(pipeline_sadm_dit.__file__, folder)

            evaluate_and_keep_best(accelerator, evaluator, step, pipeline, write_best, {"transformer": net})
        accelerator.wait_for_everyone()

    # ---- loop: one `train_step` per micro-batch (sadm/step.py), then EMA, logging, checkpoints, validation
    train_step = DenoiserTrainStep(
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        objective,
        terms,
        GuardedOptimizerStep(accelerator, args.max_grad_norm, bad_steps),
        vae=vae,
        decode_for_discriminators=vae is not None and args.disc_input == "pixel",
        x0_clip=x0_clip,
        seed=args.seed,
        per_sample_noise=args.per_sample_noise,
        disc_augment=DiffAugment(args.disc_augment) if args.disc_augment is not None else None,
        grad_ratio_steps=args.grad_ratio_logging_steps,
    )
    stats = train_step.stats
    model.train()
    stop = False  # a SIGTERM/SIGUSR1 agreed by all processes: checkpoint at this step and return (sadm/preemption.py)
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_dataloader, skip_batches)
            if epoch == first_epoch
            else train_dataloader
        )
        for batch in batches:
            train_step(batch, global_step)
            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(trained_params)
                global_step += 1
                progress.update(1)
                if on_step is not None:
                    on_step(global_step)
                if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                    values = {**stats, "lr": lr_scheduler.get_last_lr()[0], **bad_steps.stats()}
                    if ema is not None:
                        values["ema_decay"] = ema.cur_decay_value
                    logs = log_scalars(values, global_step)  # averaged over the processes
                    postfix = {
                        k: f"{logs[k]:.4g}"
                        for k in ("loss", "loss_dsm", "loss_struct", "loss_gan_g", "ada_T", "img_per_s")
                        if k in logs
                    }
                    progress.set_postfix(postfix)

                stop = preemption is not None and preemption.should_stop(accelerator) and global_step < max_train_steps
                if stop or global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                    named = {"transformer": accelerator.unwrap_model(model)}
                    named.update({term.model_name: term.unwrapped for term in terms})
                    assert_finite_parameters(named)
                    train_state = {"epoch": epoch, "bad_steps": bad_steps.state_dict()}
                    for term in terms:
                        train_state.update(term.state_dict())
                    save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        train_state,
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

    # ---- export: a pipeline folder with EMA weights, a model card and a pipeline.py
    accelerator.wait_for_everyone()
    sharded = accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1
    gathered = full_state_dict(accelerator, model) if sharded else None  # collective; no EMA here (check_fsdp)
    disc_states = [full_state_dict(accelerator, term.discriminator) if sharded else None for term in terms]
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model)
        if gathered is not None:  # this process's module holds its shard only: export the gathered weights
            transformer = DiTTransformer2DModel.from_config(transformer.config)
            transformer.load_state_dict(gathered)
        if ema is not None:
            ema.copy_to(trained_params)
        transformer = merged_dit(transformer)  # DiffFit γ folded, LoRA merged: a plain DiTTransformer2DModel
        assert_finite_parameters({"transformer": transformer})
        pipeline = make_pipeline(transformer, DDPMScheduler.from_config(noise_scheduler.config), id2label, vae)

        def write(folder: str) -> None:
            pipeline.save_pretrained(folder)
            copy_pipeline_file(pipeline_sadm_dit.__file__, folder)
            for term, state in zip(terms, disc_states):  # next to the pipeline, loadable with from_pretrained
                term.save_pretrained(folder, state)
            data = args.dataset_name or args.train_data_dir or "the embedded scikit-learn digits (8x8, 10 classes)"
            write_model_card(
                folder,
                "DiT trained with sadm",
                [
                    f"- Data: {data}, {len(dataset)} images at {args.resolution}px, {num_classes or 'no'} classes.",
                    f"- Model: {args.pretrained_model_name_or_path or args.model_config_name_or_path or args.model}, "
                    f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters, learned σ: {learn_sigma}, "
                    f"{f'latent (VAE {vae_source}, discriminators on {args.disc_input}s)' if vae is not None else 'pixel space'}.",
                    f"- Fine-tuning: --trainable {args.trainable} ({num_trained:,} of {num_params:,} parameters trained, "
                    f"merged into the export), label table: {args.label_init or 'kept'}.",
                    f"- Objective: {args.prediction_type} prediction; SADM structure loss: {struct_cfg if struct_cfg.weight > 0 else 'off'}; "
                    f"Diffusion-GAN term: {gan_cfg if gan_cfg.weight > 0 else 'off'}; {global_step} steps at batch {total_batch}; EMA: {args.use_ema}.",
                    f"- Sampler sadm {sadm.__version__}: `SADMDiTPipeline`, null class id = {null_class if num_classes else 'n/a'}.",
                    *([DIT_PIPELINE_NOTE.format(null_class=null_class)] if vae is not None else []),
                ],
                base_model=args.pretrained_model_name_or_path,
            )

        export_pipeline(args.output_dir, write)
    accelerator.end_training()


if __name__ == "__main__":
    cli_args = parse_args()
    with PreemptionHandler(timeout_s=cli_args.ddp_timeout) as handler:  # the default handlers are back afterwards
        main(cli_args, preemption=handler)
