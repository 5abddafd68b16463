#!/usr/bin/env python
"""How hard does the structure term push the denoiser, next to the denoising loss? A diagnostic for a trained export.

    python scripts/structure_gradient_ratio.py --pipeline runs/study/sadm_mmd/seed0 --structure_formulation mmd \
        --structure_timestep_weighting none --structure_reverse_step 10

For batches of the training data at t in a few buckets, it runs the exported denoiser (`transformer/`) and structure
discriminator (`discriminator/`) once and prints, per bucket, the norms of the gradients of L_DSM and of the unweighted
structure term (λ = 1) with respect to the denoiser's output, and their ratio: the λ at which the structure term would
push as hard as the denoising loss is 1 / ratio. The structure options must be those the export was trained with.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from sadm.cli import add_data_args, add_dataclass_args, data_config_from_args, dataclass_from_args
from sadm.data import load_train_dataset
from sadm.losses import denoising_loss, predict_x0, training_target
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.structure import StructureConfig, structure_denoiser_loss, structure_inputs

BUCKETS = ((0, 100), (100, 250), (250, 500), (500, 1000))
RENAME = {"weight": "structure_loss_weight", "disc_update_ratio": "disc_update_ratio", "r1_gamma": "disc_r1_gamma"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=str, required=True, help="An export with transformer/ and discriminator/.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=8, help="Batches per timestep bucket.")
    parser.add_argument("--seed", type=int, default=0)
    add_data_args(parser)
    add_dataclass_args(parser, StructureConfig, "structure_", RENAME)
    args = parser.parse_args(argv)
    args.structure = dataclass_from_args(StructureConfig, args, "structure_", RENAME)
    return args


def main(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    model = DiTTransformer2DModel.from_pretrained(args.pipeline, subfolder="transformer").eval()
    disc = (
        StructureDiscriminator.from_pretrained(args.pipeline, subfolder="discriminator").eval().requires_grad_(False)
    )
    scheduler = DDPMScheduler.from_pretrained(args.pipeline, subfolder="scheduler")
    alphas_cumprod = scheduler.alphas_cumprod
    config = args.structure
    dataset = load_train_dataset(data_config_from_args(args))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    channels = model.config.in_channels
    rows = []
    for low, high in BUCKETS:
        norms_dsm, norms_struct = [], []
        batches = iter(loader)
        for _ in range(args.num_batches):
            batch = next(batches)
            x0, labels = batch["pixel_values"], batch["class_labels"]
            t = torch.randint(low, high, (x0.shape[0],))
            noise = torch.randn_like(x0)
            x_t = scheduler.add_noise(x0, noise, t)
            output = model(x_t, timestep=t, class_labels=labels).sample
            prediction = output[:, :channels]
            target = training_target(x0, noise, t, alphas_cumprod, scheduler.config.prediction_type)
            loss_dsm = denoising_loss(prediction, target, t, alphas_cumprod, scheduler.config.prediction_type).mean()
            x0_hat = predict_x0(prediction, x_t, t, alphas_cumprod, scheduler.config.prediction_type).clamp(-1, 1)
            inputs = structure_inputs(x0.clamp(-1, 1), x0_hat, t, alphas_cumprod, config, x_t)
            loss_struct = structure_denoiser_loss(disc, inputs, config)[0].mean()
            (grad_dsm,) = torch.autograd.grad(loss_dsm, output, retain_graph=True)
            (grad_struct,) = torch.autograd.grad(loss_struct, output)
            norms_dsm.append(grad_dsm.norm().item())
            norms_struct.append(grad_struct.norm().item())
        ratio = np.mean(norms_struct) / np.mean(norms_dsm)
        rows.append(
            {
                "t": f"[{low}, {high})",
                "grad_dsm": np.mean(norms_dsm),
                "grad_struct": np.mean(norms_struct),
                "ratio": ratio,
            }
        )
    print("| t | ‖∇L_DSM‖ | ‖∇L_struct‖ (λ = 1) | ratio | λ for an equal push |")
    print("|---|---|---|---|---|")
    for row in rows:
        equal = 1 / row["ratio"] if row["ratio"] > 0 else float("inf")
        print(f"| {row['t']} | {row['grad_dsm']:.3g} | {row['grad_struct']:.3g} | {row['ratio']:.3g} | {equal:.3g} |")
    return rows


if __name__ == "__main__":
    main(parse_args())
