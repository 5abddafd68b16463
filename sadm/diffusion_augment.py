"""Diffusion-GAN's adaptive forward diffusion, the noise that both real and generated samples pass through before the
discriminator (Wang et al., ICLR 2023, arXiv 2206.02262; METHODS.md §2).

    y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε,   ε ~ N(0, I),   t ~ a 64-slot table (half zeros, half drawn from π over 1..T)

The length T follows a scalar p ∈ [0, 1] that an ADA-style heuristic moves with the sign of the discriminator's real
logits. Everything below reproduces the official code (`diffusion-stylegan2/training/diffusion.py` and
`training_loop.py`, `diffusion-projected-gan/pg_modules/diffusion.py`), which the paper's equations do not spell out:

- β is linear from `beta_start` to `beta_end` **re-spaced over the current T** (T values) each time T changes, and
  ᾱ is prefixed with 1 so that t = 0 means "no noise";
- T = clip(T_min + round(p·(T_max − T_min)), T_min, T_max), with Python's `round` (half to even), as the official code;
- every `ada_interval` discriminator steps: p ← clip(p + sign(r_d − target)·(batch·ada_interval)/(ada_kimg·1000), 0, 1),
  with r_d the mean sign of the real logits since the last adjustment; then T and the t-table are rebuilt (the
  table is re-drawn at every adjustment, also when T does not change or p is frozen);
- the t-table: round(clean_fraction·table_size) zero slots, the rest drawn with replacement from π over 1..T
  (`priority`: π_k ∝ k − 1, so t = 1 is never drawn; `uniform`: π_k = 1/T; `logit_normal` (ours, SD3's timestep
  density): π_k ∝ the standard logit-normal density at u = k / (T + 1), most mass at mid noise, little at either end);
  a sample's t is a uniform pick from it.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

# Diffusion-GAN's defaults per base GAN (METHODS.md §2.2, official code and README commands).
DIFFUSION_GAN_PRESETS: dict[str, dict] = {
    "stylegan2": {
        "beta_start": 1e-4,
        "beta_end": 2e-2,
        "t_min": 10,
        "t_max": 1000,
        "noise_std": 0.05,
        "ts_dist": "priority",
        "target": 0.6,
        "ada_interval": 4,
        "ada_kimg": 100,
        "t_table": "stylegan2",
    },
    "projected_gan": {
        "beta_start": 1e-4,
        "beta_end": 1e-2,
        "t_min": 5,
        "t_max": 500,
        "noise_std": 0.5,
        "ts_dist": "priority",
        "target": 0.6,  # 0.45 on CIFAR-10 in the official README
        "ada_interval": 4,
        "ada_kimg": 100,
        "t_table": "projected_gan",
    },
    "insgen": {
        "beta_start": 1e-4,
        "beta_end": 2e-2,
        "t_min": 10,
        "t_max": 500,
        "noise_std": 0.05,
        "ts_dist": "uniform",
        "target": 0.6,
        "ada_interval": 4,
        "ada_kimg": 100,
        "t_table": "stylegan2",
    },
}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TS_DISTS = ("priority", "uniform", "logit_normal")
T_TABLES = ("stylegan2", "projected_gan")


def alphas_cumprod_for_length(
    num_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str = "linear"
) -> torch.Tensor:
    """ᾱ over t = 0..T for a schedule of `num_timesteps` steps, prefixed with 1 (t = 0: no noise), float32 `[T + 1]`.

    Diffusion-GAN official code, `set_diffusion_process`: β spans beta_start → beta_end over the *current* T.
    The maths is diffusers' `DDPMScheduler(num_train_timesteps=T, ...)`: `linear` is the paper's schedule,
    `scaled_linear` is the official code's `quad`, `squaredcos_cap_v2` its `cosine` (β bounds unused).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule '{beta_schedule}' is not one of {', '.join(BETA_SCHEDULES)}.")
    scheduler = DDPMScheduler(
        num_train_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
    )
    return torch.cat([torch.ones(1), scheduler.alphas_cumprod.float()])  # [T + 1]


