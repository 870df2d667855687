"""Fisher information and Fisher merging (composer/merge/fisher.py) against closed forms."""

from __future__ import annotations

import pytest
import torch

from composer.merge import fisher


def linear_case(n: int, empirical_noise: bool = False):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3, bias=False)
    xs = torch.randn(4, 5)
    noise = torch.Generator().manual_seed(1)

    def predict(i):
        x = xs[i % len(xs)]
        pred = layer(x)
        true = pred.detach() + torch.randn(pred.shape, generator=noise) if empirical_noise else None
        return pred, true

    # F[j, k] = E[u_j²] E_x[x_k²] = mean of x_k² over the inputs, the same for every row j
    exact = (xs**2).mean(0).expand(3, 5)
    return layer, predict, range(n), exact / exact.mean()


@pytest.mark.parametrize("estimator", ["true", "empirical"])
def test_the_estimate_of_a_linear_model_is_its_closed_form(estimator):
    layer, predict, samples, exact = linear_case(4000, empirical_noise=estimator == "empirical")
    estimate = fisher.estimate(layer, predict, samples, estimator=estimator, seed=3)["weight"]
    # each entry is a mean of 4000 draws of u²x² (relative sd √2/√1000 ≈ 4.5 % per input cycle)
    assert torch.allclose(estimate, exact, rtol=0.12), (estimate, exact)
    assert abs(float(estimate.mean()) - 1.0) < 1e-5  # normalised to mean 1


def test_fisher_merge_is_the_formula_and_equal_fisher_is_the_weighted_average():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, -2.0, 0.0])
    fa, fb = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 4.0, 1.0])
    merged = fisher.merge([a, b], [fa, fb], weights=[2.0, 1.0], eps=0.0)
    expected = (2 * fa * a + fb * b) / (2 * fa + fb)
    assert torch.allclose(merged, expected)
    equal = fisher.merge([a, b], [torch.ones(3), torch.ones(3)], weights=[0.25, 0.75])
    assert torch.allclose(equal, 0.25 * a + 0.75 * b, atol=1e-6)
    # where no model has information, the weighted average, not 0/ε
    none = fisher.merge([a, b], [torch.zeros(3), torch.zeros(3)])
    assert torch.allclose(none, (a + b) / 2)


def test_a_model_keeps_the_weights_its_outputs_depend_on():
    """Two linear models that each use different inputs: the merge keeps each one's columns."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 2, bias=False) for _ in range(2)]
    inputs = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])]
    fishers = []
    for model, x in zip(models, inputs, strict=True):
        fishers.append(fisher.estimate(model, lambda _, m=model, x=x: (m(x), None), range(50)))
    merged = fisher.merge_state([m.state_dict() for m in models], fishers)["weight"]
    assert torch.allclose(merged[:, :2], models[0].weight[:, :2].detach(), atol=1e-5)
    assert torch.allclose(merged[:, 2:], models[1].weight[:, 2:].detach(), atol=1e-5)


def test_bad_arguments_say_what_is_accepted():
    layer, predict, _, _ = linear_case(1)
    with pytest.raises(ValueError, match=r"estimator must be one of \('true', 'empirical'\)"):
        fisher.estimate(layer, predict, range(2), estimator="diag")
    with pytest.raises(ValueError, match="no samples"):
        fisher.estimate(layer, predict, [])


def test_a_unet_estimate_is_cached_and_reused_without_a_backward_pass(
    tiny_sd1, tmp_path, monkeypatch
):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.set_progress_bar_config(disable=True)
    first, hit = fisher.cached_unet_fisher(pipe, "abc", ["a red circle"], tmp_path, n=3)
    assert not hit and set(first) == {n for n, _ in pipe.unet.named_parameters()}
    assert abs(float(torch.cat([v.flatten() for v in first.values()]).mean()) - 1) < 1e-4

    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass ran although the estimate was cached")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    again, hit = fisher.cached_unet_fisher(pipe, "abc", ["a red circle"], tmp_path, n=3)
    assert hit and all(torch.equal(first[k], again[k]) for k in first)
    monkeypatch.undo()
    _, hit = fisher.cached_unet_fisher(pipe, "abc", ["a blue square"], tmp_path, n=3)
    assert not hit  # other prompts, another estimate


def test_a_fisher_merge_recipe_runs_live_and_equal_fisher_is_the_weighted_sum(
    tiny_sd1, tiny_sd1_other, tmp_path, monkeypatch
):
    import numpy as np

    from composer import engine, registry
    from composer.recipe import RecipeError, parse

    monkeypatch.setenv("COMPOSER_DATA", str(tmp_path))

    def recipe(method: str) -> dict:
        return {
            "prompt": "a red circle",
            "method": "merge",
            "experts": [
                {"model": tiny_sd1, "weight": 1.0},
                {"model": tiny_sd1_other, "weight": 3.0},
            ],
            "merge": {"method": method, "fisher_samples": 2},
            "sampler": {"steps": 2, "seed": 1},
        }

    cache = registry.ModelCache()
    made = engine.generate(parse(recipe("fisher")), cache=cache)
    assert len(list((tmp_path / "fisher").glob("*.safetensors"))) == 2  # one per model
    summed = engine.generate(parse(recipe("weighted_sum")), cache=cache)
    assert not np.array_equal(np.asarray(made.images[0]), np.asarray(summed.images[0]))

    # with every Fisher equal, θ* = Σ wᵢθᵢ / Σ wᵢ: the weighted sum, pixel for pixel
    real = fisher.cached_unet_fisher
    monkeypatch.setattr(
        fisher,
        "cached_unet_fisher",
        lambda *a, **k: ({n: torch.ones_like(v) for n, v in real(*a, **k)[0].items()}, True),
    )
    equal = engine.generate(parse(recipe("fisher")), cache=cache)
    diff = np.abs(np.asarray(equal.images[0], np.int16) - np.asarray(summed.images[0], np.int16))
    assert diff.max() <= 1
    with pytest.raises(RecipeError, match="'fisher' is not exported yet"):
        engine.export(parse(recipe("fisher")), tmp_path / "out.safetensors")
