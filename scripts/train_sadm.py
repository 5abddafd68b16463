#!/usr/bin/env python
"""Train or fine-tune a DiT with the denoising loss plus, optionally, SADM's structure loss and a Diffusion-GAN term.

    accelerate launch scripts/train_sadm.py --model tiny --max_train_steps 2000 --output_dir runs/digits

With `--structure_loss_weight 0 --gan_loss_weight 0` this is a plain DiT trainer. The output folder is a diffusers
pipeline (`SADMDiTPipeline`, EMA weights when `--use_ema`) with `checkpoint-N/` folders beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from sadm.pipelines import pipeline_sadm_dit
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline
from tqdm.auto import tqdm

import sadm
from sadm.cli import add_data_args, add_eval_args, data_config_from_args, eval_config_from_args
from sadm.data import collate_fn, load_train_dataset
from sadm.diffusion_gan import (
    DiffusionGANConfig,
    build_adaptive_diffusion,
    diffusion_gan_discriminator_loss,
    diffusion_gan_generator_loss,
)
from sadm.evaluation import preserve_rng_state, setup_in_training_evaluation
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
from sadm.latents import (
    build_latent_cache,
    check_noise_schedule,
    check_transformer_fits_latents,
    check_vae_fits,
    collate_latents,
    decode_latents,
    describe_latents,
    encode_moments,
    load_latent_cache,
    load_vae,
    pretrained_components,
    sample_latents,
    vae_downsample_factor,
)
from sadm.losses import denoising_loss, predict_x0, training_target, vlb_loss
from sadm.losses.structure import structure_timestep_weights
from sadm.models.dit import DIT_PRESETS, build_dit, check_dit_fits, disable_label_dropout, float32_norms
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.models.timestep_discriminator import TimestepDiscriminator
from sadm.structure import (
    StructureConfig,
    adaptive_structure_weight,
    all_gather_with_grad,
    structure_denoiser_loss,
    structure_discriminator_loss,
    structure_inputs,
    structure_weight_at,
)
from sadm.training import (
    BadStepCounter,
    adamw_implementation,
    add_dataclass_args,
    add_training_args,
    assert_finite_parameters,
    atomic_save_pretrained,
    check_optimizer_args,
    check_output_dir,
    copy_pipeline_file,
    dataclass_from_args,
    draw_timesteps,
    draw_uniform,
    image_grid,
    load_train_state,
    log_images,
    make_accelerator,
    make_dataloader,
    register_model_hooks,
    register_state_hooks,
    resolve_resume_path,
    sample_generators,
    save_checkpoint,
    step_if_finite,
    write_model_card,
)

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "<output_dir>/latent_cache; a fresh latent is still sampled every step.",
    )
    g.add_argument(
        "--learn_sigma", action="store_true", help="Output 2C channels and train the improved-DDPM hybrid loss."
    )
    g.add_argument(
        "--class_dropout_prob", type=float, default=0.1, help="Label dropout for classifier-free guidance (DiT: 0.1)."
    )
    g.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction", "sample"])
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
    v = parser.add_argument_group("validation")
    v.add_argument(
        "--validation_steps", type=int, default=500, help="Sample a validation grid every N steps (0: never)."
    )
    v.add_argument(
        "--num_validation_images", type=int, default=20, help="Images per validation grid (cycling the classes)."
    )
    v.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale for validation images.")
    v.add_argument("--num_inference_steps", type=int, default=100, help="Sampling steps for validation images.")
    v.add_argument("--logging_steps", type=int, default=10, help="Log scalars (one host sync) every N steps.")
    add_eval_args(parser, diffusion_sampling=True)
    # SADM: StructureConfig fields as --structure_* flags (λ is --structure_loss_weight)
    add_dataclass_args(parser, StructureConfig, "structure_", STRUCTURE_FLAGS)
    d = parser.add_argument_group("discriminators (structure and timestep)")
    d.add_argument("--disc_backbone", type=str, default="conv", choices=["conv", "vit", "timm", "transformers"],
                   help="Structure discriminator backbone (conv: compact, spectral norm; timm/transformers: random-init here).")  # fmt: skip
    d.add_argument("--disc_embed_dim", type=int, default=128, help="Structure embedding size.")
    d.add_argument("--disc_base_channels", type=int, default=64, help="Width of the conv/ViT discriminators.")
    d.add_argument("--disc_spectral_norm", action=argparse.BooleanOptionalAction, default=True, help="Spectral norm in the structure encoder.")  # fmt: skip
    d.add_argument(
        "--disc_timm_model_name", type=str, default="resnet18", help="timm backbone name (--disc_backbone timm)."
    )
    d.add_argument("--disc_timm_pretrained_path", type=str, default=None, help="Local timm weights for the backbone.")
    d.add_argument(
        "--disc_transformers_config", type=str, default=None, help="JSON file of a transformers vision config."
    )
    d.add_argument("--disc_freeze_backbone", action="store_true", help="Freeze the timm/transformers backbone.")
    d.add_argument(
        "--disc_class_conditional", action="store_true", help="Condition the structure embedding on the class."
    )
    d.add_argument("--disc_pretrained_path", type=str, default=None,
                   help="Warm-start the structure discriminator from a saved one (e.g. a previous export's discriminator/).")  # fmt: skip
    d.add_argument("--disc_learning_rate", type=float, default=2e-4, help="Discriminators' learning rate.")
    d.add_argument("--disc_adam_beta1", type=float, default=0.5, help="GAN practice: β1 = 0.5.")
    d.add_argument("--disc_adam_beta2", type=float, default=0.999)
    d.add_argument("--disc_adam_weight_decay", type=float, default=0.0)
    d.add_argument("--disc_adam_epsilon", type=float, default=1e-8)
    # Diffusion-GAN term: DiffusionGANConfig fields as --diffusion_gan_* flags (λ_adv is --gan_loss_weight)
    add_dataclass_args(parser, DiffusionGANConfig, "diffusion_gan_", GAN_FLAGS)
    d.add_argument("--gan_disc_trunk", type=str, default="conv", choices=["conv", "vit", "projected"], help="Timestep discriminator trunk.")  # fmt: skip
    d.add_argument("--gan_timestep_weighting", type=str, default="threshold", choices=["none", "snr", "threshold"],
                   help="Which denoiser timesteps feed x̂₀ to the GAN term (x̂₀ is a blurry posterior mean at high noise).")  # fmt: skip
    d.add_argument(
        "--gan_t_threshold", type=int, default=250, help="t < this feeds the GAN term under 'threshold' (ours)."
    )
    d.add_argument("--disc_input", type=str, default="latent", choices=["latent", "pixel"],
                   help="Latent models: the discriminators see latents, or VAE-decoded pixels (decoder frozen, gradients flow through it into x̂₀).")  # fmt: skip
    d.add_argument("--x0_clip", type=float, default=None,
                   help="Clamp what the adversarial terms see to [-c, c]; 0 disables. Default: 1 for pixels (data lie in [-1, 1]), 0 for latents.")  # fmt: skip
    args = parser.parse_args(argv)

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
    args.lora_target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if args.trainable == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--trainable lora needs peft (`pip install peft`), which is not importable here.")
    if args.learning_rate is None:  # the paper's 1e-4 for real DiTs; the tiny CPU preset needs more (docs/DIGITS.md)
        tiny = (
            args.model == "tiny"
            and args.pretrained_model_name_or_path is None
            and args.model_config_name_or_path is None
        )
        args.learning_rate = 1e-3 if tiny else 1e-4
        if args.trainable != "full":  # DiffFit (arXiv 2304.06648) and common LoRA practice: 10x the full-tuning LR
            args.learning_rate *= 10
    try:  # validate the method configs before any work is done
        args.structure = dataclass_from_args(StructureConfig, args, "structure_", STRUCTURE_FLAGS)
        args.diffusion_gan = dataclass_from_args(DiffusionGANConfig, args, "diffusion_gan_", GAN_FLAGS)
    except ValueError as error:
        parser.error(str(error))
    # Both adversarial terms are opt-in (λ = 0 in their configs): on the digits benchmark (docs/BENCHMARKS.md, 3 seeds)
    # SADM's 'paired' loss doubled digits-FID against DSM-only from scratch and was neutral when fine-tuning; the
    # Diffusion-GAN term was neutral from scratch and helped modestly when fine-tuning.
    ratios = (args.structure.disc_update_ratio, args.diffusion_gan.disc_update_ratio)
    if args.gradient_accumulation_steps > 1 and max(ratios) > 1:
        parser.error(
            "--disc_update_ratio > 1 needs --gradient_accumulation_steps 1 (each extra step reuses the micro-batch)."
        )
    if args.structure.weight > 0 and args.structure.scope == "local" and args.train_batch_size < 2:
        parser.error(
            "--structure_loss_weight > 0 needs --train_batch_size >= 2 (relations need pairs) or --structure_scope global."
        )
    if args.structure.weight > 0:
        try:
            args.structure.check_schedule(args.num_train_timesteps)
        except ValueError as error:
            parser.error(f"--structure_*: {error}")
        min_active, local = args.structure.min_active, args.structure.scope == "local"
        if args.structure.uses_active_subbatch and local and args.train_batch_size < min_active:
            parser.error(
                f"--train_batch_size {args.train_batch_size} is smaller than --structure_min_active {min_active}: the "
                "active sub-batch of --structure_formulation mmd / --structure_columns active could never be large "
                "enough. Raise the batch size, lower --structure_min_active, or use --structure_scope global."
            )

    return args


# flag names of config fields that do not follow the prefix rule
STRUCTURE_FLAGS = {
    "weight": "structure_loss_weight",
    "disc_update_ratio": "disc_update_ratio",
    "r1_gamma": "disc_r1_gamma",
}
GAN_FLAGS = {"weight": "gan_loss_weight"}
# default LR of a new label table: the pretrained rows' spread / 100 (docs/FINETUNING.md: at the weights' LR the new
# classes were not learned in 400 steps; at spread / 100 they were, in full, LoRA and DiffFit tuning, 3 seeds each)
LABEL_SPREAD_STEPS = 100


def build_model(
    args,
    num_channels: int,
    num_classes: int,
    id2label: dict[int, str] | None = None,
    vae: AutoencoderKL | None = None,
    vae_source: str | None = None,
) -> DiTTransformer2DModel:
    """The denoiser: pretrained (components checked by `pretrained_components`, label table remapped to the data's
    classes with --label_init), from a config, or a preset; on the VAE's latents when there is a VAE, else on pixels."""
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
        return build_dit(args.model, latent_size, vae.config.latent_channels, num_classes, args.learn_sigma)
    else:
        return build_dit(args.model, args.resolution, num_channels, num_classes, args.learn_sigma)
    if vae is not None:
        check_transformer_fits_latents(model, vae, vae_source, args.resolution, source)
    else:
        check_dit_fits(model, args.resolution, num_channels, source)
    old_id2label = pretrained_id2label(args.pretrained_model_name_or_path)
    if args.label_init is not None and model.config.num_embeds_ada_norm > 1:
        # Adam moves a coordinate by ≲ LR per step: new rows need ~spread / LR steps to lie as far apart as the old ones
        spread = label_spread(model)
        if args.label_learning_rate is None:  # identical rows (spread 0) give no scale: the weights' LR then
            args.label_learning_rate = spread / LABEL_SPREAD_STEPS if spread > 0 else args.learning_rate
        logger.info(
            f"New label tables at LR {args.label_learning_rate:.3g}: the pretrained class rows differ by {spread:.3g} "
            f"per coordinate (std), ~{spread / args.label_learning_rate:.0f} steps for the new rows to spread as far "
            "(--label_learning_rate; docs/FINETUNING.md)"
        )
    model = relabel_for_data(
        model, num_classes, id2label, args.label_init, args.label_map, old_id2label, args.seed, source
    )
    return disable_label_dropout(model)


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
        spectral_norm=args.disc_spectral_norm,
        num_classes=num_classes if args.disc_class_conditional and num_classes else None,
        timm_model_name=args.disc_timm_model_name,
        timm_pretrained_path=args.disc_timm_pretrained_path,
        transformers_config=transformers_config,
        freeze_backbone=args.disc_freeze_backbone,
        num_timesteps=num_timesteps,
    )


