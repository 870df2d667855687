r"""Weight-merging methods as pure tensor functions, one parameter tensor at a time.

Notation: θ₀ the base (common ancestor), θᵢ the N experts, τᵢ = θᵢ − θ₀ their task vectors,
wᵢ the experts' weights (``experts[].weight`` in a recipe), λ the task-vector scale, ρ the kept
fraction ("density"). Every function takes and returns tensors of one parameter's shape, computes
in the dtype it is given (callers pass fp32) and never modifies its inputs.

Where ``peft.utils.merge_utils`` has the same semantics we call it (``calculate_majority_sign_mask``
for TIES's "count" sign rule is not the paper's, see ``ties``); where it differs we say why.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import partial

import torch

Tensor = torch.Tensor


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(tensors), dim=0)


def _weights(weights: Sequence[float] | None, n: int, like: Tensor) -> Tensor:
    w = torch.ones(n) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != n:
        raise ValueError(f"{n} experts but {w.numel()} weights")
    return w.to(dtype=like.dtype, device=like.device).view(n, *([1] * like.dim()))


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    r"""θ = Σᵢ wᵢθᵢ / Σᵢ wᵢ: AUTOMATIC1111's "weighted sum" ((1 − α)A + αB for weights 1 − α, α),
    generalised to N models. Normalised, so identical models give that model for any weights.

    Accumulated term by term into one new tensor rather than over a stacked copy of the inputs:
    the stacked form allocated six tensors' worth of temporaries per parameter, this form one,
    which halves a CPU export's peak RAM and makes a CPU live merge ~5× faster
    (``bench/merge_speed.py``)."""
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    if len(w) != len(tensors):
        raise ValueError(f"{len(tensors)} experts but {len(w)} weights")
    total = sum(w)
    if abs(total) < 1e-12:
        raise ValueError("weighted sum: the weights add up to 0")
    out = tensors[0] * (w[0] / total)
    for tensor, wi in zip(tensors[1:], w[1:], strict=True):
        out.add_(tensor, alpha=wi / total)
    return out


def add_difference(a: Tensor, b: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
    r"""θ = θ_A + α(θ_B − θ_C): AUTOMATIC1111's "add difference" (transplant what B learned over
    its base C into A)."""
    return a + alpha * (b - c)


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
) -> Tensor:
    r"""θ = θ₀ + λ Σᵢ wᵢτᵢ (Ilharco et al. 2023, "Editing Models with Task Arithmetic", §2)."""
    return add_task_vectors(base, _stack(tensors) - base, weights, lam)


def add_task_vectors(
    base: Tensor, tau: Tensor, weights: Sequence[float] | None = None, lam: float = 1.0
) -> Tensor:
    r"""θ₀ + λ Σᵢ wᵢτᵢ for task vectors ``tau`` (N, *shape): task arithmetic's sum."""
    return base + lam * (_weights(weights, len(tau), base) * tau).sum(0)


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-8) -> Tensor:
    r"""Spherical linear interpolation of two tensors seen as flat vectors (Shoemake 1985):

        Ω = arccos(⟨a, b⟩ / (|a||b|)),  θ = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b.

    t = 0 gives a, t = 1 gives b; for |a| = |b| every point keeps that norm. Nearly parallel
    vectors (sin Ω < eps), where the formula is 0/0, fall back to linear interpolation."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = fa.norm(), fb.norm()
    if na < eps or nb < eps:
        return torch.lerp(a, b, t)
    cos = torch.clamp(fa @ fb / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin < eps:
        return torch.lerp(a, b, t)
    out = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / sin
    return out.reshape(a.shape).to(a.dtype)


def magnitude_threshold(values: Tensor, density: float) -> Tensor:
    """The smallest |value| among the ⌈ρn⌉ largest, per row of ``values`` (k, n) (the reference
    code keeps ⌊ρn⌋ + 1 via ``kthvalue``; the difference is one entry).

    With ``topk`` (never ``kthvalue``, ~170× slower on CUDA). Entries ≥ the threshold are kept;
    ties at the threshold are kept too, as in the TIES reference code. A non-finite threshold
    (NaN or infinity in ``values``) is a ``ValueError``: nothing is dropped silently."""
    n = values.shape[-1]
    k = max(1, min(n, math.ceil(density * n)))
    low = values.abs().topk(k, dim=-1, largest=True, sorted=False).values.min(dim=-1).values
    if not bool(torch.isfinite(low).all()):  # else every entry of that task vector is dropped
        raise ValueError("a task vector holds NaN or infinity; TIES cannot trim it")
    return low


def trim(tau: Tensor, density: float, thresholds: Tensor | None = None) -> Tensor:
    r"""TIES step 1, *trim*: keep each task vector's top-ρ fraction of entries by magnitude.

    ``tau`` is (N, *shape). Per-tensor scope (peft's and most tools'): the thresholds come from
    this tensor alone. Whole-model scope (the TIES reference code's ``topk_values_mask`` on the
    flattened model): pass ``thresholds`` (N,) computed over all parameters beforehand."""
    if density >= 1.0:
        return tau
    flat = tau.reshape(len(tau), -1)
    if thresholds is None:
        thresholds = magnitude_threshold(flat, density)
    keep = flat.abs() >= thresholds.view(-1, 1).to(flat.dtype)
    if density <= 0.0:
        keep = torch.zeros_like(keep)
    return (flat * keep).reshape(tau.shape)


def elect_sign(tau: Tensor, rule: str = "mass") -> Tensor:
    r"""TIES step 2, *elect*: the sign per entry. "mass" (the paper, Eq. 1): sign(Σᵢ τ̂ᵢ), the
    sign of the larger total magnitude; "count": the sign held by more experts. An entry whose
    vote is 0 takes the sign of the whole tensor's total mass, as the reference code does
    (peft's ``calculate_majority_sign_mask`` gives it +1 instead)."""
    if rule == "mass":
        vote = tau.sum(0)
    elif rule == "count":
        vote = tau.sign().sum(0)
    else:
        raise ValueError(f"sign rule must be 'mass' or 'count', not {rule!r}")
    sign = vote.sign()
    overall = 1.0 if float(sign.sum()) >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, overall), sign)


