r"""SuperDiff sampler (pipelines/superposition/sampler.py) on Gaussian experts with exact scores.

Expert i's data distribution is q₀ᵢ = N(μᵢ, sᵢ² I) in d dimensions. Under the VE noising
x = x₀ + σε its marginal is qᵢ(x, σ) = N(μᵢ, vᵢ I) with vᵢ = sᵢ² + σ², so the exact noise
prediction is εᵢ(x, σ) = E[ε | x] = σ(x − μᵢ)/vᵢ (score −(x − μᵢ)/vᵢ = −εᵢ/σ), and
log qᵢ(x, σ) = −|x − μᵢ|²/(2vᵢ) − (d/2)·log(2π vᵢ) is known in closed form. Everything is float64
except where a test says otherwise. Torch runs single-threaded here: these are thousands of tiny
ops, which two intra-op threads on a busy 2-core machine slowed down twentyfold.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.superposition import (
    and_weights,
    average_weights,
    euler_maruyama_step,
    guided,
    ito_log_density_increment,
    or_weights,
    sample_superposition,
    step_coefficients,
)
from pipelines.superposition import sampler as sampler_module

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """Karras et al. (2022) schedule: n σ's from σ_max to σ_min, then a final 0."""
    r = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + r * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def gaussian_experts(mu, s, uncond=None):
    """denoise(x, σ) for experts N(μᵢ, sᵢ²I): exact εᵢ = σ(x − μᵢ)/(sᵢ² + σ²).

    ``mu`` (N, d), ``s`` (N,); ``uncond`` = (μ_u (d,), s_u) adds a shared unconditional expert.
    """
    mu = torch.as_tensor(mu, dtype=F64)
    s = torch.as_tensor(s, dtype=F64)

    def eps_of(x, sigma, m, sd):
        return sigma * (x - m) / (sd**2 + sigma**2)

    def denoise(x, sigma):
        sg = float(sigma)
        eps = eps_of(x[None], sg, mu[:, None, :], s[:, None, None]).to(x.dtype)
        eps_u = None
        if uncond is not None:
            eps_u = eps_of(x, sg, torch.as_tensor(uncond[0], dtype=F64), uncond[1]).to(x.dtype)
        return eps_u, eps

    return denoise


def log_q(x, mu, s, sigma):
    """Exact log N(x; μ, (s² + σ²)I), summed over the last dim."""
    v = s**2 + sigma**2
    return -((x - mu) ** 2).sum(-1) / (2 * v) - 0.5 * x.shape[-1] * math.log(2 * math.pi * v)


def run(denoise, x, sigmas, **kw):
    """sample_superposition that also returns the path x_0 … x_K (x at every σ)."""
    path = [x]
    out, trace = sample_superposition(
        denoise, x, sigmas, callback=lambda c: path.append(c["x"]), **kw
    )
    return out, trace, path


# 1. The Itô estimator tracks the exact log-density along the path --------------------------------


def _tracking_error(d: int, steps: int):
    """RMS over 256 paths of (L_i − Δ log q_i) at the last σ > 0 and at σ = 0, and its tolerance."""
    mu = torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = [0.5, 1.0]
    sigmas = karras(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, d, generator=g, dtype=F64) * sigmas[0]
    _, trace, path = run(gaussian_experts(mu, s), x, sigmas, mode="average", generator=g)
    results = []
    for i in range(2):
        exact = torch.stack(
            [log_q(p, mu[i], s[i], float(sg)) for p, sg in zip(path, sigmas, strict=True)]
        )
        err = trace["log_density"][:, i] - (exact - exact[0])
        sg, dsg = sigmas[:-2], (sigmas[1:-1] - sigmas[:-2]).abs()
        spread = math.sqrt(2 * d * ((sg * dsg / (s[i] ** 2 + sg**2)) ** 2).sum().item())
        tol = 1.5 * math.hypot(spread, spread**2 / 2)
        rms = err.pow(2).mean(-1).sqrt()
        results.append((rms[-2].item(), rms[-1].item(), tol, (exact[-2] - exact[0]).abs().mean()))
    return results


