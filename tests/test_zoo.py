"""The bundled toy zoo draws what it is asked for (a small sample of the model cards' checks).

The zoo trained on CPU in this project's first session does not yet reach the targets of issue 4
(90 % / 80 %, see the model cards and bench/results/zoo-cpu.json: 41–92 % on 64 seeds, mostly
shapes the evaluator cannot name). Until it is retrained, this guards against regressions only:
a model that draws the named colour and shape in fewer than a quarter of 8 seeds is broken
(chance is about 1/6 for a colour and a shape of a fine-tune's domain).
"""

import pytest

from composer import registry
from toyworld.measure import CHECKS, measure

SEEDS = 8
FLOOR = 0.25


def test_the_zoo_is_bundled():
    assert {"toy-base", "toy-warm", "toy-cool"} <= set(registry.bundled("models"))
    assert {"toy-purple", "toy-star"} <= set(registry.bundled("loras"))


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


def _name(check):
    lora = "+" + check.loras[0] if check.loras else ""
    return f"{check.model}{lora}: {check.prompt}"


@pytest.mark.parametrize("check", CHECKS, ids=_name)
def test_model_draws_the_named_colour_and_shape(check, cache):
    row = measure(check, SEEDS, cache)
    assert row["accuracy"] >= FLOOR, row
