"""Structure losses of SADM (Yang et al., CVPR 2024, arXiv 2402.17563), as specified in METHODS.md §1.2.

Pure functions of tensors. Embeddings are cast up to float32 (float64 stays float64) so the losses are computed in full
precision even under bf16/fp16 autocast. Every relation matrix excludes the diagonal: row i runs over j != i, so a
batch of N samples gives an `[N, N-1]` matrix and the per-sample losses are `[N]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# guards the mean pair-wise distance of a fully collapsed batch (every z equal) against 0 / 0
_DISTANCE_EPS = 1e-12


def _upcast(z: torch.Tensor) -> torch.Tensor:
    # float16 / bfloat16 -> float32; float32 and float64 are kept
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _check_embeddings(z: torch.Tensor, name: str = "z") -> None:
    if z.ndim != 2:
        raise ValueError(f"`{name}` must be a [N, d] matrix of embeddings, got shape {tuple(z.shape)}.")
    if z.shape[0] < 2:
        raise ValueError(
            f"`{name}` has {z.shape[0]} sample(s); a batch structure needs pairs, so N must be >= 2 "
            "(raise the batch size, or gather the batch across processes)."
        )


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """Drop the diagonal of a square `[N, N]` matrix, keeping row order: `[N, N]` -> `[N, N-1]` (row i = j != i)."""
    n = m.shape[0]
    # the N*N entries without the first one, cut into N-1 rows of N+1, start each row with a diagonal entry's successor
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)  # [N*N-1] -> [N-1, N+1] -> [N, N-1]


def _pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    """Euclidean distances `[N, N]` with finite gradients where two rows coincide (including the diagonal)."""
    diff = z[:, None, :] - z[None, :, :]  # [N, 1, d] - [1, N, d] -> [N, N, d]
    squared = diff.pow(2).sum(dim=-1)  # [N, N, d] -> [N, N]
    # double `where`: sqrt only ever sees positive numbers, and coinciding pairs get distance 0 with gradient 0
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared))


def _softmax_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    # <z_i, z_j> / tau over j != i: [N, d] x [d, N] -> [N, N] -> [N, N-1]. Autocast would run this matmul in bf16/fp16
    # even on float32 inputs (a KL off by ~0.15 under bf16, tests/test_structure.py): it is switched off here.
    with torch.autocast(z.device.type, enabled=False):
        return _off_diagonal(z @ z.T / temperature)


# SADM relation matrix (METHODS.md §1.2 item 2): A_ij = softmax_j(<z_i, z_j>/tau) or D_ij = ||z_i - z_j|| / mean ||.||
def relation_matrix(z: torch.Tensor, relation: str = "softmax", temperature: float = 0.1) -> torch.Tensor:
    r"""
    Pair-wise relations among a batch of embeddings, diagonal excluded.

    - `"softmax"`: A_ij = exp(<z_i, z_j>/τ) / Σ_{k≠i} exp(<z_i, z_k>/τ) (each row is a distribution over j ≠ i).
    - `"distance"`: D_ij = ‖z_i − z_j‖ / (mean_{k≠l} ‖z_k − z_l‖ + eps), invariant to a global scale of z.

    Args:
        z (`torch.Tensor` of shape `(N, d)`): Embeddings, N >= 2; any float dtype (computed in float32 or higher).
        relation (`str`, defaults to `"softmax"`): `"softmax"` or `"distance"`.
        temperature (`float`, defaults to 0.1): τ of the softmax relation (ignored by `"distance"`).

    Returns:
        `torch.Tensor` of shape `(N, N-1)`: row i holds the relations of sample i to every j ≠ i, in order of j.
    """
    _check_embeddings(z)
    z = _upcast(z)
    if relation == "softmax":
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        return _softmax_logits(z, temperature).softmax(dim=1)  # [N, N-1]
    elif relation == "distance":
        distances = _off_diagonal(_pairwise_distances(z))  # [N, N-1]
        return distances / (distances.mean() + _DISTANCE_EPS)  # scale-free: divide by the mean over k != l
    else:
        raise ValueError(f"`relation` must be 'softmax' or 'distance', got {relation!r}.")


# SADM paired structure comparison (METHODS.md §1.2 item 3): row i of the real relation vs row i of the fake one
def structure_loss(
    z_real: torch.Tensor,
    z_fake: torch.Tensor,
    relation: str = "softmax",
    distance: str = "kl",
    temperature: float = 0.1,
    huber_delta: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Per-sample structural distance between the real and the fake batch (paired: row i of both belongs to sample i).

    With R = relation_matrix(z_real) and F = relation_matrix(z_fake), both `[N, N-1]`:
        - `"kl"`: KL(R_i ‖ F_i) = Σ_{j≠i} R_ij (log R_ij − log F_ij), from log-softmax (no log 0; `softmax` only);
        - `"l1"`: mean_{j≠i} |R_ij − F_ij|;
        - `"l2"`: mean_{j≠i} (R_ij − F_ij)²;
        - `"huber"`: mean_{j≠i} huber_δ(R_ij − F_ij), huber_δ(e) = e²/2 if |e| < δ else δ(|e| − δ/2).

    Args:
        z_real (`torch.Tensor` of shape `(N, d)`): Embeddings of the real samples x0.
        z_fake (`torch.Tensor` of shape `(N, d)`): Embeddings of the predictions x̂0 of the same samples.
        relation (`str`, defaults to `"softmax"`): `"softmax"` or `"distance"` (see [`relation_matrix`]).
        distance (`str`, defaults to `"kl"`): `"kl"`, `"l1"`, `"l2"` or `"huber"`.
        temperature (`float`, defaults to 0.1): τ of the softmax relation.
        huber_delta (`float`, defaults to 0.1): δ of the Huber comparison.
        mask (`torch.Tensor` of shape `(N,)`, *optional*): Boolean; the relations then span only the samples where it is
            True (the "active" sub-batch: columns j of other samples are left out, softmax rows renormalised over the
            active j, distances scaled by the mean over active pairs). Rows of inactive samples, and rows with no other
            active sample, are 0.

    Returns:
        `torch.Tensor` of shape `(N,)`: float32 (or float64) loss of each row; the caller weights and reduces.
    """
    if mask is not None:
        return _masked_structure_loss(z_real, z_fake, mask, relation, distance, temperature, huber_delta)
    if z_real.shape != z_fake.shape:
        raise ValueError(
            f"`z_real` and `z_fake` must have the same shape, got {tuple(z_real.shape)} and {tuple(z_fake.shape)}."
        )
    _check_embeddings(z_real, "z_real")
    if distance == "kl":
        if relation != "softmax":
            raise ValueError(
                f"distance='kl' compares distributions and needs relation='softmax', got relation={relation!r}; "
                "use distance='l1', 'l2' or 'huber' with relation='distance'."
            )
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        log_real = _softmax_logits(_upcast(z_real), temperature).log_softmax(dim=1)  # log R, [N, N-1]
        log_fake = _softmax_logits(_upcast(z_fake), temperature).log_softmax(dim=1)  # log F, [N, N-1]
        # Σ_j R_ij (log R_ij − log F_ij); kl_div(input=log F, target=log R) is exactly that term-wise
        return F.kl_div(log_fake, log_real, reduction="none", log_target=True).sum(dim=1)  # [N]

    real = relation_matrix(z_real, relation, temperature)  # [N, N-1]
    fake = relation_matrix(z_fake, relation, temperature)  # [N, N-1]
    if distance == "l1":
        return (real - fake).abs().mean(dim=1)  # mean_j |R_ij − F_ij|, [N]
    elif distance == "l2":
        return (real - fake).pow(2).mean(dim=1)  # mean_j (R_ij − F_ij)², [N]
    elif distance == "huber":
        if huber_delta <= 0:
            raise ValueError(f"`huber_delta` must be > 0, got {huber_delta}.")
        return F.huber_loss(fake, real, reduction="none", delta=huber_delta).mean(dim=1)  # mean_j huber_δ, [N]
    else:
        raise ValueError(f"`distance` must be one of 'kl', 'l1', 'l2', 'huber', got {distance!r}.")