def disjoint_mean(tau: Tensor, sign: Tensor) -> Tensor:
    r"""TIES step 3, *disjoint merge* (Eq. 2): per entry, the mean of the τ̂ᵢ whose sign agrees
    with the elected one, over those experts only (trimmed zeros do not count); 0 where none
    agrees."""
    agree = torch.where(sign > 0, tau > 0, tau < 0)
    kept = (tau * agree).sum(0)
    return kept / agree.sum(0).clamp(min=1)


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    density: float = 0.2,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    sign_rule: str = "mass",
    thresholds: Tensor | None = None,
) -> Tensor:
    r"""TIES-merging (Yadav et al., NeurIPS 2023, §3 and Algorithm 1): θ = θ₀ + λ·τ_m with
    τ̂ᵢ = trim(τᵢ, ρ), γ = elect_sign(τ̂), τ_m = disjoint_mean(τ̂, γ).

    Weights wᵢ (default 1, the paper) scale τ̂ᵢ after trimming and before the election, as peft
    does. The paper's λ is 1 for most of its results."""
    trimmed = trim(_stack(tensors) - base, density, thresholds)
    return elect_and_merge(base, trimmed, weights, lam, sign_rule)


def elect_and_merge(
    base: Tensor,
    tau: Tensor,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    sign_rule: str = "mass",
) -> Tensor:
    r"""TIES steps 2 and 3 on sparse task vectors ``tau`` (N, *shape): θ₀ + λ·τ_m with
    τ_m = disjoint_mean(w·τ, elect_sign(w·τ))."""
    tau = tau * _weights(weights, len(tau), base)
    return base + lam * disjoint_mean(tau, elect_sign(tau, sign_rule))


def mask_generator(seed: int, name: str, expert: int, device: torch.device | str = "cpu"):
    """A generator seeded by (seed, parameter name, expert index) only, so DARE's masks do not
    depend on the order parameters are visited in, on threads, or on the device's RNG state."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{expert}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


def dare(tau: Tensor, density: float, seed: int, name: str) -> Tensor:
    r"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario", §3, Eq. 2): drop each entry
    of each τᵢ with probability p = 1 − ρ and rescale the survivors by 1/(1 − p) = 1/ρ, so that
    E[τ̃ᵢ] = τᵢ. ``tau`` is (N, *shape); expert i's mask comes from ``mask_generator(seed, name,
    i)`` (peft's ``random_pruning`` uses the global RNG, which is why we do not call it)."""
    if density >= 1.0:
        return tau
    if density <= 0.0:
        return torch.zeros_like(tau)
    out = torch.empty_like(tau)
    for i in range(len(tau)):
        gen = mask_generator(seed, name, i, tau.device)
        keep = torch.rand(tau[i].shape, generator=gen, device=tau.device) < density
        out[i] = tau[i] * keep / density
    return out


