"""The learned router (pipelines/superposition/router.py): a one-hot router is that expert, and
a router trained on two Gaussian partitions approaches their true posterior."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.superposition import SuperpositionPipeline
from pipelines.superposition.router import Router, router_loss


def one_hot_router(k: int, n: int = 2) -> Router:
    router = Router(num_experts=n)
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.fill_(-50.0)
        router.head.bias[k] = 50.0
    return router


def test_a_one_hot_router_samples_that_expert(tiny_sd1, tiny_sd1_other):
    from diffusers import StableDiffusionPipeline

    pipes = [StableDiffusionPipeline.from_pretrained(p) for p in (tiny_sd1, tiny_sd1_other)]
    both = SuperpositionPipeline.from_pipes(pipes)
    alone = SuperpositionPipeline.from_pipes(pipes[:1])  # same VAE and text encoder
    for p in (both, alone):
        p.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "np"}
    routed = both(
        prompt=["a", "a"],
        mode="router",
        router=one_hot_router(0),
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    single = alone(prompt="a", mode="average", generator=torch.Generator().manual_seed(0), **common)
    assert np.abs(routed.images - single.images).max() < 1.5 / 255
    assert torch.all(routed.kappa[:, 0] > 0.999)  # the trace shows the router's weights


def test_a_trained_router_approaches_the_posterior_of_two_gaussian_partitions():
    """x₀ ~ N(±m·1, I) in a 4×8×8 latent, noised x_t = √ᾱ x₀ + √(1−ᾱ) ε ~ N(±√ᾱ m·1, I): the
    posterior of the first partition is sigmoid(2√ᾱ m Σx_t)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m, shape = 0.08, (4, 8, 8)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    router = Router(num_experts=2, width=16)
    optimiser = torch.optim.Adam(router.parameters(), lr=3e-3)
    for _ in range(400):
        labels = torch.randint(0, 2, (128,), generator=gen)
        sign = (1 - 2 * labels).float().reshape(-1, 1, 1, 1)
        latents = sign * m + torch.randn(128, *shape, generator=gen)
        loss = router_loss(router, latents, labels, alphas_cumprod, gen)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    errors = []
    with torch.no_grad():
        for t in (50, 300, 600, 900):
            a = alphas_cumprod[t]
            labels = torch.randint(0, 2, (512,), generator=gen)
            sign = (1 - 2 * labels).float().reshape(-1, 1, 1, 1)
            x0 = sign * m + torch.randn(512, *shape, generator=gen)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
            exact = torch.sigmoid(2 * a.sqrt() * m * xt.sum((1, 2, 3)))
            predicted = router.weights(xt, torch.tensor(t))[0].float()
            errors.append(float((predicted - exact).abs().mean()))
    assert max(errors) < 0.08, errors


def router_recipe(**superpose) -> dict:
    return {
        "prompt": "a circle",
        "method": "superpose",
        "experts": [{"model": "toy-warm"}, {"model": "toy-cool"}],
        "superpose": {"mode": "router", "router": "toy-warm-cool", **superpose},
        "sampler": {"steps": 4, "seed": 0, "num_images": 2},
    }


def test_the_bundled_router_runs_in_a_recipe_and_its_weights_are_traced():
    from composer import engine, registry
    from composer.recipe import parse

    result = engine.generate(parse(router_recipe()), cache=registry.ModelCache())
    assert len(result.images) == 2
    kappa = np.array([step["kappa"] for step in result.trace[0]])
    assert kappa.shape == (4, 2) and np.allclose(kappa.sum(1), 1.0)
    assert not np.allclose(kappa, 0.5)  # the router decides, it is not an average


def test_router_settings_are_checked_with_their_field_named(tmp_path):
    import pytest

    from composer import engine, registry
    from composer.recipe import RecipeError, parse

    with pytest.raises(RecipeError, match=r"superpose\.router: null is not accepted for mode"):
        parse(router_recipe(router=None))
    with pytest.raises(RecipeError, match=r"is read only by mode 'router', not 'or'"):
        parse(router_recipe(mode="or"))
    three = router_recipe()
    three["experts"] = three["experts"] + [{"model": "toy-base"}]
    with pytest.raises(RecipeError, match=r"routes 2 experts, the recipe has 3"):
        engine.generate(parse(three), cache=registry.ModelCache())
    with pytest.raises(RecipeError, match=r"superpose\.router: unknown router 'nope'"):
        parse(router_recipe(router="nope"), check=registry.check_reference)


def test_the_trainer_writes_a_card_and_resumes_from_its_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """``python -m composer router train``: a run stopped between checkpoints continues from the
    last one (not from zero), and the finished router loads with its experts' names."""
    from composer.__main__ import main as cli
    from composer.training import router as trainer
    from pipelines.superposition.router import Router
    from toyworld.render import render

    folders = []
    for name, colour in (("warm", "red"), ("cool", "blue")):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(10):
            render(("circle", "square")[i % 2], colour, i).save(folder / f"{i}.png")
        folders.append(str(folder))
    out = tmp_path / "router"
    monkeypatch.setattr(trainer, "SAVE_EVERY", 10)
    seen = []

    def stop_at_20(line):
        seen.append(line)
        if line.startswith("step 20/"):
            raise KeyboardInterrupt  # killed after the checkpoint at 10, before the one at 20

    import composer.registry as registry

    source = registry.resolve_model("toy-warm")
    with registry.CACHE.lease(source) as lease, pytest.raises(KeyboardInterrupt):
        trainer.train(lease.pipe, ["toy-warm", "toy-cool"], [Path(f) for f in folders], out,
                      steps=40, batch=8, log=stop_at_20)  # fmt: skip
    assert json.loads((out / "training.json").read_text())["steps"] == 10
    args = ["router", "train", "--experts", "toy-warm", "toy-cool", "--data", *folders,
            "--out", str(out), "--steps", "40", "--batch", "8"]  # fmt: skip
    assert cli(args) == 0
    assert "resuming from step 10" in capsys.readouterr().out
    figures = json.loads((out / "training.json").read_text())
    assert figures["steps"] == 40 and set(figures["held_out_accuracy_by_timestep"]) == {
        "100", "400", "700", "950"
    }  # fmt: skip
    assert "router" in (out / "README.md").read_text()
    assert Router.from_pretrained(out).config.expert_names == ["toy-warm", "toy-cool"]