def _masked_structure_loss(
    z_real: torch.Tensor,
    z_fake: torch.Tensor,
    mask: torch.Tensor,
    relation: str,
    distance: str,
    temperature: float,
    huber_delta: float,
) -> torch.Tensor:
    """`structure_loss` over the sub-batch where `mask` is True, with fixed shapes (no host sync): see its docstring."""
    if z_real.shape != z_fake.shape or mask.shape != z_real.shape[:1]:
        raise ValueError(
            f"`z_real` {tuple(z_real.shape)}, `z_fake` {tuple(z_fake.shape)} and `mask` {tuple(mask.shape)} must "
            "agree: [N, d], [N, d], [N]."
        )
    _check_embeddings(z_real, "z_real")
    if relation not in ("softmax", "distance"):
        raise ValueError(f"`relation` must be 'softmax' or 'distance', got {relation!r}.")
    if distance not in ("kl", "l1", "l2", "huber"):
        raise ValueError(f"`distance` must be one of 'kl', 'l1', 'l2', 'huber', got {distance!r}.")
    if distance == "kl" and relation != "softmax":
        raise ValueError(f"distance='kl' needs relation='softmax', got relation={relation!r}.")
    n = mask.shape[0]
    columns = _off_diagonal(mask[None, :].expand(n, n))  # column j is active, [N, N] -> [N, N-1]
    counts = columns.sum(dim=1)  # active columns of each row, [N]
    z_real, z_fake = _upcast(z_real), _upcast(z_fake)
    if relation == "softmax":
        neg_inf = torch.finfo(z_real.dtype).min
        log_real = _softmax_logits(z_real, temperature).masked_fill(~columns, neg_inf).log_softmax(dim=1)  # [N, N-1]
        log_fake = _softmax_logits(z_fake, temperature).masked_fill(~columns, neg_inf).log_softmax(dim=1)  # [N, N-1]
        if distance == "kl":
            terms = log_real.exp() * (log_real - log_fake)  # R_ij (log R_ij − log F_ij), [N, N-1]
            per_row = torch.where(columns, terms, torch.zeros_like(terms)).sum(dim=1)  # [N]
            return torch.where(mask & (counts > 0), per_row, torch.zeros_like(per_row))
        real, fake = log_real.exp() * columns, log_fake.exp() * columns  # [N, N-1], 0 off the sub-batch
    else:
        pairs = columns & mask[:, None]  # both ends active, [N, N-1]
        real, fake = (_off_diagonal(_pairwise_distances(z)) * pairs for z in (z_real, z_fake))  # [N, N-1]
        num_pairs = pairs.sum().clamp(min=1)
        real = real / (real.sum() / num_pairs + _DISTANCE_EPS)  # scale-free over the active pairs
        fake = fake / (fake.sum() / num_pairs + _DISTANCE_EPS)
    if distance == "l1":
        terms = (real - fake).abs()
    elif distance == "l2":
        terms = (real - fake).pow(2)
    else:
        terms = F.huber_loss(fake, real, reduction="none", delta=huber_delta)
    per_row = (terms * columns).sum(dim=1) / counts.clamp(min=1)  # mean over the active j, [N]
    return torch.where(mask & (counts > 0), per_row, torch.zeros_like(per_row))


