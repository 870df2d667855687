"""composer/merge/methods.py against hand-computed references on small tensors."""

import math

import pytest
import torch

from composer.merge import methods as m

T = torch.tensor


def test_weighted_sum_is_normalised_and_identical_models_give_the_model():
    a, b = T([1.0, 2.0]), T([3.0, -2.0])
    assert torch.equal(m.weighted_sum([a, b], [0.75, 0.25]), T([1.5, 1.0]))
    assert torch.equal(m.weighted_sum([a, b], [3.0, 1.0]), T([1.5, 1.0]))  # same ratio
    x = torch.randn(3, 4)
    torch.testing.assert_close(m.weighted_sum([x, x, x], [0.2, 5.0, 1.3]), x)
    with pytest.raises(ValueError, match="add up to 0"):
        m.weighted_sum([a, b], [1.0, -1.0])


def test_add_difference_and_task_arithmetic():
    a, b, c = T([1.0, 1.0]), T([4.0, 0.0]), T([2.0, 2.0])
    assert torch.equal(m.add_difference(a, b, c, 0.5), T([2.0, 0.0]))
    base = T([1.0, 1.0, 1.0])
    e1, e2 = T([2.0, 1.0, 0.0]), T([1.0, 3.0, 1.0])  # τ1 = [1, 0, -1], τ2 = [0, 2, 0]
    out = m.task_arithmetic(base, [e1, e2], [1.0, 0.5], lam=2.0)
    assert torch.equal(out, T([3.0, 3.0, -1.0]))  # 1 + 2·(τ1 + 0.5·τ2)


def test_slerp_endpoints_norm_and_midpoint():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(m.slerp(a, b, 0.0), a)
    torch.testing.assert_close(m.slerp(a, b, 1.0), b)
    mid = m.slerp(a, b, 0.5)
    torch.testing.assert_close(mid, T([math.sqrt(0.5), math.sqrt(0.5)]))
    x, y = torch.randn(50), torch.randn(50)
    y = y * x.norm() / y.norm()
    for t in (0.1, 0.3, 0.7):
        assert float(m.slerp(x, y, t).norm()) == pytest.approx(float(x.norm()), rel=1e-5)
    # parallel vectors: 0/0 in the formula, linear interpolation instead
    torch.testing.assert_close(m.slerp(a, 2 * a, 0.5), T([1.5, 0.0]))


