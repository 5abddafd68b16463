"""The checkpoint save hook of the training scripts on real FSDP1 shards, on CPUs over gloo (no accelerate launch).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_hooks_worker.py OUT SHARD_GRAD_OP

accelerate (1.16) does not run FSDP on CPUs, but torch's FSDP1 does: every process wraps the same seeded DiT and
structure discriminator with `FullyShardedDataParallel` (the sharding strategy given, use_orig_params, the DiT's
blocks wrapped separately, as configs/accelerate/fsdp.yaml), takes one AdamW step on the same batch, and calls the save hook that
`sadm.checkpointing.register_model_hooks` registers, with a stand-in for what it reads of accelerate's `Accelerator`.
Rank 0 also trains unwrapped copies on the same batch and writes their weights to OUT/reference/<name>.pt, and what
a process's own unwrapped module holds (its shard) to OUT/local_rank<R>.pt.
"""

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from diffusers.models.attention import BasicTransformerBlock
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from sadm.checkpointing import register_model_hooks
from sadm.models.dit import build_dit
from sadm.models.structure_discriminator import StructureDiscriminator


class FSDPAccelerator:
    """What the hooks read of an `Accelerator` prepared with FSDP1."""

    distributed_type = DistributedType.FSDP
    is_fsdp2 = False

    def __init__(self):
        self.num_processes, self.is_main_process = dist.get_world_size(), dist.get_rank() == 0
        self.save_hooks = []

    def register_save_state_pre_hook(self, hook):
        self.save_hooks.append(hook)

    def register_load_state_pre_hook(self, hook):
        pass

    def unwrap_model(self, model):  # accelerate's `extract_model_from_parallel`: the root wrapper only
        return model.module if isinstance(model, FSDP) else model


def models():
    dit = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2, seed=0)
    torch.manual_seed(1)
    disc = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16)
    return {"transformer": dit, "discriminator": disc}


def train_one_step(named: dict[str, torch.nn.Module]) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=generator)  # [B, C, H, W], the same on every process
    t, labels = torch.randint(0, 1000, (4,), generator=generator), torch.randint(0, 2, (4,), generator=generator)
    loss = named["transformer"](x, timestep=t, class_labels=labels).sample.square().mean()
    loss = loss + named["discriminator"](x).embeddings[:, :3].sum()  # unit-norm rows: not their square
    loss.backward()
    for model in named.values():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        optimizer.step()


def main(out: Path, strategy: ShardingStrategy) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    wrap = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BasicTransformerBlock})
    sharded = {
        name: FSDP(model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=wrap,
                   sharding_strategy=strategy)
        for name, model in models().items()
    }  # fmt: skip
    train_one_step(sharded)
    if rank == 0:
        reference = models()
        train_one_step(reference)
        (out / "reference").mkdir(parents=True)
        for name, model in reference.items():
            torch.save(model.state_dict(), out / "reference" / f"{name}.pt")
    local = {n: p.detach().clone() for n, p in sharded["transformer"].module.named_parameters()}
    torch.save(local, out / f"local_rank{rank}.pt")
    accelerator = FSDPAccelerator()
    register_model_hooks(accelerator, list(sharded))
    accelerator.save_hooks[0](list(sharded.values()), [], str(out / "checkpoint"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), ShardingStrategy[sys.argv[2]])