@pytest.mark.parametrize("d", [2, 16])
def test_ito_estimator_tracks_exact_log_density_along_path(d):
    r"""L_i(x_k) − L_i(x_0) follows log q_i(x_k, σ_k) − log q_i(x_0, σ_0) along the path taken.

    Two *different* experts (μ random, s = 0.5 and 1) and the averaging drift, so the path is
    driven by neither expert alone: Theorem 1 holds for any drift as long as the noise is the
    diffusion's. Both experts' L are checked.

    Tolerance. For these Gaussians ℓ = log q_i is quadratic in x with Hessian −I/v, so the only
    pathwise error of one step is the estimator replacing ½dxᵀ∇²ℓ dx by its mean σ|D|Δℓ: that is
    −(σ|D|/v)(|z|² − d), mean 0, variance 2d(σ|D|/v)². Summed over the steps its spread is
    S = √(2d Σ_k (σ_k|D_k|/v_k)²) ∝ K^{-1/2}; the remaining time-discretisation (weak, O(Δ)) bias
    was measured at ≈ S²/2 ∝ K^{-1}. So the RMS error over paths is bounded by 1.5·√(S² + S⁴/4).
    Measured (d = 16): K = 200 → 3.7 (tolerance 5.5), K = 2000 → 0.86 (tolerance 1.4), against a
    total change of ~65 nats; d = 2: 1.0 → 0.25. A sign error in either term of the increment
    would be off by the order of the total change (tens of nats).

    The last step into σ = 0 is the noise-free Tweedie step: it neglects σ_{K−1}|D|Δℓ
    = σ_{K−1}²·d/v (here σ_{K−1} = 0.002, i.e. < 1e-3), so the error at σ = 0 obeys the same bound.
    """
    coarse, fine = _tracking_error(d, 200), _tracking_error(d, 2000)
    for (c_rms, c_final, c_tol, total), (f_rms, f_final, f_tol, _) in zip(
        coarse, fine, strict=True
    ):
        assert c_rms < c_tol and f_rms < f_tol
        assert c_final < c_tol and f_final < f_tol
        assert f_rms < 0.5 * c_rms  # the error shrinks with the step count (∝ K^{-1/2} or faster)
        assert f_rms < 0.05 * total  # measured 2.7 % (d = 2), 1.3 % (d = 16)


def test_ito_increment_single_step_formula():
    """dLᵢ = −⟨dx, εᵢ⟩/σ − |D||εᵢ|²/σ summed over all non-batch dims, per expert, in float64."""
    g = torch.Generator().manual_seed(3)
    dx = torch.randn(4, 2, 3, generator=g)
    eps = torch.randn(2, 4, 2, 3, generator=g)
    out = ito_log_density_increment(dx, eps, 2.0, -0.5)
    e, x = eps.double().flatten(2), dx.double().flatten(1)
    expected = -(e * x).sum(-1) / 2.0 - 0.5 * (e * e).sum(-1) / 2.0
    assert out.dtype == F64 and out.shape == (2, 4)
    torch.testing.assert_close(out, expected)


# 2. OR samples the mixture with weights exp(bias), modes at ±μ -----------------------------------

MU, S_OR = 4.0, 0.5


def _or_samples(bias=None):
    """4000 OR samples of N(−μ, s²) and N(+μ, s²) in 1-D, 200 Karras steps."""
    sigmas = karras(200)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, generator=g, dtype=F64) * sigmas[0]
    den = gaussian_experts([[-MU], [MU]], [S_OR, S_OR])
    out, trace = sample_superposition(den, x, sigmas, mode="or", bias=bias, generator=g)
    return out[:, 0], trace