def test_ties_step_by_step():
    """Yadav et al. 2023, Algorithm 1, on three experts and five entries, ρ = 0.4 (keep 2 of 5).

    τ1 = [ 4, -1,  0.5, 3, -2]  → trimmed [4, 0, 0, 3, 0]
    τ2 = [-5,  2, -0.1, 1,  0]  → trimmed [-5, 2, 0, 0, 0]
    τ3 = [ 2, -3,  0.2, -0.5, 6] → trimmed [0, -3, 0, 0, 6]
    mass Σ: [-1, -1, 0, 3, 6] → signs [-, -, (tie → majority of the rest: +), +, +]
    disjoint mean: entry 0: only -5 agrees → -5; entry 1: only -3 → -3; entry 2: nothing → 0;
    entry 3: 3 → 3; entry 4: 6 → 6.
    """
    base = T([10.0, 10.0, 10.0, 10.0, 10.0])
    taus = [
        T([4.0, -1.0, 0.5, 3.0, -2.0]),
        T([-5.0, 2.0, -0.1, 1.0, 0.0]),
        T([2.0, -3.0, 0.2, -0.5, 6.0]),
    ]
    trimmed = m.trim(torch.stack(taus), 0.4)
    assert torch.equal(
        trimmed,
        T([[4.0, 0, 0, 3.0, 0], [-5.0, 2.0, 0, 0, 0], [0, -3.0, 0, 0, 6.0]]),
    )
    sign = m.elect_sign(trimmed, "mass")
    assert torch.equal(sign, T([-1.0, -1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(m.disjoint_mean(trimmed, sign), T([-5.0, -3.0, 0.0, 3.0, 6.0]))
    out = m.ties(base, [base + t for t in taus], density=0.4, lam=0.5)
    assert torch.equal(out, base + 0.5 * T([-5.0, -3.0, 0.0, 3.0, 6.0]))


def test_ties_sign_rules_differ_where_count_and_mass_disagree():
    tau = T([[5.0], [-1.0], [-1.0]])  # mass says +, count says −
    assert m.elect_sign(tau, "mass").item() == 1.0
    assert m.elect_sign(tau, "count").item() == -1.0
    assert m.disjoint_mean(tau, m.elect_sign(tau, "count")).item() == -1.0
    with pytest.raises(ValueError, match="sign rule"):
        m.elect_sign(tau, "vote")


def test_ties_whole_model_thresholds_override_the_per_tensor_ones():
    tau = T([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(m.trim(tau, 0.5), T([[0.0, 0.0, 3.0, 4.0]]))
    # a threshold computed over a whole model where this tensor's entries are all small
    assert torch.equal(m.trim(tau, 0.5, thresholds=T([3.5])), T([[0.0, 0.0, 0.0, 4.0]]))


def test_magnitude_threshold_uses_topk_and_keeps_ties():
    values = T([[1.0, -5.0, 3.0, 3.0, 0.0]])
    assert m.magnitude_threshold(values, 0.4).item() == 3.0
    assert torch.equal(m.trim(values, 0.4), T([[0.0, -5.0, 3.0, 3.0, 0.0]]))


def test_dare_expectation_rescale_and_reproducible_masks():
    tau = torch.randn(2, 200, 50)
    out = m.dare(tau, 0.3, seed=7, name="down_blocks.0.weight")
    kept = out != 0
    torch.testing.assert_close(out[kept], (tau / 0.3)[kept])  # survivors rescaled by 1/ρ
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # E[τ̃] = τ: the mean of many independent masks approaches τ (sampling error ~ 1/√draws)
    x = T([[1.0, -2.0, 0.5]])
    draws = torch.stack([m.dare(x, 0.3, seed=s, name="p") for s in range(4000)])
    torch.testing.assert_close(draws.mean(0), x, atol=0.15, rtol=0)
    # same (seed, name, expert) → same mask, whatever else was drawn before; new name → new mask
    torch.rand(1000)
    assert torch.equal(out, m.dare(tau, 0.3, seed=7, name="down_blocks.0.weight"))
    assert not torch.equal(out, m.dare(tau, 0.3, seed=7, name="up_blocks.0.weight"))
    assert not torch.equal(out[0] != 0, out[1] != 0)  # each expert its own mask


def test_dare_linear_and_dare_ties_with_density_one_are_the_undropped_methods():
    base = torch.randn(4, 3)
    experts = [base + torch.randn(4, 3) for _ in range(3)]
    torch.testing.assert_close(
        m.dare_linear(base, experts, 1.0, seed=0, name="w", lam=0.7),
        m.task_arithmetic(base, experts, lam=0.7),
    )
    torch.testing.assert_close(
        m.dare_ties(base, experts, 1.0, seed=0, name="w"),
        m.ties(base, experts, density=1.0),
    )


def test_model_stock_ratio_and_merge():
    """Jang et al. 2024, Eq. 3: t = N cos θ / (1 + (N − 1) cos θ)."""
    assert m.model_stock_ratio(1.0, 2) == 1.0
    assert m.model_stock_ratio(0.0, 2) == 0.0
    assert m.model_stock_ratio(0.5, 2) == pytest.approx(2 * 0.5 / 1.5)
    base = T([0.0, 0.0])
    e1, e2 = T([1.0, 0.0]), T([math.cos(math.pi / 3), math.sin(math.pi / 3)])  # 60°: cos ½
    t = 2 * 0.5 / 1.5
    mean = (e1 + e2) / 2
    torch.testing.assert_close(m.model_stock(base, [e1, e2]), t * mean)
    # orthogonal task vectors: t = 0, the base; identical ones: t = 1, the expert
    torch.testing.assert_close(m.model_stock(base, [T([1.0, 0.0]), T([0.0, 1.0])]), base)
    torch.testing.assert_close(m.model_stock(base, [e1, e1]), e1)
    # three experts: the mean pairwise cosine
    e3 = T([math.cos(-math.pi / 3), math.sin(-math.pi / 3)])
    cos = (0.5 + 0.5 + math.cos(2 * math.pi / 3)) / 3
    t3 = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(m.model_stock(base, [e1, e2, e3]), t3 * (e1 + e2 + e3) / 3)


def test_tall_masks_and_consensus():
    """Wang et al. 2024, Eq. 5–6 with λ_mask = 0.5 and k = 2, on two experts."""
    base = T([0.0, 0.0, 0.0])
    e1, e2 = T([1.0, 1.0, 0.0]), T([1.0, 0.0, 0.1])
    merged = T([2.0, 1.0, 0.1])  # task arithmetic τ1 + τ2
    masks = m.tall_masks(torch.stack([e1, e2]), merged, 0.5)
    # m1 = |τ1| ≥ ½|merged − τ1| = [1 ≥ .5, 1 ≥ 0, 0 ≥ .05] ; m2 = [1 ≥ .5, 0 ≥ .5, .1 ≥ 0]
    assert masks.tolist() == [[True, True, False], [True, False, True]]
    out = m.consensus(base, [e1, e2], merged, lam=1.0, mask_lam=0.5, k=2)
    assert torch.equal(out, T([2.0, 0.0, 0.0]))  # only entry 0 is used by both


def test_whole_model_thresholds_equal_topk_over_the_concatenated_model():
    from composer.merge.plan import whole_model_thresholds

    gen = torch.Generator().manual_seed(0)
    params = {f"p{j}": torch.randn(2, 30 + 7 * j, generator=gen) for j in range(4)}  # (expert, n)
    flat = torch.cat(list(params.values()), dim=1)
    for density in (0.1, 0.37, 1.0):
        got = whole_model_thresholds(params, lambda n, i: params[n][i], 2, density)
        torch.testing.assert_close(got, m.magnitude_threshold(flat, density))


def test_block_weight_moves_from_the_reference_toward_the_merge():
    from composer.merge.plan import merge_tensor
    from composer.merge.registry import Merge

    a, b, base = T([0.0, 2.0]), T([4.0, 2.0]), T([1.0, 1.0])
    half = merge_tensor(Merge("weighted_sum"), "w", None, [a, b], [1.0, 1.0], block_weight=0.5)
    assert torch.equal(half, T([1.0, 2.0]))  # a + ½·(mean − a)
    zero = merge_tensor(Merge("task_arithmetic"), "w", base, [a, b], [1, 1], block_weight=0.0)
    assert torch.equal(zero, base)


def test_a_parameter_every_model_holds_alike_passes_through_text_encoder_merges():
    """``merge_parameter(shortcut=True)``: experts and base alike → that very value (a weighted
    sum by thirds would round it); base different → merged (task arithmetic θ₀ + λΣwᵢτᵢ with
    equal τᵢ is not the experts' value); integer buffers → the first expert's."""
    from composer.merge.plan import merge_parameter
    from composer.merge.registry import Merge

    torch.manual_seed(0)
    a = torch.randn(64)
    thirds = merge_parameter(Merge("weighted_sum"), "w", None, [a, a.clone()], [1.0, 2.0])
    assert not torch.equal(thirds, a)  # the rounding the shortcut avoids
    same = merge_parameter(Merge("weighted_sum"), "w", None, [a, a.clone()], [1.0, 2.0],
                           shortcut=True)  # fmt: skip
    assert torch.equal(same, a)
    base = a - 1.0
    moved = merge_parameter(Merge("task_arithmetic", base="b"), "w", base, [a, a.clone()],
                            [1.0, 1.0], shortcut=True)  # fmt: skip
    torch.testing.assert_close(moved, base + 2.0)
    ids = torch.arange(5)
    assert merge_parameter(Merge("weighted_sum"), "ids", None, [ids, ids + 1], [1, 1]) is ids


def test_incompatible_models_are_named_with_the_first_mismatch():
    from composer.merge.plan import check_compatible
    from composer.merge.registry import MergeError

    sd1 = {"conv_in.weight": (320, 4, 3, 3), "mid_block.x": (4,)}
    with pytest.raises(MergeError, match=r"'a' and 'b' cannot be merged: in their U-Nets, conv"):
        check_compatible([("a", sd1), ("b", {**sd1, "conv_in.weight": (64, 4, 3, 3)})])
    with pytest.raises(MergeError, match=r"'a' and 'xl' cannot be merged.*xl has add_embedding"):
        check_compatible([("a", sd1), ("xl", {**sd1, "add_embedding.w": (1,)})])
