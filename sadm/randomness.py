"""Per-sample randomness: one generator per sample, seeded by (seed, sample key, stream), and draws from them.

A run that draws its noise and timesteps this way (`--per_sample_noise`) is the same on any number of processes and
gradient-accumulation steps (tests/test_equivalence.py).
"""

from __future__ import annotations

import torch


def sample_generators(
    seed: int, sample_keys: torch.Tensor, stream: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample on `device`, seeded by a hash of (seed, sample key, stream).

    Draws made from them depend only on the sample (its key says which image in which epoch, see `EpochShuffleSampler`),
    not on its position in the batch, the process that holds it or the micro-batch it falls in: a run is then the same
    on any number of processes and accumulation steps. `stream` separates independent uses of one sample. Generators on
    the GPU draw there (one small kernel per sample); CPU and GPU generators give different numbers.
    """
    return [torch.Generator(device=device).manual_seed(_mix64(seed, key, stream)) for key in sample_keys.tolist()]


def _mix64(*values: int) -> int:
    """SplitMix64 over the values: nearby (seed, key, stream) triples give unrelated 64-bit seeds."""
    mask, x = (1 << 64) - 1, 0
    for value in values:
        x = (x + 0x9E3779B97F4A7C15 + (value & mask)) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x


def draw_uniform(n: int, device: torch.device, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """U[0, 1) `[n]`: from the global RNG (`torch.rand`), or sample i from `generators[i]`."""
    if generators is None:
        return torch.rand(n, device=device)
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(device)


def draw_timesteps(
    n: int, num_timesteps: int, device: torch.device, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_timesteps) `[n]`: from the global RNG, or sample i from `generators[i]`."""
    if generators is None:
        return torch.randint(0, num_timesteps, (n,), device=device)
    return torch.cat([torch.randint(0, num_timesteps, (1,), generator=g, device=g.device) for g in generators]).to(
        device
    )