# monitor of the SADM softmax relation (METHODS.md §1.2 item 2): mean_i H(A_i), at most log(N-1)
def relation_entropy(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    r"""
    Mean row entropy of the softmax relation: mean_i −Σ_{j≠i} A_ij log A_ij.

    It is log(N−1) for a structure-less batch (all rows uniform) and falls toward 0 as each sample's nearest neighbour
    dominates; a collapse of the embeddings to one point also gives log(N−1).

    Args:
        z (`torch.Tensor` of shape `(N, d)`): Embeddings, N >= 2.
        temperature (`float`, defaults to 0.1): τ of the softmax relation.

    Returns:
        `torch.Tensor`: 0-d float32 (or float64) tensor.
    """
    _check_embeddings(z)
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    log_a = _softmax_logits(_upcast(z), temperature).log_softmax(dim=1)  # log A, [N, N-1]
    return -(log_a.exp() * log_a).sum(dim=1).mean()  # mean_i H(A_i)


# SADM timestep weighting (METHODS.md §1.2 item 5): x̂0 is a blurry posterior mean at high noise
def structure_timestep_weights(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    weighting: str = "threshold",
    snr_clip: float = 5.0,
    t_threshold: int = 100,
) -> torch.Tensor:
    r"""
    Per-sample weights w(t) of the structure loss.

    - `"none"`: w = 1.
    - `"snr"`: w = min(SNR_t, clip) / clip with SNR_t = ᾱ_t / (1 − ᾱ_t), so w = 1 at low noise and → 0 at high noise.
    - `"threshold"`: w = 1 if t < t_threshold else 0.

    Args:
        timesteps (`torch.Tensor` of shape `(B,)`): Integer timesteps of the samples.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): ᾱ of the noise schedule (e.g. `scheduler.alphas_cumprod`).
        weighting (`str`, defaults to `"threshold"`): `"none"`, `"snr"` or `"threshold"`.
        snr_clip (`float`, defaults to 5.0): Clip of the SNR weighting.
        t_threshold (`int`, defaults to 100): Threshold of the `"threshold"` weighting.

    Returns:
        `torch.Tensor` of shape `(B,)`: float32 weights in [0, 1] on the device of `timesteps`.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"`timesteps` must have shape [B], got {tuple(timesteps.shape)}.")
    if timesteps.is_floating_point():
        raise ValueError(f"`timesteps` must be integer (discrete) timesteps, got dtype {timesteps.dtype}.")
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"`alphas_cumprod` must have shape [T], got {tuple(alphas_cumprod.shape)}.")
    if timesteps.numel() > 0 and (timesteps.min() < 0 or timesteps.max() >= alphas_cumprod.shape[0]):
        raise ValueError(
            f"`timesteps` must lie in [0, {alphas_cumprod.shape[0] - 1}], got min {timesteps.min().item()} "
            f"and max {timesteps.max().item()}."
        )
    if weighting == "snr" and snr_clip <= 0:
        raise ValueError(f"`snr_clip` must be > 0, got {snr_clip}.")
    return timestep_weights(timesteps, alphas_cumprod, weighting, snr_clip, t_threshold)


def timestep_weights(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    weighting: str = "threshold",
    snr_clip: float = 5.0,
    t_threshold: int = 100,
) -> torch.Tensor:
    """[`structure_timestep_weights`] without its input checks, for the training step: the options are validated
    once by their config and the timesteps come from the objective, so no check runs (and no device value is read on
    the host) per step."""
    if weighting == "none":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    elif weighting == "snr":
        alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]  # ᾱ_t, [B]
        snr = alpha_bar / (1.0 - alpha_bar)  # ᾱ_t / (1 − ᾱ_t), [B]
        return (snr.clamp(max=snr_clip) / snr_clip).float()  # min(SNR, clip) / clip
    elif weighting == "threshold":
        return (timesteps < t_threshold).float()  # 1 where t < t_threshold
    else:
        raise ValueError(f"`weighting` must be one of 'none', 'snr', 'threshold', got {weighting!r}.")


def _kernel_matrix(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """Mean of Gaussian kernels exp(−‖a_i − b_j‖² / (2h²)) over the bandwidths h: `[N, d] x [M, d] -> [N, M]`."""
    with torch.autocast(a.device.type, enabled=False):  # distances in full precision (see `_softmax_logits`)
        squared = (a[:, None, :] - b[None, :, :]).pow(2).sum(dim=-1)  # [N, 1, d] - [1, M, d] -> [N, M]
    return torch.stack([torch.exp(-squared / (2 * h * h)) for h in bandwidths]).mean(dim=0)  # [H, N, M] -> [N, M]


# SADM as a kernel two-sample critic (docs/METHODS.md §1.2b): unbiased MMD² between the real and the generated batch
def mmd_loss(
    z_real: torch.Tensor,
    z_fake: torch.Tensor,
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Per-row decomposition of the unbiased estimate of MMD² between the distributions of `z_real` and `z_fake`.

    Row i holds the i-th pair (r_i, f_i) of an i.i.d. sequence of pairs (the two may be dependent, e.g. built from the
    same x_t and noise); the U-statistic over pairs i ≠ j,
        MMD²_u = 1/(N(N−1)) Σ_{i≠j} [k(r_i, r_j) + k(f_i, f_j) − k(r_i, f_j) − k(f_i, r_j)],
    is unbiased for MMD² of the two marginals whatever the dependence inside a pair (Gretton et al., JMLR 2012, eq. 3
    with m = n; the diagonal k(r_i, f_i) is left out for that reason). Row i gets
        m_i = 1/(N−1) Σ_{j≠i} [K_rr + K_ff − K_rf − K_fr]_ij,     so that mean_i m_i = MMD²_u.
    k is the mean of Gaussian kernels over `bandwidths` (on L2-normalised embeddings ‖r − f‖² ∈ [0, 4]).

    Args:
        z_real (`torch.Tensor` of shape `(N, d)`): Embeddings of the real samples.
        z_fake (`torch.Tensor` of shape `(N, d)`): Embeddings of the generated samples.
        bandwidths (`tuple[float, ...]`): Kernel bandwidths h > 0.
        mask (`torch.Tensor` of shape `(N,)`, *optional*): Boolean; the estimate then runs over the pairs where it is
            True only (the active sub-batch A: m_i = 1/(|A|−1) Σ_{j∈A, j≠i} h_ij, and 0 for i ∉ A), with fixed shapes.

    Returns:
        `torch.Tensor` of shape `(N,)`: m_i in float32 (or float64); the caller weights and reduces.
    """
    if z_real.shape != z_fake.shape:
        raise ValueError(
            f"`z_real` and `z_fake` must have the same shape, got {tuple(z_real.shape)} and {tuple(z_fake.shape)}."
        )
    _check_embeddings(z_real, "z_real")
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"`bandwidths` must be a non-empty tuple of positive numbers, got {bandwidths}.")
    z_real, z_fake = _upcast(z_real), _upcast(z_fake)
    k_rr = _kernel_matrix(z_real, z_real, bandwidths)  # [N, N]
    k_ff = _kernel_matrix(z_fake, z_fake, bandwidths)  # [N, N]
    k_rf = _kernel_matrix(z_real, z_fake, bandwidths)  # [N, N]
    h = _off_diagonal(k_rr + k_ff - k_rf - k_rf.T)  # h_ij of the U-statistic, j != i: [N, N] -> [N, N-1]
    if mask is None:
        return h.sum(dim=1) / (z_real.shape[0] - 1)  # m_i, [N]
    if mask.shape != z_real.shape[:1]:
        raise ValueError(f"`mask` must have shape [{z_real.shape[0]}], got {tuple(mask.shape)}.")
    pairs = _off_diagonal(mask[:, None] & mask[None, :])  # both ends active, [N, N] -> [N, N-1]
    return (h * pairs).sum(dim=1) / (mask.sum() - 1).clamp(min=1)  # m_i over A (0 outside A), [N]


