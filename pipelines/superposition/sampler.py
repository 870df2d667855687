r"""SuperDiff: superposition of diffusion models with the Itô density estimator.

Skreta, Atanackovic, Bose, Tong, Neklyudov, "The Superposition of Diffusion Models Using the Itô
Density Estimator", ICLR 2025 (reference code: github.com/necludov/super-diffusion).

N pretrained experts are combined at sampling time. Every step the sampler

1. asks the experts for their noise predictions ε̂ᵢ(x, σ) (and optionally an unconditional one for
   classifier-free guidance, giving guided predictions ε̃ᵢ),
2. picks per-sample weights κᵢ (``mode``: OR, AND or plain averaging),
3. takes one Euler–Maruyama step of the reverse SDE with the drift ε_drift = Σᵢ κᵢ ε̃ᵢ,
4. updates every expert's log-density Lᵢ ≈ log qᵢ(x, σ) of the current sample with the Itô density
   estimator (Theorem 1 of the paper), from quantities the step already has: no extra network
   evaluations, no divergence.

Parameterisation (variance exploding, k-diffusion style)
--------------------------------------------------------
Data x₀ ~ q₀ᵢ is noised as x = x₀ + σ·ε, ε ~ N(0, I); its marginals qᵢ(·, σ) solve the forward SDE
dx = √(2σ) dW_σ (i.e. f = 0 and g²dt = d(σ²) = 2σ dσ in the paper's notation). Tweedie's formula
gives the score from the noise prediction,

    ∇ log qᵢ(x, σ) = −E[ε | x] / σ = −ε̂ᵢ(x, σ) / σ.

The reverse-time SDE (Anderson 1982) with f = 0, run from σ₀ down to 0, is
dx = −g² ∇log q dt + g dW̄; with g²|dt| = 2σ|dσ| and a step D = σₖ₊₁ − σₖ < 0 its Euler–Maruyama
discretisation is

    dx = −2σ|D|·∇log q + √(2σ|D|)·z = 2D·ε_drift + √(2σ|D|)·z,      z ~ N(0, I).

Itô density estimator (Theorem 1), in this parameterisation
-----------------------------------------------------------
Theorem 1 says: for *any* process driven by the forward diffusion's noise, dx = u dτ + g dW̄ (any
drift u, in particular a κ-weighted mixture of several experts' drifts), the log-density of one
fixed model q along the path evolves as

    d log q(x_τ) = ⟨dx, ∇log q⟩ + (⟨∇, f⟩ + ⟨f − (g²/2)∇log q, ∇log q⟩) dτ

(τ the reverse time; for f = 0 the bracket is −(g²/2)|∇log q|²). The derivation below re-does it
from scratch for the VE SDE, so the signs can be checked without the paper at hand.

Derivation for the VE SDE in σ-time, ℓ = log qᵢ: the Fokker–Planck equation ∂_σ q = σ Δq gives
∂_σ ℓ = σ(Δℓ + |∇ℓ|²). Itô's lemma along the reverse path, whose quadratic variation is
dx dxᵀ = 2σ|D|·I, gives

    dℓ = ∂_σ ℓ · D + ⟨∇ℓ, dx⟩ + ½·2σ|D|·Δℓ
       = −σ|D|(Δℓ + |∇ℓ|²) + ⟨∇ℓ, dx⟩ + σ|D|Δℓ
       = ⟨∇ℓ, dx⟩ − σ|D|·|∇ℓ|²                      (the Laplacian cancels: no divergence needed)
       = −⟨dx, ε̂ᵢ⟩/σ − |D|·|ε̂ᵢ|²/σ                  (∇ℓ = −ε̂ᵢ/σ).

Sanity check of the signs: if the path follows expert i itself (dx = 2Dε̂ᵢ + √(2σ|D|)z), the mean
increment is +|D||ε̂ᵢ|²/σ > 0: the sample climbs towards higher density while it is denoised. The
reference script's OR branch flips the sign of the |ε̂|² term; that turns the OR weights against
the expert a sample is converging to and its modes land between the experts' modes.

``ε̂ᵢ`` here is always the **unguided** conditional prediction: guidance changes the drift, not the
density being tracked. All experts share the same prior N(0, σ₀²I) at σ₀ ≫ data scale, so
L is initialised to 0 and only differences between experts matter. L is accumulated in float64.

The last step into σ = 0
------------------------
Euler–Maruyama into σ = 0 would leave noise of size √(2σₖ²) in the output. The final step is instead
the deterministic Tweedie step x₀ = x − σₖ·ε_drift (the denoised estimate; also the Euler step of
the probability-flow ODE dx = ε dσ), i.e. dx = D·ε_drift with D = −σₖ and no noise. L is still
updated with the same expression −⟨dx, ε̂ᵢ⟩/σ − |D||ε̂ᵢ|²/σ evaluated at that dx. Without noise the
exact first-order change of ℓ would be that expression minus σ|D|·Δℓ (the Laplacian no longer
cancels); the omitted term is the same for experts of equal curvature, so OR/AND, which only use
differences of L, stay consistent, and its size σₖ²·|Δℓ| vanishes as the last non-zero σ → 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]
"""``denoise(x, sigma) -> (eps_uncond, eps)``: ``eps`` (N, B, *dims) are the experts' unguided
conditional noise predictions; ``eps_uncond`` is None, (B, *dims) or (N, B, *dims)."""

MODES = ("or", "and", "average", "router")


def _flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` as float64 with its first ``lead`` dims kept and the rest flattened into one."""
    return t.to(torch.float64).flatten(start_dim=lead)