@pytest.mark.parametrize(("bias", "share"), [(None, 0.5), ([0.0, math.log(3.0)], 0.75)])
def test_or_mixture_proportions_and_modes(bias, share):
    r"""OR with κ = softmax(L + b) samples Σ wᵢqᵢ with w ∝ exp(b): here 50/50 and 25/75.

    Proportion: a sample belongs to the mode it ends closest to (x > 0 ⇒ +μ; the modes are
    16 s apart). The fraction is binomial, SE = √(w(1−w)/4000) ≤ 0.008; tolerance 4 SE. The
    start N(0, σ₀²) instead of the exact mixture at σ₀ = 80 perturbs L by ⟨x, 2μ⟩/σ₀² ≈ ±0.1 per
    sample, symmetric, a second-order effect on the share. Measured: 0.503 and 0.748.

    Modes: each cluster must be N(±μ, s²): mean within 0.1 of ±μ (SE s/√2000 ≈ 0.01, plus EM
    bias) and standard deviation within 10 % of s (SE ≈ 1.6 %). Measured: means ±4.00, std
    0.51. The averaging baseline puts everything near 0 and the reference's OR sign flip near
    ±1.9 (next test).
    """
    x, trace = _or_samples(bias)
    right = x > 0
    se = math.sqrt(share * (1 - share) / x.numel())
    assert abs(right.double().mean().item() - share) < 4 * se
    for cluster, centre in ((x[right], MU), (x[~right], -MU)):
        assert abs(cluster.mean().item() - centre) < 0.1
        assert abs(cluster.std().item() - S_OR) < 0.1 * S_OR
    # κ ends (numerically) one-hot on the expert each sample converged to
    final_kappa = trace["kappa"][-1]
    assert torch.equal(final_kappa[1] > 0.5, right)
    assert (final_kappa.max(0).values > 0.999).double().mean() > 0.99


def test_or_check_catches_reference_sign_flip(monkeypatch):
    """With the |ε|² term's sign flipped (the reference script's OR branch) the modes miss ±μ.

    The flipped estimator turns κ against the expert a sample converges to (see the module
    docstring), so samples settle between the experts: measured cluster means ±1.9 and std 1.0,
    and bias [0, log 3] is ignored (share 0.52). The mode check of the previous test rejects it.
    """

    def flipped(dx, eps, sigma, d_sigma):
        e, x = eps.double().flatten(2), dx.double().flatten(1)
        return -(e * x).sum(-1) / sigma + abs(d_sigma) * (e * e).sum(-1) / sigma

    monkeypatch.setattr(sampler_module, "ito_log_density_increment", flipped)
    x, _ = _or_samples([0.0, math.log(3.0)])
    assert abs(x[x > 0].mean().item() - MU) > 1.0
    assert abs(x[x < 0].mean().item() + MU) > 1.0


# 3. AND lands on the equal-density set -----------------------------------------------------------


