import json
import math

import pytest

from composer.__main__ import apply_overrides
from composer.recipe import (
    RecipeError,
    a1111_sampler_name,
    normalize_scheduler,
    parse,
)

FULL = {
    "version": 1,
    "prompt": "a red circle",
    "negative_prompt": "blurry",
    "method": "superpose",
    "experts": [
        {
            "model": "toy-warm",
            "loras": [{"path": "toy-purple", "weight": 0.8}],
            "prompt": None,
            "weight": 1.0,
        },
        {"model": "toy-cool", "loras": [], "prompt": "a circle", "weight": 0.5},
    ],
    "merge": {
        "method": "ties",
        "base": "toy-base",
        "density": 0.2,
        "lambda": 1.0,
        "seed": 0,
        "block_weights": None,
        "overrides": [{"pattern": r"attentions\.\d+\.", "weight": 0.5}],
        "sign_rule": "mass",
        "trim_scope": "model",
        "consensus_of": "ties",
        "consensus_k": 2,
        "mask_lambda": 0.4,
        "fisher_samples": 32,
        "fisher_estimator": "true",
    },
    "superpose": {"mode": "or", "temperature": 1.0, "bias": [0.0, math.log(3)]},
    "aggregate": {"aggregator": "toy-warm-cool"},
    "sampler": {
        "scheduler": "euler",
        "steps": 20,
        "guidance_scale": 5.0,
        "seed": 0,
        "width": 64,
        "height": 64,
        "num_images": 4,
    },
}


def minimal(**changes):
    data = {"prompt": "a red circle", "experts": [{"model": "toy-warm"}]}
    data.update(changes)
    return data


def test_full_recipe_round_trips_through_json():
    recipe = parse(FULL)
    assert recipe.to_dict() == FULL
    assert parse(recipe.to_json()) == recipe


def test_defaults_fill_a_minimal_recipe_and_absent_sections_stay_absent():
    recipe = parse(minimal())
    out = recipe.to_dict()
    assert out["method"] == "single" and out["negative_prompt"] == ""
    assert out["sampler"] == {
        "scheduler": "euler",
        "steps": 20,
        "guidance_scale": 5.0,
        "seed": 0,
        "width": None,
        "height": None,
        "num_images": 1,
    }
    assert "merge" not in out and "superpose" not in out and "aggregate" not in out
    assert out["experts"] == [{"model": "toy-warm", "loras": [], "prompt": None, "weight": 1.0}]


def test_superpose_temperature_null_or_absent_means_the_guidance_scale():
    assert parse(minimal(superpose={"mode": "or"})).superpose.temperature is None
    null = parse(minimal(superpose={"temperature": None}))
    assert null.superpose.temperature is None
    assert json.loads(null.to_json())["superpose"]["temperature"] is None
    assert parse(minimal(superpose={"temperature": 2})).superpose.temperature == 2.0


def test_expert_prompt_falls_back_to_the_recipe_prompt():
    recipe = parse(FULL)
    assert recipe.expert_prompt(0) == "a red circle"
    assert recipe.expert_prompt(1) == "a circle"