def make_disc_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.disc_learning_rate,
        betas=(args.disc_adam_beta1, args.disc_adam_beta2),
        weight_decay=args.disc_adam_weight_decay,
        eps=args.disc_adam_epsilon,
        **adamw_implementation(args),
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


def validation_labels(num_images: int, num_classes: int) -> list[int] | None:
    return [i % num_classes for i in range(num_images)] if num_classes else None


def main(args: argparse.Namespace) -> None:
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator = make_accelerator(args)
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
    struct_cfg = args.structure
    if vae is not None and args.disc_input == "pixel" and struct_cfg.weight > 0 and struct_cfg.noise_conditional:
        raise ValueError(
            "--structure_formulation mmd and --structure_renoise_offset diffuse the samples in the denoiser's (latent) "
            "space: use --disc_input latent with a VAE."
        )
    if args.x0_clip is None:  # pixels lie in [-1, 1]; latents have no fixed range
        args.x0_clip = 0.0 if vae is not None and args.disc_input == "latent" else 1.0

    # ---- data: the class count and names come from the data and go into the export
    dataset = load_train_dataset(data_config_from_args(args))
    num_classes, id2label = dataset.num_classes, dataset.id2label
    logger.info(f"{len(dataset)} training images, {dataset.num_channels} channel(s), {num_classes or 'no'} classes")
    if vae is not None:
        latent_channels, latent_size = check_vae_fits(vae, vae_source, args.resolution, dataset.num_channels)
        logger.info(f"Latent training: {vae_source} encodes to {latent_channels}x{latent_size}x{latent_size}")
        vae.to(accelerator.device)

    # ---- models, optimizer, EMA
    model = build_model(args, dataset.num_channels, num_classes, id2label, vae, vae_source)
    model = setup_trainable(model, args.trainable, args.lora_rank, args.lora_alpha, args.lora_target_modules)
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
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    betas = noise_scheduler.betas.to(accelerator.device)

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

    optimizer_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(
        optimizer_param_groups(model, args.label_learning_rate),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **adamw_implementation(args),  # {} with --use_8bit_adam (the flags exclude each other)
    )

    # ---- adversarial players: the structure discriminator (SADM) and the timestep discriminator (Diffusion-GAN)
    gan_cfg = args.diffusion_gan
    use_structure, use_gan = struct_cfg.weight > 0, gan_cfg.weight > 0
    channels = model.config.in_channels
    disc_channels, disc_size = channels, model.config.sample_size
    if vae is not None and args.disc_input == "pixel":  # the discriminators see decoded images
        disc_channels, disc_size = dataset.num_channels, args.resolution
    struct_disc = struct_opt = gan_disc = gan_opt = diffusion = None
    if use_structure:
        num_timesteps = args.num_train_timesteps if struct_cfg.noise_conditional else None
        struct_disc = build_structure_discriminator(args, disc_channels, disc_size, num_classes, num_timesteps)
        struct_opt = make_disc_optimizer(args, struct_disc)
    if use_gan:
        gan_disc = TimestepDiscriminator(
            in_channels=disc_channels,
            sample_size=disc_size,
            trunk=args.gan_disc_trunk,
            base_channels=args.disc_base_channels,
            t_conditioning=args.gan_disc_trunk != "projected",
            num_classes=num_classes if gan_cfg.class_conditional_disc and num_classes else None,
        )
        gan_opt = make_disc_optimizer(args, gan_disc)
        diffusion = build_adaptive_diffusion(gan_cfg, seed=args.seed).to(accelerator.device)

    train_set, collate = dataset, collate_fn
    if args.cache_latents:  # main process encodes, the others then find the finished file
        cache_dir = args.data_cache_dir or os.path.join(args.output_dir, "latent_cache")
        with accelerator.main_process_first():
            path = build_latent_cache(dataset, vae, cache_dir, disable_progress=not accelerator.is_local_main_process)
        train_set, collate = load_latent_cache(path, dataset), collate_latents
    train_dataloader = make_dataloader(
        train_set, args.train_batch_size, args.seed, args.dataloader_num_workers, collate
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    model_names = ["transformer"]
    if use_structure:
        struct_disc, struct_opt = accelerator.prepare(struct_disc, struct_opt)
        model_names.append("discriminator")
    if use_gan:
        gan_disc, gan_opt = accelerator.prepare(gan_disc, gan_opt)
        model_names.append("timestep_discriminator")
        register_state_hooks(accelerator, {"adaptive_diffusion": diffusion})
    register_model_hooks(
        accelerator, model_names, ema=ema, trainable_only=("transformer",) if args.trainable != "full" else ()
    )
    gather = all_gather_with_grad if struct_cfg.scope == "global" else None
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("sadm", config=tracker_config)

    # ---- resume
    global_step, first_epoch, skip_batches, bad_steps, d_step = 0, 0, 0, None, 0
    resume_path = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        train_state = load_train_state(resume_path)
        global_step, bad_steps, d_step = train_state["global_step"], train_state["bad_steps"], train_state["d_step"]
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")

    bad_steps = BadStepCounter(args.max_bad_steps, bad_steps)  # skipped non-finite steps per model

    # ---- in-training evaluation: feature network and reference statistics, once (None with --eval_steps 0)
    evaluator = setup_in_training_evaluation(
        eval_config_from_args(args), dataset, accelerator, args.output_dir, start_step=global_step
    )

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Steps {args.max_train_steps}, total batch {total_batch}, epochs {num_epochs}, starting at step {global_step}"
    )
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )

    def run_validation(step: int) -> None:
        unwrapped = accelerator.unwrap_model(model)
        if ema is not None:
            ema.store(trained_params)
            ema.copy_to(trained_params)
        unwrapped.eval()
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
        unwrapped.train()
        if ema is not None:
            ema.restore(trained_params)
        log_images(accelerator, "validation", images, step)
        os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
        image_grid(images).save(os.path.join(args.output_dir, "validation", f"step-{step:07d}.png"))

    def run_evaluation(step: int) -> None:
        """Measure the EMA weights on every process (sharded, collective), log eval/<metric>, keep the best in best/.

        The RNG states are restored afterwards: a run with evaluation trains exactly as one without."""
        unwrapped = accelerator.unwrap_model(model)
        with preserve_rng_state(accelerator):
            if ema is not None:
                ema.store(trained_params)
                ema.copy_to(trained_params)
            unwrapped.eval()
            pipeline = make_pipeline(unwrapped, DDPMScheduler.from_config(noise_scheduler.config), id2label, vae)
            results, is_best = evaluator.evaluate(pipeline, step)
            if is_best and accelerator.is_main_process:
                assert_finite_parameters({"transformer": unwrapped})

                def write(folder: str) -> None:
                    make_pipeline(merged_dit(unwrapped), pipeline.scheduler, id2label, vae).save_pretrained(folder)
                    copy_pipeline_file(pipeline_sadm_dit.__file__, folder)
                    evaluator.write_best_metrics(folder, step, results)

                atomic_save_pretrained(evaluator.best_dir, write)
            unwrapped.train()
            if ema is not None:
                ema.restore(trained_params)
        logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()) + (" (best)" * is_best))
        accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
        accelerator.wait_for_everyone()

    # ---- loop
    def optimizer_step(name: str, net, opt, scheduler=None) -> torch.Tensor:
        """Clip, then step only on finite gradients: a bad step is skipped, counted and logged per model."""
        finite, grad_norm = step_if_finite(accelerator, net, opt, args.max_grad_norm, scheduler)
        bad_steps.update(name, finite, global_step)  # raises after --max_bad_steps in a row
        return grad_norm

    model.train()
    pending_real_logits: list[torch.Tensor] = []
    stats: dict[str, torch.Tensor | float] = {}
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_dataloader, skip_batches)
            if epoch == first_epoch
            else train_dataloader
        )
        for batch in batches:
            if vae is None:
                x0 = batch["pixel_values"]  # [B, C, H, W] in [-1, 1]
            else:  # z₀ = s·(μ + σ·n): a fresh posterior sample every step, from cached or freshly encoded moments
                moments = batch["latent_moments"] if args.cache_latents else encode_moments(vae, batch["pixel_values"])
                x0 = sample_latents(moments, vae.config.scaling_factor)  # [B, c, h, w]
            bsz = x0.shape[0]
            labels = batch["class_labels"]
            # --per_sample_noise streams: 0 dropout, t, noise; 1 the denoiser's GAN term; 2 the GAN discriminator;
            # 3 the structure term's reverse-step and re-noising noise
            sample_rngs = gan_g_rngs = gan_d_rngs = struct_rngs = None  # None: the global RNG
            if args.per_sample_noise:
                keys = batch["sample_keys"]
                sample_rngs, gan_g_rngs, gan_d_rngs, struct_rngs = (
                    sample_generators(args.seed, keys, i, x0.device) for i in range(4)
                )
            if labels is not None:
                # classifier-free guidance: drop the label once per sample (all blocks see the null class)
                drop = draw_uniform(bsz, x0.device, sample_rngs) < args.class_dropout_prob
                labels_in = torch.where(drop, torch.full_like(labels, null_class), labels)
            else:
                labels_in = torch.zeros(bsz, dtype=torch.long, device=x0.device)  # unconditional: the single class 0
            struct_labels = labels if args.disc_class_conditional else None
            noise = randn_tensor(x0.shape, sample_rngs, x0.device, x0.dtype) if sample_rngs else torch.randn_like(x0)
            timesteps = draw_timesteps(bsz, args.num_train_timesteps, x0.device, sample_rngs)
            x_t = noise_scheduler.add_noise(x0, noise, timesteps)

            # ---- denoiser step: L_DSM (+ hybrid VLB) + λ·L_struct + λ_adv·L_G, discriminators frozen
            with accelerator.accumulate(model):
                output = model(x_t, timestep=timesteps, class_labels=labels_in).sample  # [B, C or 2C, H, W]
                prediction, var_values = output[:, :channels], output[:, channels:]
                target = training_target(x0, noise, timesteps, alphas_cumprod, args.prediction_type)
                loss_dsm = denoising_loss(
                    prediction, target, timesteps, alphas_cumprod, args.prediction_type, args.snr_gamma
                )
                if learn_sigma:
                    eps_pred = noise_scheduler_eps(prediction, x_t, timesteps, alphas_cumprod, args.prediction_type)
                    loss_vlb = vlb_loss(var_values, eps_pred, x0, x_t, timesteps, betas, alphas_cumprod)
                    loss_dsm = loss_dsm + loss_vlb * (args.num_train_timesteps * args.vlb_weight)
                loss = loss_dsm.mean()
                stats["loss_dsm"] = loss_dsm.detach().mean()
                if use_structure or use_gan:
                    x0_hat = predict_x0(prediction, x_t, timesteps, alphas_cumprod, args.prediction_type)
                    disc_real, disc_fake = x0, x0_hat  # what the discriminators compare
                    if vae is not None and args.disc_input == "pixel":  # through the frozen decoder, into x̂₀
                        with torch.no_grad():
                            disc_real = decode_latents(vae, x0)
                        disc_fake = decode_latents(vae, x0_hat)
                    if args.x0_clip > 0:
                        disc_real = disc_real.clamp(-args.x0_clip, args.x0_clip)
                        disc_fake = disc_fake.clamp(-args.x0_clip, args.x0_clip)
                if use_structure:
                    frozen = accelerator.unwrap_model(struct_disc).requires_grad_(False)  # no DDP hooks in this step
                    struct_in = structure_inputs(
                        disc_real, disc_fake, timesteps, alphas_cumprod, struct_cfg, x_t, struct_rngs
                    )  # what E_φ compares, built once for both steps
                    loss_struct, s_stats = structure_denoiser_loss(
                        frozen, struct_in, struct_cfg, struct_labels, gather, accelerator.process_index
                    )
                    lam = structure_weight_at(global_step, struct_cfg)  # λ, warm-up included
                    if struct_cfg.grad_ratio is not None:  # warm-up share of the gradient-norm λ (capped by weight)
                        ratio_lam = adaptive_structure_weight(loss_dsm.mean(), loss_struct.mean(), output, struct_cfg)
                        lam = lam / struct_cfg.weight * ratio_lam
                    loss = loss + lam * loss_struct.mean()
                    stats.update(loss_struct=loss_struct.detach().mean(), struct_lambda=lam)
                    stats.update(
                        {
                            f"{k}_fake_side" if k == "loss_struct" else k: v
                            for k, v in s_stats.items()
                            if k != "loss_struct"
                        }
                    )
                if use_gan:
                    frozen = accelerator.unwrap_model(gan_disc).requires_grad_(False)
                    gan_weights = structure_timestep_weights(
                        timesteps, alphas_cumprod, args.gan_timestep_weighting, t_threshold=args.gan_t_threshold
                    )
                    loss_g, g_stats = diffusion_gan_generator_loss(
                        frozen, diffusion, disc_fake, labels, gan_cfg, gan_g_rngs
                    )
                    loss = loss + gan_cfg.weight * (loss_g * gan_weights).mean()
                    stats.update(loss_gan_g=(loss_g * gan_weights).detach().mean(), **g_stats)
                stats["loss"] = loss.detach()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    stats["grad_norm"] = optimizer_step("transformer", model, optimizer, lr_scheduler)
                else:
                    optimizer.zero_grad(set_to_none=True)

            # ---- discriminator steps on the same batch, x̂₀ detached (no second denoiser forward). They follow the
            # denoiser's accumulation window: one `accumulate` per micro-batch only (accelerate counts every call), so the
            # discriminators skip the DDP all-reduce with `no_sync` and step exactly when the denoiser does.
            sync = accelerator.sync_gradients
            if use_structure:
                accelerator.unwrap_model(struct_disc).requires_grad_(True)
                for _ in range(struct_cfg.disc_update_ratio):
                    with contextlib.nullcontext() if sync else accelerator.no_sync(struct_disc):
                        loss_d, d_stats = structure_discriminator_loss(
                            struct_disc, struct_in, struct_cfg, struct_labels, gather, accelerator.process_index
                        )
                        accelerator.backward(loss_d.mean())  # divided by the accumulation steps, like the denoiser's
                    if sync:
                        stats["struct_disc_grad_norm"] = optimizer_step("discriminator", struct_disc, struct_opt)
                    stats["loss_struct_disc"] = loss_d.detach().mean()
                    stats.update({f"disc_{k}": v for k, v in d_stats.items()})
            if use_gan:
                accelerator.unwrap_model(gan_disc).requires_grad_(True)
                for _ in range(gan_cfg.disc_update_ratio):
                    with contextlib.nullcontext() if sync else accelerator.no_sync(gan_disc):
                        loss_d, gd_stats, real_logits = diffusion_gan_discriminator_loss(
                            gan_disc, diffusion, disc_real, disc_fake.detach(), labels, gan_cfg, d_step, gan_d_rngs
                        )
                        accelerator.backward((loss_d * gan_weights).mean())
                    pending_real_logits.append(accelerator.gather(real_logits))
                    if sync:
                        stats["gan_disc_grad_norm"] = optimizer_step("timestep_discriminator", gan_disc, gan_opt)
                        d_step += 1
                        diffusion.update(torch.cat(pending_real_logits))  # once per D step, r_d over the global batch
                        pending_real_logits.clear()
                    r1 = gd_stats.pop("r1")  # NaN on D steps without the lazy R1: log the last computed value
                    stats.update(gd_stats)
                    if gan_cfg.r1_gamma > 0:
                        stats["r1"] = r1 if "r1" not in stats else torch.where(r1.isnan(), stats["r1"], r1)
                stats.update({f"ada_{k}": v for k, v in diffusion.stats().items()})

            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(trained_params)
                global_step += 1
                progress.update(1)
                if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                    names = list(stats)
                    values = torch.stack(
                        [
                            torch.as_tensor(stats[n], dtype=torch.float32, device="cpu")
                            if not torch.is_tensor(stats[n])
                            else stats[n].float().cpu()
                            for n in names
                        ]
                    ).tolist()  # noqa: E501
                    logs = dict(zip(names, values), lr=lr_scheduler.get_last_lr()[0], **bad_steps.stats())
                    if ema is not None:
                        logs["ema_decay"] = ema.cur_decay_value
                    postfix = {
                        k: f"{logs[k]:.4g}"
                        for k in ("loss", "loss_dsm", "loss_struct", "loss_gan_g", "ada_T")
                        if k in logs
                    }
                    progress.set_postfix(postfix)
                    accelerator.log(logs, step=global_step)

                if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                    named = {"transformer": accelerator.unwrap_model(model)}
                    if use_structure:
                        named["discriminator"] = accelerator.unwrap_model(struct_disc)
                    if use_gan:
                        named["timestep_discriminator"] = accelerator.unwrap_model(gan_disc)
                    assert_finite_parameters(named)
                    save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        {"epoch": epoch, "bad_steps": bad_steps.state_dict(), "d_step": d_step},
                        args.checkpoints_total_limit,
                    )
                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    run_validation(global_step)
                if args.eval_steps and global_step % args.eval_steps == 0:
                    run_evaluation(global_step)  # on every process
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # ---- export: a pipeline folder with EMA weights, a model card and a pipeline.py
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(trained_params)
        transformer = merged_dit(transformer)  # DiffFit γ folded, LoRA merged: a plain DiTTransformer2DModel
        assert_finite_parameters({"transformer": transformer})
        pipeline = make_pipeline(transformer, DDPMScheduler.from_config(noise_scheduler.config), id2label, vae)

        def write(folder: str) -> None:
            pipeline.save_pretrained(folder)
            copy_pipeline_file(pipeline_sadm_dit.__file__, folder)
            if use_structure:  # next to the pipeline, loadable with StructureDiscriminator.from_pretrained
                accelerator.unwrap_model(struct_disc).save_pretrained(os.path.join(folder, "discriminator"))
            if use_gan:
                accelerator.unwrap_model(gan_disc).save_pretrained(os.path.join(folder, "timestep_discriminator"))
                torch.save(
                    diffusion.state_dict(), os.path.join(folder, "timestep_discriminator", "adaptive_diffusion.pt")
                )
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
                    f"- Objective: {args.prediction_type} prediction; SADM structure loss: {struct_cfg if use_structure else 'off'}; "
                    f"Diffusion-GAN term: {gan_cfg if use_gan else 'off'}; {global_step} steps at batch {total_batch}; EMA: {args.use_ema}.",
                    f"- Sampler sadm {sadm.__version__}: `SADMDiTPipeline`, null class id = {null_class if num_classes else 'n/a'}.",
                    *([DIT_PIPELINE_NOTE.format(null_class=null_class)] if vae is not None else []),
                ],
            )

        atomic_save_pretrained(args.output_dir, write)
        logger.info(f"Pipeline written to {args.output_dir}")
    accelerator.end_training()


def noise_scheduler_eps(prediction, x_t, timesteps, alphas_cumprod, prediction_type):
    """ε̂ from any parameterisation (the VLB term needs ε̂): ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t)."""
    if prediction_type == "epsilon":
        return prediction
    x0_hat = predict_x0(prediction, x_t, timesteps, alphas_cumprod, prediction_type)
    a = alphas_cumprod[timesteps].float().reshape(-1, 1, 1, 1)
    return (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()


if __name__ == "__main__":
    main(parse_args())