def test_and_lands_on_equal_density_set():
    r"""AND keeps log q₁ = log q₂, so samples end where N(μ₁, s²) and N(μ₂, s²) are equal.

    For equal variances log q₁(x) − log q₂(x) = ⟨x − m, μ₁ − μ₂⟩/v with m = (μ₁ + μ₂)/2: the
    equal-density set is the midpoint hyperplane. Continuous-time AND keeps the *true* gap
    constant (κ = ½ ± noise cancels the noise along ε₁ − ε₂ and ½(ε₁ + ε₂) = σ(x − m)/v scales
    ⟨x − m, μ₁ − μ₂⟩ exactly like v), so the final gap is the initial one, which L = 0 does not
    know: at σ₀, ⟨x₀ − m, Δμ⟩/(s² + σ₀²) with x₀ ~ N(0, σ₀²) has mean |·| ≈
    √(2/π)·σ₀|Δμ|/(s² + σ₀²) ≈ 0.027 here. Tolerance: twice that. Measured: AND 0.022;
    averaging 4.4 (= √(2/π)|Δμ|/s: samples from N(m, s²)); expert 1 alone 14. L₁ − L₂ stays
    ~1e-9 (the increments are equalised exactly, in float64).
    """
    d, s = 4, 0.5
    mu = 2 * torch.randn(2, d, generator=torch.Generator().manual_seed(123), dtype=F64)
    sigmas = karras(200)
    sigma0 = float(sigmas[0])
    dmu = (mu[0] - mu[1]).norm().item()
    initial_gap = math.sqrt(2 / math.pi) * sigma0 * dmu / (s**2 + sigma0**2)

    def gap(mode, experts):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2000, d, generator=g, dtype=F64) * sigmas[0]
        den = gaussian_experts(mu[experts], [s] * len(experts))
        out, trace = sample_superposition(den, x, sigmas, mode=mode, generator=g)
        diff = log_q(out, mu[0], s, 0.0) - log_q(out, mu[1], s, 0.0)
        return diff.abs().mean().item(), trace

    and_gap, trace = gap("and", [0, 1])
    avg_gap, _ = gap("average", [0, 1])
    one_gap, _ = gap("or", [0])
    assert and_gap < 2 * initial_gap
    assert avg_gap > 50 * and_gap and one_gap > avg_gap
    lgap = (trace["log_density"][:, 0] - trace["log_density"][:, 1]).abs().max().item()
    assert lgap < 1e-6
    assert (trace["kappa"].sum(1) - 1).abs().max().item() < 1e-9
    assert trace["kappa"].abs().max() > 1.0  # κ is not clipped: it leaves [0, 1] early on


# 4. The weight formulas --------------------------------------------------------------------------


def test_or_weights_is_tempered_biased_softmax():
    """κᵢ = exp(T·Lᵢ + bᵢ)/Σⱼ exp(T·Lⱼ + bⱼ), per sample, also for huge L (no overflow)."""
    log_density = torch.tensor([[1.0, 3.0, -2000.0], [2.0, -1.0, 0.0]], dtype=F64)
    t, b = 0.5, [0.0, math.log(3.0)]
    kappa = or_weights(log_density, t, b)
    for col in range(3):
        l1, l2 = log_density[:, col].tolist()
        z = [math.exp(t * l1 + b[0] - t * l2 - b[1]), 1.0]
        expected = torch.tensor([z[0] / sum(z), z[1] / sum(z)], dtype=F64)
        torch.testing.assert_close(kappa[:, col], expected)
    torch.testing.assert_close(or_weights(log_density), torch.softmax(log_density, 0))
    torch.testing.assert_close(
        or_weights(log_density, 1.0, torch.tensor(b)), or_weights(log_density, 1.0, b)
    )
    with pytest.raises(ValueError):
        or_weights(log_density, 1.0, [0.0, 1.0, 2.0])


def test_average_weights():
    """The averaging baseline: 1/N, or softmax(bias), the same for every sample."""
    torch.testing.assert_close(average_weights(3, 2), torch.full((3, 2), 1 / 3, dtype=F64))
    torch.testing.assert_close(
        average_weights(2, 4, [0.0, math.log(3.0)]),
        torch.tensor([[0.25] * 4, [0.75] * 4], dtype=F64),
    )


def _increments(kappa, eps, eps_guided, noise, sigma, sigma_next):
    """dLᵢ of the step with drift Σκⱼε̃ⱼ and noise z, through the sampler's own functions."""
    drift = (kappa[..., None] * eps_guided.double().flatten(2)).sum(0)
    noise = None if noise is None else noise.flatten(1)
    x = torch.zeros_like(drift)
    _, dx = euler_maruyama_step(x, drift, sigma, sigma_next, noise)
    return ito_log_density_increment(dx, eps, sigma, sigma_next - sigma)