def guided(eps_uncond: torch.Tensor | None, eps: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε̃ᵢ = ε_uncond + w·(ε̂ᵢ − ε_uncond).

    ``eps`` is (N, B, *dims); ``eps_uncond`` is None (no guidance: ε̃ᵢ = ε̂ᵢ, whatever w),
    shared (B, *dims) or per expert (N, B, *dims).
    """
    if eps_uncond is None:
        return eps
    return eps_uncond + w * (eps - eps_uncond)


def step_coefficients(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(a, b) such that the step is dx = a·ε_drift + b·z.

    Euler–Maruyama of the VE reverse SDE: a = 2D, b = √(2σ|D|) with D = σ_next − σ. On the last
    step (σ_next = 0) the deterministic Tweedie step x₀ = x − σ·ε_drift: a = D = −σ, b = 0.
    """
    d = sigma_next - sigma
    if sigma_next == 0:
        return d, 0.0
    return 2.0 * d, math.sqrt(2.0 * sigma * abs(d))


def euler_maruyama_step(
    x: torch.Tensor,
    eps_drift: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the VE reverse SDE from σ to σ_next; returns (x_next, dx).

    dx = 2D·ε_drift + √(2σ|D|)·z with D = σ_next − σ < 0 (derivation in the module docstring). If
    σ_next == 0 the step is the noise-free Tweedie step dx = −σ·ε_drift (``noise`` is ignored and
    may be None), so no noise is left in the output.
    """
    a, b = step_coefficients(sigma, sigma_next)
    dx = a * eps_drift
    if b != 0.0:
        if noise is None:
            raise ValueError("euler_maruyama_step: noise is required when sigma_next > 0")
        dx = dx + b * noise
    return x + dx, dx


def ito_log_density_increment(
    dx: torch.Tensor, eps: torch.Tensor, sigma: float, d_sigma: float
) -> torch.Tensor:
    """Itô density estimator (Theorem 1) for the VE SDE: dLᵢ = −⟨dx, ε̂ᵢ⟩/σ − |D|·|ε̂ᵢ|²/σ.

    ``dx`` (B, *dims) is the step actually taken, ``eps`` (N, B, *dims) the experts' **unguided**
    noise predictions at (x, σ), ``d_sigma`` = D = σ_next − σ. Returns (N, B) in float64: the
    change of log qᵢ(x, σ) along the step (derived from ∇log qᵢ = −ε̂ᵢ/σ in the module docstring).
    """
    dx64 = _flat(dx, 1)  # (B, M)
    eps64 = _flat(eps, 2)  # (N, B, M)
    cross = (eps64 * dx64).sum(-1)
    sq = (eps64 * eps64).sum(-1)
    return -cross / sigma - abs(d_sigma) * sq / sigma


def _bias(bias: torch.Tensor | Sequence[float] | None, n: int, device) -> torch.Tensor:
    """Per-expert log-weights as a float64 (N, 1) (or (N, B)) tensor; zeros if None."""
    if bias is None:
        return torch.zeros(n, 1, dtype=torch.float64, device=device)
    b = torch.as_tensor(bias, dtype=torch.float64, device=device)
    if b.dim() == 1:
        b = b[:, None]
    if b.shape[0] != n:
        raise ValueError(f"bias has {b.shape[0]} entries for {n} experts")
    return b


def or_weights(
    log_density: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """OR (mixture) weights κ = softmaxᵢ(T·Lᵢ + bᵢ), shape (N, B).

    The score of the mixture Σᵢ wᵢqᵢ is Σᵢ κᵢ ∇log qᵢ with κᵢ = wᵢqᵢ / Σⱼ wⱼqⱼ, i.e.
    κ = softmax(log qᵢ + log wᵢ) (the paper's OR superposition): T = 1 and b = log w
    sample the mixture with weights w; other T sharpen/flatten the choice between experts.
    ``log_density`` (N, B) is L before the step.
    """
    n = log_density.shape[0]
    logits = temperature * log_density.to(torch.float64) + _bias(bias, n, log_density.device)
    return torch.softmax(logits, dim=0)


def average_weights(
    n: int, batch: int, bias: torch.Tensor | Sequence[float] | None = None, device=None
) -> torch.Tensor:
    """The paper's averaging baseline: fixed κ = 1/N, or κ = softmax(bias), shape (N, B)."""
    b = _bias(bias, n, device)
    return torch.softmax(b, dim=0).expand(n, batch).clone()


def and_system(
    eps: torch.Tensor,
    eps_guided: torch.Tensor,
    noise: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The affine dependence of the increments on κ: dLᵢ = −(a/σ)·(Gκ)ᵢ + cᵢ.

    With dx = a·Σⱼ κⱼ ε̃ⱼ + b·z (``step_coefficients``) in ``ito_log_density_increment``:

        dLᵢ = −⟨dx, ε̂ᵢ⟩/σ − |D||ε̂ᵢ|²/σ = −(a/σ) Σⱼ Gᵢⱼ κⱼ + cᵢ,
        Gᵢⱼ = ⟨ε̂ᵢ, ε̃ⱼ⟩,   cᵢ = −(b⟨z, ε̂ᵢ⟩ + |D||ε̂ᵢ|²)/σ.

    Returns (G (B, N, N), c (N, B), a/σ (scalar tensor)), all float64.
    """
    a, b = step_coefficients(sigma, sigma_next)
    e = _flat(eps, 2)  # (N, B, M) unguided: the densities tracked
    g = _flat(eps_guided, 2).expand_as(e)  # (N, B, M) guided: the drift
    gram = torch.einsum("ibm,jbm->bij", e, g)
    c = -abs(sigma_next - sigma) * (e * e).sum(-1) / sigma
    if b != 0.0:
        if noise is None:
            raise ValueError("and_system: noise is required when sigma_next > 0")
        c = c - b * (e * _flat(noise, 1)).sum(-1) / sigma
    return gram, c, torch.tensor(a / sigma, dtype=torch.float64)


def _guard(den: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """den moved away from 0 by a tiny amount with its own sign (sign(0) taken as +)."""
    tiny = 1e-12 * scale.abs() + 1e-300
    return den + torch.where(den < 0, -tiny, tiny)


def and_weights(
    eps: torch.Tensor,
    eps_guided: torch.Tensor,
    noise: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """AND weights: κ (N, B) that make every expert's log-density increment equal, Σκ = 1.

    ``eps`` are the unguided predictions ε̂ (the densities tracked), ``eps_guided`` the guided ε̃
    (the drift), ``noise`` the z that this step will add (None on the last, noise-free step). With
    the affine form dLᵢ = −(a/σ)(Gκ)ᵢ + cᵢ of ``and_system``, dLᵢ = dL₁ for i = 2..N reads

        Σⱼ (Gᵢⱼ − G₁ⱼ) κⱼ = rᵢ,   rᵢ = (σ/a)(cᵢ − c₁) = −(b⟨z, ε̂ᵢ − ε̂₁⟩ + |D|(|ε̂ᵢ|² − |ε̂₁|²))/a,

    together with Σⱼ κⱼ = 1. For N = 2, with κ₂ = 1 − κ₁:

        κ₁ = (r₂ − G₂₂ + G₁₂) / (G₂₁ − G₁₁ − G₂₂ + G₁₂).

    Without guidance (ε̃ = ε̂, G symmetric) on an Euler–Maruyama step (a = 2D, b = √(2σ|D|))
    this is κ₁ = ½ + √(σ/(2|D|))·⟨z, ε̂₁ − ε̂₂⟩/|ε̂₁ − ε̂₂|²: the drift cancels the noise along
    ε̂₁ − ε̂₂. On the noise-free last step (a = −σ, b = 0) it is
    κ₁ = ½ + ½(|ε̂₁|² − |ε̂₂|²)/|ε̂₁ − ε̂₂|². The system is built from exactly the expressions
    the sampler then uses (guided drift in dx, unguided ε̂ in dLᵢ, the same z), so the L's, which
    all start at 0, stay equal along the path.
    κ is not clipped (it may be < 0 or > 1); the denominator is moved away from 0 by a relative
    1e-12 with its own sign. For N > 2 the N×N system is solved per sample (pseudo-inverse where it
    is singular, e.g. for collinear experts).
    """
    n = eps.shape[0]
    if n == 1 or sigma_next == sigma:  # one expert, or a zero step (dL = 0 whatever κ)
        return torch.full(eps.shape[:2], 1.0 / n, dtype=torch.float64, device=eps.device)
    gram, c, a_over_sigma = and_system(eps, eps_guided, noise, sigma, sigma_next)
    r = (c[1:] - c[:1]).T / a_over_sigma  # (B, N-1)
    rows = gram[:, 1:, :] - gram[:, :1, :]  # (B, N-1, N)
    if n == 2:
        num = r[:, 0] - rows[:, 0, 1]
        den = rows[:, 0, 0] - rows[:, 0, 1]
        scale = gram[:, 0, 0].abs() + gram[:, 1, 1].abs()
        k1 = num / _guard(den, scale)
        return torch.stack([k1, 1.0 - k1])
    ones = torch.ones_like(rows[:, :1, :])
    mat = torch.cat([rows, ones], dim=1)  # (B, N, N)
    rhs = torch.cat([r, torch.ones_like(r[:, :1])], dim=1)  # (B, N)
    kappa, info = torch.linalg.solve_ex(mat, rhs)
    bad = (info != 0) | ~torch.isfinite(kappa).all(-1)
    if bad.any():
        kappa[bad] = (torch.linalg.pinv(mat[bad]) @ rhs[bad, :, None])[..., 0]
    return kappa.T.contiguous()


def _combine(kappa: torch.Tensor, eps_guided: torch.Tensor) -> torch.Tensor:
    """ε_drift = Σᵢ κᵢ ε̃ᵢ with κ (N, B) broadcast over the sample dims.

    Summed in float64 (AND's κ can be in the hundreds with opposite signs, so the sum cancels),
    returned in ε̃'s dtype.
    """
    k = kappa.to(torch.float64).reshape(*kappa.shape, *([1] * (eps_guided.dim() - 2)))
    return (k * eps_guided.to(torch.float64)).sum(0).to(eps_guided.dtype)


def sample_superposition(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    mode: str,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    bias: torch.Tensor | Sequence[float] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    router: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Sample a superposition of N experts (SuperDiff sampling loop, VE form).

    ``x`` (B, *dims) is the initial noise already scaled by σ₀ = ``sigmas[0]``; ``sigmas`` is 1-D
    and decreasing, normally ending in 0. ``denoise(x, sigma)`` (sigma = ``sigmas[i]``, a 0-dim
    tensor of ``sigmas``' dtype) returns
    ``(eps_uncond, eps)``: see ``Denoise``. ``mode``:

    - ``"or"``: κ = softmax(T·L + bias) from L before the step — samples the mixture Σ wᵢqᵢ with
      w ∝ exp(bias) (T = 1);
    - ``"and"``: κ from ``and_weights`` — keeps log q₁ = … = log q_N along the path, landing on
      the set where all experts' densities are equal;
    - ``"average"``: fixed κ = 1/N (or softmax(bias)) — the paper's averaging baseline;
    - ``"router"``: κ = ``router(x, sigma)`` (N, B), a learned posterior over the experts'
      data partitions (``pipelines.superposition.router``, Decentralized Diffusion Models).

    Each step draws z = randn_tensor(x.shape, generator=generator) (x's dtype/device) unless it
    is the last step into σ = 0, which is the noise-free Tweedie step. ``generator`` may be a
    list with one generator per image: image b's noise then comes from generator b alone, so
    image b of a batch draws exactly the noise it draws when sampled alone with that generator.
    ``callback`` gets a dict per step after it: ``i``, ``sigma``, ``sigma_next``, ``x`` (at
    σ_next), ``kappa`` (N, B, the weights used), ``log_density`` (N, B, L at σ_next) and
    ``denoised`` (the Tweedie estimate x − σ·ε_drift at the step's start, for previews; equal to
    ``x`` on the last step).

    Returns ``(x, trace)`` with trace ``kappa`` (steps, N, B) float64, ``log_density``
    (steps + 1, N, B) float64 starting at zeros, and ``sigmas``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "router" and router is None:
        raise ValueError("mode 'router' needs a router")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least two entries")
    sig = [float(s) for s in sigmas]
    if any(s <= 0 for s in sig[:-1]) or sig[-1] < 0:
        raise ValueError("sigmas must be positive, except for a final 0")
    log_density: torch.Tensor | None = None
    kappas: list[torch.Tensor] = []
    history: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps_uncond, eps = denoise(x, sigmas[i])
        if log_density is None:
            log_density = torch.zeros(eps.shape[:2], dtype=torch.float64, device=x.device)
            history.append(log_density)
        eps_guided = guided(eps_uncond, eps, guidance_scale)
        noise = None
        if sigma_next != 0:
            noise = randn_tensor(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if mode == "or":
            kappa = or_weights(log_density, temperature, bias)
        elif mode == "and":
            kappa = and_weights(eps, eps_guided, noise, sigma, sigma_next)
        elif mode == "router":
            kappa = router(x, sigmas[i]).to(device=x.device, dtype=torch.float64)
        else:
            kappa = average_weights(eps.shape[0], eps.shape[1], bias, device=x.device)
        eps_drift = _combine(kappa, eps_guided)
        x_prev = x
        x, dx = euler_maruyama_step(x, eps_drift, sigma, sigma_next, noise)
        log_density = log_density + ito_log_density_increment(dx, eps, sigma, sigma_next - sigma)
        kappas.append(kappa)
        history.append(log_density)
        if callback is not None:
            callback(
                {
                    "i": i,
                    "sigma": sigma,
                    "sigma_next": sigma_next,
                    "x": x,
                    "kappa": kappa,
                    "log_density": log_density,
                    "denoised": x_prev - sigma * eps_drift,
                }
            )
    trace = {
        "kappa": torch.stack(kappas),
        "log_density": torch.stack(history),
        "sigmas": sigmas,
    }
    return x, trace