def _alpha_bar(alphas_cumprod: torch.Tensor, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at integer `levels` `[B]` (level −1 = clean, ᾱ = 1), in float64, shaped `[B, 1, ..., 1]` to broadcast on `like`."""
    table = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod]).to(device=levels.device, dtype=torch.float64)
    return table[levels + 1].reshape(-1, *([1] * (like.ndim - 1)))  # [B] -> [B, 1, ..., 1]


# DDPM's forward posterior q(x_s | x_t, x0) for s < t (Ho et al. 2020, eq. 6-7, from t to any earlier s)
def reverse_step_posterior(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Mean and standard deviation of q(x_s | x_t, x0) with s = `prev_timesteps` < t = `timesteps`:

        μ̃ = √ᾱ_s β_{t|s} / (1 − ᾱ_t) · x0 + √α_{t|s} (1 − ᾱ_s) / (1 − ᾱ_t) · x_t,    σ̃² = (1 − ᾱ_s) β_{t|s} / (1 − ᾱ_t)

    with α_{t|s} = ᾱ_t / ᾱ_s and β_{t|s} = 1 − α_{t|s} (s = t − 1 gives DDPM's β̃_t). With the denoiser's x̂0 in place of
    x0 this is the reverse step p_θ(x_s | x_t) of an ancestral sampler with the posterior variance.

    Args:
        x0 (`torch.Tensor` of shape `(B, ...)`): Clean samples (or the denoiser's x̂0, attached to its graph).
        x_t (`torch.Tensor` of shape `(B, ...)`): Noised samples at `timesteps`.
        timesteps (`torch.Tensor` of shape `(B,)`): Integer t.
        prev_timesteps (`torch.Tensor` of shape `(B,)`): Integer s with −1 <= s < t (−1: the clean sample); not checked
            here (no host sync in the training step), the caller guarantees it.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): ᾱ of the noise schedule.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: μ̃ in the dtype of `x0`, and σ̃ `[B, 1, ..., 1]` in that dtype.
    """
    a_t = _alpha_bar(alphas_cumprod, timesteps, x0)  # ᾱ_t
    a_s = _alpha_bar(alphas_cumprod, prev_timesteps, x0)  # ᾱ_s
    alpha_ts = a_t / a_s  # α_{t|s}
    beta_ts = 1 - alpha_ts  # β_{t|s}
    coef_x0 = (a_s.sqrt() * beta_ts / (1 - a_t)).to(x0.dtype)
    coef_xt = (alpha_ts.sqrt() * (1 - a_s) / (1 - a_t)).to(x0.dtype)
    std = ((1 - a_s) * beta_ts / (1 - a_t)).sqrt().to(x0.dtype)
    return coef_x0 * x0 + coef_xt * x_t.to(x0.dtype), std


# Diffusion-GAN's non-leaking augmentation (Wang et al. 2023, eq. 4), from level s to a later level u: q(x_u | x_s)
def renoise(
    x: torch.Tensor,
    levels: torch.Tensor,
    target_levels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    r"""
    Diffuse samples at `levels` s (−1 = clean) further to `target_levels` u >= s:
    x_u = √(ᾱ_u/ᾱ_s)·x_s + √(1 − ᾱ_u/ᾱ_s)·ε, with the given ε (`noise`, same shape as `x`). Not checked here (no host
    sync in the training step): the caller guarantees u >= s.
    """
    ratio = _alpha_bar(alphas_cumprod, target_levels, x) / _alpha_bar(alphas_cumprod, levels, x)  # ᾱ_u / ᾱ_s
    return ratio.sqrt().to(x.dtype) * x + (1 - ratio).sqrt().to(x.dtype) * noise
