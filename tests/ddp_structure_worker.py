"""One SADM step's losses and gradients on a fixed global batch, on however many processes it is launched with.

    python tests/ddp_structure_worker.py OUT local                     # one process, relations over the whole batch
    accelerate launch --multi_gpu --num_processes 2 ... tests/ddp_structure_worker.py OUT global   # gathered relations

Every process builds the same global batch of 4 (x0, labels, t, ε from a seeded generator) and takes its rows in rank
order, as accelerate's data sharding does. The denoiser and the structure discriminator are wrapped by
`accelerator.prepare` (DDP over gloo on 2 processes), and the steps are those of scripts/train_sadm.py: the denoiser's
structure loss through the frozen, unwrapped discriminator, then the discriminator's loss on the detached x̂₀. Rank 0
writes the per-sample losses of the whole batch (gathered) and the gradients after DDP's all-reduce to OUT.
"""

import sys

import torch
from accelerate import Accelerator

from sadm.losses import predict_x0
from sadm.models.dit import build_dit
from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.structure import (
    StructureConfig,
    all_gather_with_grad,
    structure_denoiser_loss,
    structure_discriminator_loss,
    structure_inputs,
)

GLOBAL_BATCH = 4


def main(out: str, scope: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2)
    disc = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16)
    config = StructureConfig(weight=0.05, timestep_weighting="none", warmup_steps=0, scope=scope)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)

    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    b = GLOBAL_BATCH // accelerator.num_processes
    rows = slice(accelerator.process_index * b, (accelerator.process_index + 1) * b)
    x0, labels, t, noise = x0[rows], labels[rows], t[rows], noise[rows]

    model, disc = accelerator.prepare(model, disc)
    gather = all_gather_with_grad if scope == "global" else None
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat = predict_x0(model(x_t, timestep=t, class_labels=labels).sample, x_t, t, alphas_cumprod, "epsilon")

    frozen = accelerator.unwrap_model(disc).requires_grad_(False)  # the denoiser step, as in the script
    loss_g, _ = structure_denoiser_loss(
        frozen,
        structure_inputs(x0, x0_hat, t, alphas_cumprod, config),
        config,
        None,
        gather,
        accelerator.process_index,
    )
    accelerator.backward(loss_g.mean())
    accelerator.unwrap_model(disc).requires_grad_(True)
    loss_d, _ = structure_discriminator_loss(
        disc,
        structure_inputs(x0, x0_hat.detach(), t, alphas_cumprod, config),
        config,
        None,
        gather,
        accelerator.process_index,
    )
    accelerator.backward(loss_d.mean())

    result = {
        "loss_denoiser": accelerator.gather(loss_g.detach()),  # [GLOBAL_BATCH], rank order
        "loss_discriminator": accelerator.gather(loss_d.detach()),
        "grads_denoiser": {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters()},
        "grads_discriminator": {
            n: p.grad.clone() for n, p in accelerator.unwrap_model(disc).named_parameters() if p.grad is not None
        },
    }
    if accelerator.is_main_process:
        torch.save(result, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