def test_and_weights_two_experts_closed_form():
    r"""N = 2 without guidance: κ₁ = ½ + √(σ/(2|D|))·⟨z, ε₁ − ε₂⟩/|ε₁ − ε₂|² on an EM step and
    κ₁ = ½ + ½(|ε₁|² − |ε₂|²)/|ε₁ − ε₂|² on the noise-free last step; κ₂ = 1 − κ₁.

    (From the docstring of ``and_weights``; derived independently in the module docstring.)
    Both make the two increments equal (checked to 1e-6 of the increments' size).
    """
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(2, 5, 10, generator=g, dtype=F64)
    z = torch.randn(5, 10, generator=g, dtype=F64)
    sigma, sigma_next = 1.3, 1.1
    delta = eps[0] - eps[1]
    k1 = 0.5 + math.sqrt(sigma / (2 * abs(sigma_next - sigma))) * (z * delta).sum(-1) / (
        delta * delta
    ).sum(-1)
    kappa = and_weights(eps, eps, z, sigma, sigma_next)
    torch.testing.assert_close(kappa, torch.stack([k1, 1 - k1]))
    inc = _increments(kappa, eps, eps, z, sigma, sigma_next)
    torch.testing.assert_close(inc[0], inc[1], rtol=0, atol=1e-6 * inc.abs().max().item())

    last = and_weights(eps, eps, None, 0.4, 0.0)
    sq = (eps * eps).sum(-1)
    k1 = 0.5 + 0.5 * (sq[0] - sq[1]) / (delta * delta).sum(-1)
    torch.testing.assert_close(last, torch.stack([k1, 1 - k1]))
    inc = _increments(last, eps, eps, None, 0.4, 0.0)
    torch.testing.assert_close(inc[0], inc[1], rtol=0, atol=1e-6 * inc.abs().max().item())


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("last", [False, True])
def test_and_weights_equalise_increments_with_guidance(n, last):
    """With guided ε̃ ≠ ε̂ the solved κ (Σκ = 1) makes all n increments equal to 1e-6 relative."""
    g = torch.Generator().manual_seed(n)
    eps = torch.randn(n, 6, 3, 4, generator=g, dtype=F64)
    eps_guided = guided(torch.randn(6, 3, 4, generator=g, dtype=F64), eps, 4.0)
    z = None if last else torch.randn(6, 3, 4, generator=g, dtype=F64)
    sigma, sigma_next = (0.7, 0.0) if last else (2.0, 1.6)
    kappa = and_weights(eps, eps_guided, z, sigma, sigma_next)
    assert kappa.shape == (n, 6) and kappa.dtype == F64
    torch.testing.assert_close(kappa.sum(0), torch.ones(6, dtype=F64))
    inc = _increments(kappa, eps, eps_guided, z, sigma, sigma_next)
    scale = inc.abs().max().item()
    assert (inc - inc[:1]).abs().max().item() < 1e-6 * scale


def test_and_weights_singular_system_stays_finite():
    """A duplicated expert makes the N = 3 system singular but consistent: pseudo-inverse."""
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(2, 4, 8, generator=g, dtype=F64)
    eps = torch.cat([eps, eps[:1]])
    z = torch.randn(4, 8, generator=g, dtype=F64)
    kappa = and_weights(eps, eps, z, 1.0, 0.9)
    assert torch.isfinite(kappa).all()
    torch.testing.assert_close(kappa.sum(0), torch.ones(4, dtype=F64))
    inc = _increments(kappa, eps, eps, z, 1.0, 0.9)
    assert (inc - inc[:1]).abs().max().item() < 1e-6 * inc.abs().max().item()
    # identical experts for N = 2: 0/0 is guarded, κ stays finite and sums to 1
    same = and_weights(eps[:1].expand(2, -1, -1), eps[:1].expand(2, -1, -1), z, 1.0, 0.9)
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same.sum(0), torch.ones(4, dtype=F64))


# 5. Guidance enters the drift, the density uses the unguided predictions -------------------------