def q_sample(
    x: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise_std: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε (Diffusion-GAN eq. 3 with noise scale σ = `noise_std`).

    Args:
        x (`torch.Tensor` of shape `[B, ...]`): clean inputs (images, latents or feature maps).
        t (`torch.LongTensor` of shape `[B]` or `[B, C]`): one step per sample, or one per (sample, channel).
        alphas_cumprod (`torch.Tensor` of shape `[T + 1]`): ᾱ with ᾱ_0 = 1.
        noise_std (`float`): σ.
        generator (`torch.Generator` or one per sample, *optional*): drives ε.
    """
    if t.shape != x.shape[: t.ndim] or t.ndim > 2:
        raise ValueError(f"t of shape {tuple(t.shape)} must be [B] or [B, C] for x of shape {tuple(x.shape)}.")
    alpha_bar = alphas_cumprod.to(device=x.device)[t.to(x.device)]  # [B] or [B, C]
    alpha_bar = alpha_bar.reshape(*t.shape, *([1] * (x.ndim - t.ndim))).to(x.dtype)  # [B, 1, ...] or [B, C, 1, ...]
    noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise_std * noise


def noise_feature_maps(
    features: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise_std: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Diffusion-ProjectedGAN (official `pg_modules/diffusion.py`): noise frozen feature maps `[B, C, H, W]` with one t
    per (sample, channel), `t` of shape `[B, C]`; a `[B]` t applies one noise level to all channels of a sample."""
    if features.ndim != 4:
        raise ValueError(f"features must be [B, C, H, W], got shape {tuple(features.shape)}.")
    return q_sample(features, t, alphas_cumprod, noise_std, generator=generator)


def _draw(
    table: torch.Tensor,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Uniform picks from the t-table, `LongTensor` of `shape` on `device` (drawn where `generator` lives).

    A list of `shape[0]` generators draws the picks of sample i from `generator[i]` (as diffusers' `randn_tensor`)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}.")
        return torch.cat([_draw(table, (1, *shape[1:]), device, g) for g in generator])
    draw_device = generator.device if generator is not None else device
    index = torch.randint(table.numel(), shape, generator=generator, device=draw_device)
    return table.to(draw_device)[index].to(device)


class AdaptiveDiffusion(torch.nn.Module):
    r"""
    Diffusion-GAN's adaptive forward diffusion `(x) -> (y, t)` (official `Diffusion` module + ADA heuristic).

    Call it on real and generated batches alike; call [`~AdaptiveDiffusion.update`] once per discriminator step with
    that step's real logits (the global batch). All adaptive state (p, T, the t-table, the running sign sum and count,
    the update counter, the table RNG) is in `state_dict()` and `load_state_dict` restores it exactly.

    Args:
        beta_schedule (`str`, defaults to `"linear"`): `linear` (paper), `scaled_linear` (official `quad`) or
            `squaredcos_cap_v2` (official `cosine`), computed by diffusers' `DDPMScheduler`.
        beta_start (`float`, defaults to 1e-4): first β of the schedule over the current T.
        beta_end (`float`, defaults to 2e-2): last β of the schedule over the current T.
        t_min (`int`, defaults to 10): smallest T (at p = 0).
        t_max (`int`, defaults to 1000): largest T (at p = 1).
        noise_std (`float`, defaults to 0.05): σ, the scale of the Gaussian noise.
        ts_dist (`str`, defaults to `"priority"`): π over 1..T, `priority` (∝ t − 1), `uniform` or `logit_normal`
            (∝ the standard logit-normal density at t / (T + 1)).
        target (`float`, defaults to 0.6): d_target for r_d = E[sign(D(y_real))], in (−1, 1).
        ada_interval (`int`, defaults to 4): discriminator steps between adjustments of p.
        ada_kimg (`float`, defaults to 100): thousands of real samples for p to move by 1.
        clean_fraction (`float`, defaults to 0.5): share of zero (clean) slots in the t-table (`t_table="stylegan2"`).
        table_size (`int`, defaults to 64): slots in the t-table.
        t_table (`str`, defaults to `"stylegan2"`): how the table is filled. `stylegan2` (official StyleGAN2 and InsGen
            code): round(clean_fraction·size) zeros. `projected_gan` (official ProjectedGAN code): min(round(p·size),
            round(0.75·size)) slots drawn from π and the rest zeros, so the noised share grows with p (none at p = 0).
        adaptive (`bool`, defaults to `True`): False freezes p (and so T) for ablations; `update` then records r_d
            and, every `ada_interval` calls, re-draws the t-table over the same T (as the official code).
        initial_p (`float`, *optional*): p at start; defaults to 0 when adaptive (the official code) and to 1 (T = t_max)
            when not.
        seed (`int`, defaults to 0): seeds the generator that fills the t-table, so the whole state is reproducible.
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        t_min: int = 10,
        t_max: int = 1000,
        noise_std: float = 0.05,
        ts_dist: str = "priority",
        target: float = 0.6,
        ada_interval: int = 4,
        ada_kimg: float = 100,
        clean_fraction: float = 0.5,
        table_size: int = 64,
        t_table: str = "stylegan2",
        adaptive: bool = True,
        initial_p: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule '{beta_schedule}' is not one of {', '.join(BETA_SCHEDULES)}.")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
        if t_min < 1:
            raise ValueError(f"t_min={t_min} must be >= 1 (t = 0 is the clean slot).")
        if t_min > t_max:
            raise ValueError(f"t_min={t_min} must not exceed t_max={t_max}.")
        if ts_dist not in TS_DISTS:
            raise ValueError(f"ts_dist '{ts_dist}' is not one of {', '.join(TS_DISTS)}.")
        if ts_dist == "priority" and t_min < 2:
            raise ValueError(
                f"t_min={t_min} must be >= 2 with ts_dist='priority' (its weights ∝ t − 1 vanish at T = 1)."
            )
        if not -1 < target < 1:
            raise ValueError(f"target={target} must be in (-1, 1): it is compared with a mean sign of logits.")
        if noise_std <= 0:
            raise ValueError(f"noise_std={noise_std} must be > 0.")
        if ada_interval < 1:
            raise ValueError(f"ada_interval={ada_interval} must be >= 1.")
        if ada_kimg <= 0:
            raise ValueError(f"ada_kimg={ada_kimg} must be > 0.")
        if not 0 <= clean_fraction <= 1:
            raise ValueError(f"clean_fraction={clean_fraction} must be in [0, 1].")
        if table_size < 1:
            raise ValueError(f"table_size={table_size} must be >= 1.")
        if t_table not in T_TABLES:
            raise ValueError(f"t_table '{t_table}' is not one of {', '.join(T_TABLES)}.")
        if initial_p is None:
            initial_p = 0.0 if adaptive else 1.0
        if not 0 <= initial_p <= 1:
            raise ValueError(f"initial_p={initial_p} must be in [0, 1].")

        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.t_min = int(t_min)
        self.t_max = int(t_max)
        self.noise_std = float(noise_std)
        self.ts_dist = ts_dist
        self.target = float(target)
        self.ada_interval = int(ada_interval)
        self.ada_kimg = float(ada_kimg)
        self.clean_fraction = float(clean_fraction)
        self.table_size = int(table_size)
        self.t_table = t_table
        self.adaptive = adaptive
        self.seed = int(seed)

        # adaptive state; `get_extra_state`/`set_extra_state` carry it through state_dict()
        self.p = float(initial_p)
        self.T = self.t_min
        self.r_d = 0.0  # r_d of the last adjustment (for logging)
        self.sign_sum = 0.0  # Σ sign(real logits) since the last adjustment (a 0-d tensor once updated)
        self.sign_count = 0  # number of real logits since the last adjustment
        self.num_updates = 0  # calls to update()
        self.table_generator = torch.Generator().manual_seed(self.seed)
        # derived from T / refilled at each adjustment; non-persistent so they follow .to(device) but not the checkpoint
        self.register_buffer("alphas_cumprod", torch.ones(1), persistent=False)
        self.register_buffer("timestep_table", torch.zeros(self.table_size, dtype=torch.long), persistent=False)
        self.update_T()

    # Diffusion-GAN official code, `update_T`: T from p, β re-spaced over T, t-table refilled.
    def update_T(self) -> None:
        """Recompute T from p, ᾱ over the new T, and refill the t-table from the internal generator."""
        T = int(min(max(self.t_min + round(self.p * (self.t_max - self.t_min)), self.t_min), self.t_max))
        if T != self.T or self.alphas_cumprod.numel() != T + 1:
            alphas_cumprod = alphas_cumprod_for_length(T, self.beta_start, self.beta_end, self.beta_schedule)
            self.alphas_cumprod = alphas_cumprod.to(self.alphas_cumprod.device)
        self.T = T

        if self.t_table == "stylegan2":
            num_noised = self.table_size - round(self.clean_fraction * self.table_size)
        else:  # projected_gan: official `diffusion_ind = min(round(p * 64), 48)`
            num_noised = min(round(self.p * self.table_size), round(0.75 * self.table_size))
        table = torch.zeros(self.table_size, dtype=torch.long)
        if num_noised > 0:
            if self.ts_dist == "priority":
                weights = torch.arange(T, dtype=torch.float64)  # π_k ∝ k − 1 for k = 1..T
            elif self.ts_dist == "logit_normal":
                u = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
                weights = torch.exp(-0.5 * torch.logit(u) ** 2) / (u * (1 - u))  # N(0, 1) density of logit(u)
            else:
                weights = torch.ones(T, dtype=torch.float64)  # π_k = 1/T
            draws = torch.multinomial(weights, num_noised, replacement=True, generator=self.table_generator)
            table[:num_noised] = draws + 1  # index k−1 -> timestep k
        self.timestep_table = table.to(self.timestep_table.device)

    # StyleGAN2-ADA / Diffusion-GAN training loop: the ADA heuristic on the sign of the real logits.
    @torch.no_grad()
    def update(self, real_logits: torch.Tensor) -> None:
        """Record one discriminator step's real logits (the global batch); every `ada_interval` calls adjust p and T.

        p ← clip(p + sign(r_d − target)·N/(ada_kimg·1000), 0, 1), where N is the number of logits recorded since the
        last adjustment (= batch·ada_interval for a constant batch) and r_d their mean sign. Every adjustment then
        re-draws the t-table from the table RNG, also when T is unchanged and when p is frozen (`adaptive=False`), as
        the official code calls `update_T` at every ada_interval.
        """
        signs = torch.sign(real_logits.detach().float()).flatten()
        self.sign_sum = self.sign_sum + signs.sum()  # a tensor on the logits' device: no host sync between adjustments
        self.sign_count += signs.numel()
        self.num_updates += 1
        if self.num_updates % self.ada_interval != 0:
            return
        self.r_d = float(self.sign_sum) / max(self.sign_count, 1)
        if self.adaptive:
            adjust = math.copysign(1.0, self.r_d - self.target) if self.r_d != self.target else 0.0
            self.p = min(max(self.p + adjust * self.sign_count / (self.ada_kimg * 1000), 0.0), 1.0)
        self.update_T()  # T from p (fixed when not adaptive; ᾱ is only recomputed when T changes), table re-drawn
        self.sign_sum, self.sign_count = 0.0, 0

    def sample_timesteps(
        self,
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Steps drawn uniformly from the t-table, `LongTensor` of `shape` (0 = clean)."""
        return _draw(self.timestep_table, tuple(shape), torch.device(device), generator)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffuse a batch `[B, ...]`: returns `(y, t)` with y = √ᾱ_t·x + √(1−ᾱ_t)·σ·ε and t `[B]` long.

        `generator` may be one generator per sample: sample i's t and ε then come from `generator[i]` alone, so the
        result does not depend on how the batch is split across processes or micro-batches.
        Gradients flow from y to x (the generator learns through the noise).
        """
        t = self.sample_timesteps((x.shape[0],), x.device, generator)  # [B]
        return q_sample(x, t, self.alphas_cumprod, self.noise_std, generator=generator), t

    def noise_feature_maps(
        self, features: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion-ProjectedGAN: noise feature maps `[B, C, H, W]` with one t per (sample, channel) drawn from the
        t-table; returns `(features_noised, t [B, C])`."""
        t = self.sample_timesteps(tuple(features.shape[:2]), features.device, generator)  # [B, C]
        return noise_feature_maps(features, t, self.alphas_cumprod, self.noise_std, generator=generator), t

    def stats(self) -> dict[str, float]:
        """`r_d` (of the last adjustment), `p` and `T` as python floats, for logging."""
        return {"r_d": float(self.r_d), "p": float(self.p), "T": float(self.T)}

    def get_extra_state(self) -> dict:
        return {
            "p": self.p,
            "T": self.T,
            "r_d": self.r_d,
            "sign_sum": float(self.sign_sum),
            "sign_count": self.sign_count,
            "num_updates": self.num_updates,
            "timestep_table": self.timestep_table.detach().cpu().clone(),
            "table_generator_state": self.table_generator.get_state(),
        }

    def set_extra_state(self, state: dict) -> None:
        self.p = float(state["p"])
        self.r_d = float(state["r_d"])
        self.sign_sum = float(state["sign_sum"])
        self.sign_count = int(state["sign_count"])
        self.num_updates = int(state["num_updates"])
        self.table_generator.set_state(state["table_generator_state"])
        self.T = int(state["T"])
        alphas_cumprod = alphas_cumprod_for_length(self.T, self.beta_start, self.beta_end, self.beta_schedule)
        self.alphas_cumprod = alphas_cumprod.to(self.alphas_cumprod.device)
        table = state["timestep_table"]
        if table.numel() != self.table_size:
            raise ValueError(
                f"timestep_table in the state has {table.numel()} slots, table_size is {self.table_size}."
            )
        self.timestep_table = table.to(device=self.timestep_table.device, dtype=torch.long)

    def extra_repr(self) -> str:
        return (
            f"p={self.p:.4f}, T={self.T}, t_min={self.t_min}, t_max={self.t_max}, ts_dist={self.ts_dist}, "
            f"noise_std={self.noise_std}, target={self.target}, adaptive={self.adaptive}"
        )