@pytest.mark.parametrize(
    "data, field, accepted",
    [
        (minimal(version=2), "recipe.version", "whole number from 1 to 1"),
        ({"experts": [{"model": "toy-warm"}]}, "recipe.prompt", "required"),
        (minimal(prompt=3), "recipe.prompt", "a string"),
        (minimal(negative_prompt=None), "recipe.negative_prompt", "a string"),
        (minimal(method="blend"), "recipe.method", "single, merge, superpose, aggregate"),
        (minimal(experts=[]), "recipe.experts", "a list of 1 to 8"),
        (minimal(experts="toy-warm"), "recipe.experts", "a list"),
        (minimal(experts=[{"model": ""}]), "experts[0].model", "a bundled name"),
        (
            minimal(experts=[{"model": "toy-warm", "loras": [{"weight": 1}]}]),
            "experts[0].loras[0].path",
            "required",
        ),
        (
            minimal(experts=[{"model": "toy-warm", "loras": [{"path": "x", "weight": "strong"}]}]),
            "experts[0].loras[0].weight",
            "finite number",
        ),
        (
            minimal(experts=[{"model": "toy-warm", "weight": float("nan")}]),
            "experts[0].weight",
            "finite number",
        ),
        (minimal(sampler={"steps": 0}), "sampler.steps", "from 1 to 150"),
        (minimal(sampler={"steps": 10_000}), "sampler.steps", "from 1 to 150"),
        (minimal(sampler={"steps": 2.5}), "sampler.steps", "whole number"),
        (minimal(sampler={"steps": True}), "sampler.steps", "whole number"),
        (minimal(sampler={"guidance_scale": float("inf")}), "sampler.guidance_scale", "finite"),
        (minimal(sampler={"seed": -1}), "sampler.seed", "from 0 to 4294967295"),
        (minimal(sampler={"width": 100}), "sampler.width", "multiple of 8"),
        (minimal(sampler={"height": 1 << 20}), "sampler.height", "from 16 to 2048"),
        (minimal(sampler={"num_images": 1000}), "sampler.num_images", "from 1 to 16"),
        (minimal(sampler={"scheduler": "warp drive"}), "sampler.scheduler", "euler, euler_a"),
        (minimal(sampler={"stpes": 20}), "sampler", 'unknown field "stpes"'),
        (minimal(superpose={"mode": "xor"}), "superpose.mode", "one of or, and"),
        (minimal(merge={"sign_rule": "vote"}), "merge.sign_rule", "one of mass, count"),
        (minimal(merge={"trim_scope": "layer"}), "merge.trim_scope", "one of tensor, model"),
        (
            minimal(merge={"overrides": [{"pattern": "(", "weight": 1}]}),
            "merge.overrides[0].pattern",
            "regular expression",
        ),
        (minimal(superpose={"bias": [0, 1]}), "superpose.bias", "a list of 1 finite numbers"),
        (
            minimal(superpose={"temperature": "hot"}),
            "superpose.temperature",
            "null or a finite number from 0.001 to 100",
        ),
        (minimal(merge={"density": 1.5}), "merge.density", "from 0 to 1"),
        (minimal(merge={"method": "average"}), "merge.method", "weighted_sum"),
        (minimal(aggregate={"aggregator": 7}), "aggregate.aggregator", "a bundled name"),
        (minimal(colour="red"), "recipe", 'unknown field "colour"'),
        (minimal(method="superpose"), "experts", "needs 2 to 8 experts"),
        ([1, 2], "recipe", "expected a JSON object"),
    ],
)
def test_each_mistake_names_field_value_and_what_is_accepted(data, field, accepted):
    with pytest.raises(RecipeError) as info:
        parse(data)
    message = str(info.value)
    assert message.startswith(field), message
    assert accepted in message, message


def test_bad_json_text_is_a_recipe_error():
    with pytest.raises(RecipeError, match="not valid JSON"):
        parse("{prompt: 'a'}")


def test_integral_floats_are_accepted_where_integers_are_wanted():
    recipe = parse(minimal(sampler={"steps": 12.0, "width": 64.0, "height": 64}))
    assert recipe.sampler.steps == 12 and isinstance(recipe.sampler.steps, int)
    assert recipe.sampler.width == 64


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Euler a", "euler_a"),
        ("euler_a", "euler_a"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("dpm++  2m   karras", "dpmpp_2m_karras"),
        ("DPM++ 2M SDE", "dpmpp_2m_sde"),
        ("DDIM", "ddim"),
        ("PLMS", "pndm"),
        ("dpmpp-2m", "dpmpp_2m"),
        ("k_lms", None),
        ("", None),
    ],
)
def test_scheduler_names_from_diffusers_and_a1111_are_normalised(name, expected):
    assert normalize_scheduler(name) == expected


def test_a1111_sampler_name_is_the_inverse_of_normalisation():
    for key in ("euler", "euler_a", "dpmpp_2m_karras", "dpmpp_sde", "pndm"):
        assert normalize_scheduler(a1111_sampler_name(key)) == key


def test_sampler_accepts_an_a1111_name_and_stores_the_diffusers_name():
    recipe = parse(minimal(sampler={"scheduler": "DPM++ 2M Karras"}))
    assert recipe.sampler.scheduler == "dpmpp_2m_karras"


def test_overrides_set_nested_values_as_json_or_text():
    data = apply_overrides(
        json.loads(json.dumps(FULL)),
        [
            "sampler.seed=3",
            "experts.1.model=toy-base",
            "prompt=a blue square",
            "superpose.bias=null",
            "sampler.width=null",
        ],
    )
    recipe = parse(data)
    assert recipe.sampler.seed == 3
    assert recipe.experts[1].model == "toy-base"
    assert recipe.prompt == "a blue square"
    assert recipe.superpose.bias is None and recipe.sampler.width is None


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("sampler.seed", "expected key.path=value"),
        ("experts.5.model=x", "not an index of a list of 1"),
        ("prompt.x=1", "inside a value"),
    ],
)
def test_bad_overrides_are_recipe_errors(assignment, message):
    with pytest.raises(RecipeError, match=message):
        apply_overrides(minimal(), [assignment])


def test_check_is_called_for_every_reference_with_its_field():
    seen = []
    parse(FULL, check=lambda kind, ref, where: seen.append((kind, ref, where)))
    assert seen == [
        ("model", "toy-warm", "experts[0].model"),
        ("lora", "toy-purple", "experts[0].loras[0].path"),
        ("model", "toy-cool", "experts[1].model"),
        ("model", "toy-base", "merge.base"),
        ("aggregator", "toy-warm-cool", "aggregate.aggregator"),
    ]