@pytest.mark.parametrize("mode", ["or", "and"])
def test_guidance_drift_guided_density_unguided(mode):
    r"""dx = 2D·Σκᵢε̃ᵢ + √(2σ|D|)·z with ε̃ᵢ = ε_u + w(εᵢ − ε_u), but dLᵢ uses the unguided εᵢ.

    The unconditional expert N(0, 1) differs from the conditional ones, and w = 3, so ε̃ᵢ and εᵢ
    differ by O(1). Every step is re-derived by hand from the callback's path: z is regenerated
    from the same seed (the sampler draws one torch.randn(x.shape) per noisy step), dx must match
    the guided drift, and dLᵢ the increment with *unguided* εᵢ (checked not to match the guided
    one). For AND this also shows that the system uses the same expressions as the update: the
    two experts' L stay equal.
    """
    mu = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=F64)
    den = gaussian_experts(mu, [0.5, 0.8], uncond=(torch.zeros(2, dtype=F64), 1.0))
    sigmas = karras(8, sigma_max=5.0, sigma_min=0.05)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(5), dtype=F64) * 5.0
    _, trace, path = run(
        den, x0, sigmas, mode=mode, guidance_scale=3.0, generator=torch.Generator().manual_seed(9)
    )
    zgen = torch.Generator().manual_seed(9)
    for k in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        d = sigma_next - sigma
        eps_u, eps = den(path[k], sigma)
        eps_g = eps_u + 3.0 * (eps - eps_u)
        kappa = trace["kappa"][k]
        drift = (kappa[..., None] * eps_g).sum(0)
        dx = path[k + 1] - path[k]
        if sigma_next > 0:
            z = torch.randn(path[k].shape, generator=zgen, dtype=F64)
            expected_dx = 2 * d * drift + math.sqrt(2 * sigma * abs(d)) * z
        else:
            expected_dx = -sigma * drift
        torch.testing.assert_close(dx, expected_dx)
        dl = trace["log_density"][k + 1] - trace["log_density"][k]
        unguided = -(dx * eps).sum(-1) / sigma - abs(d) * (eps * eps).sum(-1) / sigma
        with_guided = -(dx * eps_g).sum(-1) / sigma - abs(d) * (eps_g * eps_g).sum(-1) / sigma
        torch.testing.assert_close(dl, unguided)
        assert (with_guided - unguided).abs().max() > 0.1
    if mode == "and":
        ld = trace["log_density"]
        assert (ld[:, 0] - ld[:, 1]).abs().max() < 1e-8 * ld.abs().max()


def _mixture_eps(x, sigma, modes, s):
    """Exact ε of an equal-weight mixture of N(m, s²I) over ``modes`` (K, d), VE-noised to σ."""
    v = s**2 + sigma**2
    diff = x[:, None, :] - modes[None]
    r = torch.softmax(-(diff**2).sum(-1) / (2 * v), dim=-1)
    return sigma * (r[..., None] * diff).sum(1) / v


def _corner_shares(x):
    """Shares of samples nearest (1, 1) (shared by both experts), (1, −1) and (−1, 1)."""
    return [((x[:, 0] > 0) & (x[:, 1] > 0)).double().mean().item(),
            ((x[:, 0] > 0) & (x[:, 1] < 0)).double().mean().item(),
            ((x[:, 0] < 0) & (x[:, 1] > 0)).double().mean().item()]  # fmt: skip


