#!/usr/bin/env python
"""Train or fine-tune a DiT with the denoising loss plus, optionally, SADM's structure loss and a Diffusion-GAN term.

    accelerate launch scripts/train_sadm.py --model tiny --max_train_steps 2000 --output_dir runs/digits

With `--structure_loss_weight 0 --gan_loss_weight 0` this is a plain DiT trainer. The output folder is a diffusers
pipeline (`SADMDiTPipeline`, EMA weights when `--use_ema`) with `checkpoint-N/` folders beside it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import sadm
from sadm.data import add_data_args, collate_fn, load_train_dataset_from_args
from sadm.losses import denoising_loss, predict_x0, training_target, vlb_loss
from sadm.models.dit import DIT_PRESETS, build_dit, check_dit_fits, disable_label_dropout
from sadm.pipelines import pipeline_sadm_dit
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline
from sadm.training import (
    add_training_args,
    assert_finite_parameters,
    atomic_save_pretrained,
    check_output_dir,
    copy_pipeline_file,
    image_grid,
    load_train_state,
    log_images,
    make_accelerator,
    make_dataloader,
    register_model_hooks,
    resolve_resume_path,
    save_checkpoint,
    write_model_card,
)

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_training_args(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="tiny", choices=sorted(DIT_PRESETS), help="DiT preset (ignored with a config/pretrained).")
    g.add_argument("--model_config_name_or_path", type=str, default=None, help="A DiTTransformer2DModel config (json or folder).")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A pipeline folder or hub id with a transformer/ subfolder (e.g. a previous export) to fine-tune.",
    )
    g.add_argument("--learn_sigma", action="store_true", help="Output 2C channels and train the improved-DDPM hybrid loss.")
    g.add_argument("--class_dropout_prob", type=float, default=0.1, help="Label dropout for classifier-free guidance (DiT: 0.1).")
    g.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-γ loss weighting (5.0 recommended); off by default.")
    g.add_argument("--num_train_timesteps", type=int, default=1000, help="DDPM steps (DiT: 1000, linear β 1e-4 → 0.02).")
    g.add_argument("--vlb_weight", type=float, default=0.001, help="λ of L_simple + λ·L_vlb when σ is learned (iDDPM: 0.001).")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    v = parser.add_argument_group("validation")
    v.add_argument("--validation_steps", type=int, default=500, help="Sample a validation grid every N steps (0: never).")
    v.add_argument("--num_validation_images", type=int, default=20, help="Images per validation grid (cycling the classes).")
    v.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale for validation images.")
    v.add_argument("--num_inference_steps", type=int, default=100, help="Sampling steps for validation images.")
    # adversarial terms (the SADM and Diffusion-GAN sections extend these)
    a = parser.add_argument_group("adversarial")
    a.add_argument("--structure_loss_weight", type=float, default=0.0, help="λ of SADM's structure loss (0 disables it).")
    a.add_argument("--gan_loss_weight", type=float, default=0.0, help="λ_adv of the Diffusion-GAN term (0 disables it).")
    args = parser.parse_args(argv)

    if args.resolution <= 0:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        parser.error(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}")
    if args.gradient_accumulation_steps < 1:
        parser.error(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.pretrained_model_name_or_path is None and args.model_config_name_or_path is None:
        patch = DIT_PRESETS[args.model]["patch_size"]
        if args.resolution % patch:
            parser.error(f"--resolution {args.resolution} is not divisible by the patch size {patch} of --model {args.model}")
    if args.structure_loss_weight or args.gan_loss_weight:
        parser.error("The adversarial terms are not available in this build; use --structure_loss_weight 0 --gan_loss_weight 0.")
    return args


def build_model(args, num_channels: int, num_classes: int) -> DiTTransformer2DModel:
    if args.pretrained_model_name_or_path is not None:
        model = DiTTransformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer")
        source = f"{args.pretrained_model_name_or_path}/transformer"
    elif args.model_config_name_or_path is not None:
        model = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(args.model_config_name_or_path))
        source = args.model_config_name_or_path
    else:
        return build_dit(args.model, args.resolution, num_channels, num_classes, args.learn_sigma)
    check_dit_fits(model, args.resolution, num_channels, source)
    if num_classes and model.config.num_embeds_ada_norm != num_classes:
        raise ValueError(
            f"{source} has {model.config.num_embeds_ada_norm} classes but the data has {num_classes}; "
            "relabelling a pretrained model comes with the fine-tuning options."
        )
    return disable_label_dropout(model)


def make_pipeline(transformer, noise_scheduler: DDPMScheduler, id2label) -> SADMDiTPipeline:
    return SADMDiTPipeline(transformer=transformer, scheduler=noise_scheduler, vae=None, id2label=id2label)


def validation_labels(num_images: int, num_classes: int) -> list[int] | None:
    return [i % num_classes for i in range(num_images)] if num_classes else None


def main(args: argparse.Namespace) -> None:
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    # ---- data: the class count and names come from the data and go into the export
    dataset = load_train_dataset_from_args(args)
    num_classes, id2label = dataset.num_classes, dataset.id2label
    logger.info(f"{len(dataset)} training images, {dataset.num_channels} channel(s), {num_classes or 'no'} classes")

    # ---- models, optimizer, EMA
    model = build_model(args, dataset.num_channels, num_classes)
    learn_sigma = model.config.out_channels == 2 * model.config.in_channels
    null_class = model.config.num_embeds_ada_norm  # the null row of the label table: id = class count
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
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
    if args.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=DiTTransformer2DModel,
            model_config=model.config,
        )
        ema.to(accelerator.device)

    optimizer_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    train_dataloader = make_dataloader(dataset, args.train_batch_size, args.seed, args.dataloader_num_workers, collate_fn)
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
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    register_model_hooks(accelerator, ["transformer"], ema=ema)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("sadm", config=tracker_config)

    # ---- resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = load_train_state(resume_path)["global_step"]
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"Steps {args.max_train_steps}, total batch {total_batch}, epochs {num_epochs}, starting at step {global_step}")
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    bad_steps = 0

    def run_validation(step: int) -> None:
        unwrapped = accelerator.unwrap_model(model)
        if ema is not None:
            ema.store(unwrapped.parameters())
            ema.copy_to(unwrapped.parameters())
        unwrapped.eval()
        pipeline = make_pipeline(unwrapped, DDPMScheduler.from_config(noise_scheduler.config), id2label)
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
            ema.restore(unwrapped.parameters())
        log_images(accelerator, "validation", images, step)
        os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
        image_grid(images).save(
            os.path.join(args.output_dir, "validation", f"step-{step:07d}.png")
        )

    # ---- loop
    model.train()
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dataloader, skip_batches) if epoch == first_epoch else train_dataloader
        for batch in batches:
            with accelerator.accumulate(model):
                x0 = batch["pixel_values"]  # [B, C, H, W] in [-1, 1]
                bsz = x0.shape[0]
                if batch["class_labels"] is not None:
                    labels = batch["class_labels"]
                    # classifier-free guidance: drop the label once per sample (all blocks see the null class)
                    drop = torch.rand(bsz, device=x0.device) < args.class_dropout_prob
                    labels_in = torch.where(drop, torch.full_like(labels, null_class), labels)
                else:
                    labels_in = torch.zeros(bsz, dtype=torch.long, device=x0.device)  # unconditional: the single class 0
                noise = torch.randn_like(x0)
                timesteps = torch.randint(0, args.num_train_timesteps, (bsz,), device=x0.device)
                x_t = noise_scheduler.add_noise(x0, noise, timesteps)

                output = model(x_t, timestep=timesteps, class_labels=labels_in).sample  # [B, C or 2C, H, W]
                channels = x0.shape[1]
                prediction, var_values = output[:, :channels], output[:, channels:]
                target = training_target(x0, noise, timesteps, alphas_cumprod, args.prediction_type)
                loss_dsm = denoising_loss(prediction, target, timesteps, alphas_cumprod, args.prediction_type, args.snr_gamma)
                if learn_sigma:
                    eps_pred = noise_scheduler_eps(prediction, x_t, timesteps, alphas_cumprod, args.prediction_type)
                    loss_vlb = vlb_loss(var_values, eps_pred, x0, x_t, timesteps, betas, alphas_cumprod)
                    loss_dsm = loss_dsm + loss_vlb * (args.num_train_timesteps * args.vlb_weight)
                loss = loss_dsm.mean()

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    if torch.isfinite(grad_norm):  # one host sync per optimizer step
                        optimizer.step()
                        lr_scheduler.step()
                        bad_steps = 0
                    else:
                        bad_steps += 1
                        logger.warning(f"Non-finite gradient at step {global_step}: skipped ({bad_steps} in a row).")
                        if bad_steps >= args.max_bad_steps:
                            raise FloatingPointError(
                                f"{bad_steps} consecutive non-finite steps (--max_bad_steps {args.max_bad_steps}); stopping."
                            )
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(model.parameters())
                global_step += 1
                progress.update(1)
                logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=global_step)

                if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                    assert_finite_parameters({"transformer": accelerator.unwrap_model(model)})
                    save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        {"epoch": epoch, "bad_steps": bad_steps},
                        args.checkpoints_total_limit,
                    )
                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    run_validation(global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # ---- export: a pipeline folder with EMA weights, a model card and a pipeline.py
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(transformer.parameters())
        assert_finite_parameters({"transformer": transformer})
        pipeline = make_pipeline(transformer, DDPMScheduler.from_config(noise_scheduler.config), id2label)

        def write(folder: str) -> None:
            pipeline.save_pretrained(folder)
            copy_pipeline_file(pipeline_sadm_dit.__file__, folder)
            data = args.dataset_name or args.train_data_dir or "the embedded scikit-learn digits (8x8, 10 classes)"
            write_model_card(
                folder,
                "DiT trained with sadm",
                [
                    f"- Data: {data}, {len(dataset)} images at {args.resolution}px, {num_classes or 'no'} classes.",
                    f"- Model: {args.pretrained_model_name_or_path or args.model_config_name_or_path or args.model}, "
                    f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters, learned σ: {learn_sigma}.",
                    f"- Objective: {args.prediction_type} prediction, structure λ {args.structure_loss_weight}, "
                    f"GAN λ {args.gan_loss_weight}; {global_step} steps at batch {total_batch}; EMA: {args.use_ema}.",
                    f"- Sampler sadm {sadm.__version__}: `SADMDiTPipeline`, null class id = {null_class if num_classes else 'n/a'}.",
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