def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    density: float,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    sign_rule: str | None = "mass",
    *,
    seed: int,
    name: str,
) -> Tensor:
    r"""DARE-TIES: DARE's random drop and rescale in place of TIES's magnitude trim, then TIES's
    sign election and disjoint mean (Yu et al. 2024, §4.3; mergekit's ``dare_ties``). The
    arguments are ``ties``'s, with the masks' seed and name in place of the trim thresholds.

    With ``sign_rule`` None there is no election: the dropped τ̃ᵢ are added as task arithmetic
    adds them, θ = θ₀ + λ Σᵢ wᵢ τ̃ᵢ (``dare_linear``, the paper's DARE)."""
    dropped = dare(_stack(tensors) - base, density, seed, name)
    if sign_rule is None:
        return add_task_vectors(base, dropped, weights, lam)
    return elect_and_merge(base, dropped, weights, lam, sign_rule)


dare_linear = partial(dare_ties, sign_rule=None)
"""DARE then task arithmetic: θ = θ₀ + λ Σᵢ wᵢ τ̃ᵢ (mergekit's ``dare_linear``); ``dare_ties``'s
arguments but the sign rule."""


def model_stock_ratio(cos: float, n: int) -> float:
    r"""Model Stock's interpolation ratio (Jang et al., ECCV 2024, Eq. 3): t = N·cos θ /
    (1 + (N − 1)·cos θ), θ the angle between fine-tuned task vectors."""
    return n * cos / (1.0 + (n - 1) * cos)


def model_stock(base: Tensor, tensors: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    r"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024, §3.2, Eq. 2–3), per layer: θ = t·θ̄ + (1 − t)·θ₀ with θ̄ the experts' average and
    t = model_stock_ratio(cos θ, N), cos θ the mean pairwise cosine of the task vectors τᵢ.
    A tensor that no expert changed (|τᵢ| = 0) stays θ₀; cos θ is clamped to [0, 1] (t ∈ [0, 1])."""
    tau = (_stack(tensors) - base).reshape(len(tensors), -1).double()
    n = len(tensors)
    norms = tau.norm(dim=1)
    if n < 2 or bool((norms < eps).any()):
        return base.clone() if bool((norms < eps).all()) else weighted_sum(tensors)
    unit = tau / norms[:, None]
    gram = unit @ unit.T
    cos = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    t = model_stock_ratio(min(max(cos, 0.0), 1.0), n)
    mean = _stack(tensors).mean(0)
    return (t * mean + (1 - t) * base).to(base.dtype)


def tall_masks(tau: Tensor, merged: Tensor, lam: float = 0.4) -> Tensor:
    r"""TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging
    and Compression", Eq. 5): mᵢ = 1{|τᵢ| ≥ λ·|τ_MTL − τᵢ|}, the entries where expert i's own
    change dominates what the other experts add to the merged task vector τ_MTL."""
    return tau.abs() >= lam * (merged.unsqueeze(0) - tau).abs()


def consensus(
    base: Tensor,
    tensors: Sequence[Tensor],
    merged_tau: Tensor,
    lam: float = 1.0,
    mask_lam: float = 0.4,
    k: int = 2,
) -> Tensor:
    r"""Consensus merging (Wang et al. 2024, §4, Eq. 6): keep the entries of the merged task vector
    τ_MTL (from task arithmetic or TIES) that at least ``k`` experts' TALL masks select, drop the
    rest ("selfish" weights used by one task only, and "catastrophic" ones used by none):
    θ = θ₀ + λ·(τ_MTL ⊙ 1{Σᵢ mᵢ ≥ k})."""
    tau = _stack(tensors) - base
    votes = tall_masks(tau, merged_tau, mask_lam).sum(0)
    return base + lam * merged_tau * (votes >= k)