def test_or_under_guidance_needs_temperature_w():
    r"""OR of *guided* experts samples their mixture only with T = w (pipeline default).

    A guided expert follows ε_u + w(εᵢ − ε_u), the score of q_u^{1−w}·qᵢ^w; between experts its
    log-density differs by w·(log qᵢ − log qⱼ), so the posterior over guided experts is
    softmax(w·L + b). With T = 1 the weights stay too soft, both experts keep pulling, and OR
    lands on what they share, like averaging.

    Case, in the toy zoo's terms: 4 modes (±1, ±1) with s = 0.15; expert A ("a red shape") is
    the mixture of (1, 1) and (1, −1), expert B ("a circle") of (1, 1) and (−1, 1); the
    unconditional model has all four. Each guided expert alone (w = 5) splits its two modes
    about evenly, so the mixture of what each draws alone puts ≈ 50 % on the shared (1, 1) and
    ≈ 25 % on each other corner. Measured with 4000 samples, 20 Karras steps to σ = 14.6:
    T = 1 gives 97 / 1 / 1 %, T = w 64 / 18 / 19 % (the guided SDE is not the reverse of a
    diffusion, so no sampler hits the mixture exactly). Binomial SE ≤ 0.8 %; the thresholds sit
    ≥ 10 SE from both measurements: T = w keeps ≥ 12 % on each unshared corner and ≤ 75 % on the
    shared one; T = 1 keeps < 5 % on each unshared corner.
    """
    w = 5.0
    modes = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    experts = (modes[[0, 1]], modes[[0, 2]])

    def denoise(x, sigma):
        sg = float(sigma)
        eps = torch.stack([_mixture_eps(x, sg, m, 0.15) for m in experts])
        return _mixture_eps(x, sg, modes, 0.15), eps

    sigmas = karras(20, sigma_max=14.6)

    def shares(temperature):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4000, 2, generator=g, dtype=F64) * sigmas[0]
        out, _ = sample_superposition(
            denoise, x, sigmas, mode="or", guidance_scale=w, temperature=temperature, generator=g
        )
        return _corner_shares(out)

    shared, only_a, only_b = shares(w)
    assert shared <= 0.75 and only_a >= 0.12 and only_b >= 0.12
    shared, only_a, only_b = shares(1.0)
    assert shared > 0.9 and only_a < 0.05 and only_b < 0.05


def test_guidance_per_expert_unconditional_and_no_guidance():
    """ε_u may be (N, B, …); w = 1 or ε_u = None give the unguided predictions."""
    g = torch.Generator().manual_seed(2)
    eps, eps_u = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    torch.testing.assert_close(guided(eps_u, eps, 2.5), eps_u + 2.5 * (eps - eps_u))
    torch.testing.assert_close(guided(eps_u[0], eps, 1.0), eps)
    assert guided(None, eps, 7.0) is eps


# 6. Determinism and the noise-free last step -----------------------------------------------------


def test_same_seed_same_output():
    """Same generator seed → bit-identical samples and trace; another seed → different samples."""
    den = gaussian_experts([[1.0, 0.0], [-1.0, 0.5]], [0.3, 0.6])
    sigmas = karras(10, sigma_max=10.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 10.0

    def sample(seed, mode):
        gen = torch.Generator().manual_seed(seed)
        return sample_superposition(den, x, sigmas, mode=mode, generator=gen)

    for mode in ("or", "and", "average"):
        (a, ta), (b, tb) = sample(1, mode), sample(1, mode)
        assert torch.equal(a, b)
        assert torch.equal(ta["log_density"], tb["log_density"])
        assert torch.equal(ta["kappa"], tb["kappa"])
        assert not torch.equal(a, sample(2, mode)[0])


@pytest.mark.parametrize("mode", ["or", "and", "average"])
def test_last_step_adds_no_noise(mode):
    r"""The step into σ = 0 is x₀ = x − σ₁·Σκᵢεᵢ(x, σ₁), with no noise.

    Delta-like experts (s = 0, data = μᵢ) have εᵢ(x, σ) = (x − μᵢ)/σ, so that step returns exactly
    Σκᵢμᵢ whatever noise the first step added: with two steps [σ₀, σ₁, 0] the output must equal
    the deterministic formula at the x the callback reports after step 1, and Σκᵢμᵢ (= μ for a
    single expert; = the κ-weighted mean of the μᵢ for two).
    """
    mu = torch.tensor([[1.5, -0.5, 2.0], [-1.0, 0.0, 1.0]], dtype=F64)
    den = gaussian_experts(mu, [0.0, 0.0])
    sigmas = torch.tensor([3.0, 0.7, 0.0], dtype=F64)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=F64) * 3.0
    out, trace, path = run(den, x, sigmas, mode=mode, generator=torch.Generator().manual_seed(6))
    kappa = trace["kappa"][-1]
    _, eps = den(path[1], 0.7)
    torch.testing.assert_close(out, path[1] - 0.7 * (kappa[..., None] * eps).sum(0))
    torch.testing.assert_close(out, kappa.T @ mu)
    # and for one delta expert the output is its data point exactly
    out1, _ = sample_superposition(
        gaussian_experts(mu[:1], [0.0]), x, sigmas, mode=mode, generator=torch.Generator()
    )
    torch.testing.assert_close(out1, mu[0].expand(5, 3))


