"""A composition method is one declaration: registered here, in the test, it is parsed, run by the
engine and the CLI, costed for ZeroGPU and shown on the page with no edit anywhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image, ImageOps

from composer import engine, registry
from composer.__main__ import main
from composer.methods import METHODS, Control, Form, Method, register, unregister
from composer.methods.single import sample
from composer.recipe import RecipeError, parse
from composer.sharing.pnginfo import read_recipe
from ui import form, handlers, run


@dataclass(frozen=True)
class Invert:
    amount: float = 1.0


def run_invert(job):
    """The first expert's images, blended toward their negative by ``amount``."""
    job.leases[job.sources[0].location].use_loras(job.loras[0])
    result = sample(job, job.pipe(0))
    a = METHODS["invert"].settings(job.recipe).amount
    result.images = [Image.blend(im, ImageOps.invert(im), a) for im in result.images]
    return result


INVERT = Method(
    name="invert",
    summary="one model's images, inverted",
    experts=(1, 1),
    run=run_invert,
    section=Invert,
    parse_section=lambda obj, n: Invert(obj.number("amount", default=1.0, low=0.0, high=1.0)),
    unet_calls=lambda recipe: 1,
    form=Form(
        tab="Invert",
        intro="The negative of one model's picture.",
        read=lambda v: {
            "experts": [{"model": v["rows"][0]["model"]}],
            "invert": {"amount": v["amount"]},
        },
        write=lambda r: {
            "amount": r.invert.amount if r.invert else 1.0,
            "rows": [{"model": r.experts[0].model}],
        },
        controls=(Control("amount", "slider", "Amount", 1.0, low=0, high=1, step=0.1),),
        row=(Control("model", "model", "Model"),),
        rows=1,
        min_rows=1,
    ),
)


@pytest.fixture
def invert():
    register(INVERT)
    yield INVERT
    unregister("invert")


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if isinstance(image, str) else image)


def test_a_registered_method_runs_from_the_cli(invert, tiny_sd1, tmp_path, capsys):
    recipe = {
        "prompt": "a",
        "method": "invert",
        "experts": [{"model": tiny_sd1}],
        "invert": {"amount": 1},
        "sampler": {"steps": 2, "seed": 4, "num_images": 2},
    }
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert main(["generate", str(tmp_path / "r.json"), "--out", str(tmp_path / "out")]) == 0
    single = {**recipe, "method": "single"}
    plain = engine.generate(parse(single, check=registry.check_reference))
    for i, image in enumerate(plain.images):
        made = str(tmp_path / "out" / f"{i:05d}.png")
        assert (pixels(made) == 255 - pixels(image)).all()
        assert read_recipe(made).to_dict()["invert"] == {"amount": 1.0}  # its section in the PNG

    recipe["invert"] = {"amount": 2}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "r.json"), "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: invert.amount: 2 is not accepted; expected a finite number from 0 to 1"
    )


def test_a_registered_method_has_a_tab_a_codec_and_a_cost(invert, tiny_sd1):
    from ui.page import Page

    recipe = parse(
        {
            "prompt": "a",
            "method": "invert",
            "experts": [{"model": tiny_sd1}],
            "invert": {"amount": 0.3},
            "sampler": {"steps": 7},
        }
    )
    values = form.from_recipe(recipe)
    assert values["invert.amount"] == 0.3 and values["invert.0.model"] == tiny_sd1
    assert parse(form.to_recipe(values)) == recipe
    assert run.gpu_seconds(recipe) == run.gpu_seconds(
        parse({**recipe.to_dict(), "method": "single"})
    )
    page = Page()
    assert {"invert.amount", "invert.0.model"} <= set(page.components)
    assert handlers.restore(recipe)["tabs"]["selected"] == "invert"  # a PNG or link opens it


def test_a_method_without_its_registration_is_refused():
    with pytest.raises(RecipeError, match='method: "invert" is not accepted; expected one of'):
        parse({"prompt": "a", "method": "invert", "experts": [{"model": "toy-warm"}]})