def test_euler_maruyama_step_coefficients():
    """dx = 2D·ε + √(2σ|D|)·z on noisy steps; dx = −σ·ε (noise ignored) into σ = 0."""
    x, e, z = torch.ones(2, 3), torch.full((2, 3), 0.5), torch.full((2, 3), -1.0)
    assert step_coefficients(2.0, 1.5) == (-1.0, math.sqrt(2.0))
    assert step_coefficients(2.0, 0.0) == (-2.0, 0.0)
    nxt, dx = euler_maruyama_step(x, e, 2.0, 1.5, z)
    torch.testing.assert_close(dx, -1.0 * e + math.sqrt(2.0) * z)
    torch.testing.assert_close(nxt, x + dx)
    nxt, dx = euler_maruyama_step(x, e, 2.0, 0.0, z)
    torch.testing.assert_close(nxt, x - 2.0 * e)
    with pytest.raises(ValueError):
        euler_maruyama_step(x, e, 2.0, 1.5, None)


# 7. float64 accumulation, shapes, errors ---------------------------------------------------------


def test_trace_shapes_and_float64_accumulation():
    """x float32 (B, C, H, W) stays float32; L and κ are float64 with the documented shapes."""
    b, steps = 3, 6
    mu = torch.randn(2, 2 * 4 * 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    flat = gaussian_experts(mu, [0.5, 0.7])

    def den(x, sigma):
        _, eps = flat(x.flatten(1), sigma)
        return None, eps.reshape(2, *x.shape)

    sigmas = karras(steps, sigma_max=10.0)
    x = torch.randn(b, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 10.0
    calls = []
    out, trace = sample_superposition(
        den,
        x,
        sigmas,
        mode="and",
        generator=torch.Generator().manual_seed(2),
        callback=calls.append,
    )
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert trace["log_density"].dtype == F64 and trace["log_density"].shape == (steps + 1, 2, b)
    assert trace["kappa"].dtype == F64 and trace["kappa"].shape == (steps, 2, b)
    assert torch.equal(trace["log_density"][0], torch.zeros(2, b, dtype=F64))
    assert trace["sigmas"] is sigmas
    assert [c["i"] for c in calls] == list(range(steps))
    keys = {"i", "sigma", "sigma_next", "x", "kappa", "log_density", "denoised"}
    assert set(calls[0]) == keys
    torch.testing.assert_close(calls[-1]["denoised"], out)
    assert calls[-1]["sigma_next"] == 0.0 and torch.equal(calls[-1]["x"], out)
    assert torch.equal(calls[2]["log_density"], trace["log_density"][3])
    assert torch.isfinite(trace["log_density"]).all()


def test_rejects_bad_arguments():
    """Unknown mode; a σ ≤ 0 before the end (the estimator divides by σ)."""
    den = gaussian_experts([[0.0]], [1.0])
    with pytest.raises(ValueError, match="mode"):
        sample_superposition(den, torch.zeros(2, 1), karras(3), mode="xor")
    with pytest.raises(ValueError, match="positive"):
        sample_superposition(den, torch.zeros(2, 1), torch.tensor([1.0, 0.0, 0.0]), mode="or")
