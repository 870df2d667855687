"""Malformed recipes: every one must end in ``RecipeError`` with a message, never a crash.

The cases are every field of a valid recipe replaced by every kind of wrong value (wrong type,
missing, NaN, ±inf, negative, huge, empty, path tricks), plus random byte/JSON garbage.
"""

import contextlib
import copy
import json
import random

import pytest

from composer import registry
from composer.recipe import RecipeError, parse

VALID = {
    "version": 1,
    "prompt": "a red circle",
    "negative_prompt": "",
    "method": "single",
    "experts": [
        {
            "model": "MODEL",
            "loras": [{"path": "LORA", "weight": 0.8}],
            "prompt": None,
            "weight": 1.0,
        }
    ],
    "sampler": {
        "scheduler": "euler",
        "steps": 3,
        "guidance_scale": 5.0,
        "seed": 0,
        "width": 16,
        "height": 16,
        "num_images": 1,
    },
}
BAD_VALUES = [
    None,
    True,
    "x" * 5000,
    -1,
    10**12,
    float("nan"),
    float("inf"),
    -float("inf"),
    [],
    {},
    [1, 2],
    "",
    2.5,
]
BAD_REFERENCES = [
    "../../etc/passwd",
    "/etc/passwd",
    "/",
    "~",
    "no-such-model",
    "a/b/c/d",
    "../x",
    "x\x00y",
    "C:\\Windows\\system.ini",
    "file:///etc/passwd",
    "/dev/zero",
    "model.ckpt",
]
FIELDS = [
    "version",
    "prompt",
    "negative_prompt",
    "method",
    "experts",
    "sampler",
    "experts.0",
    "experts.0.loras",
    "experts.0.loras.0",
    "experts.0.loras.0.weight",
    "experts.0.weight",
    "sampler.scheduler",
    "sampler.steps",
    "sampler.guidance_scale",
    "sampler.seed",
    "sampler.width",
    "sampler.height",
    "sampler.num_images",
]
ALLOWED = {  # values that happen to be valid for a field are not malformed there
    "negative_prompt": [""],
    "experts.0.loras": [[]],
    "sampler.width": [None],
    "sampler.height": [None],
    "experts.0.weight": [-1, 2.5],
    "experts.0.loras.0.weight": [-1, 2.5],
    "sampler.guidance_scale": [2.5],
    "prompt": [""],
    "sampler": [None, {}],  # null or {} is an absent sampler section: defaults
}


def _set(data, path, value, delete=False):
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if delete:
        del node[last]
    else:
        node[last] = value


def malformed_cases(model, lora):
    valid = json.loads(json.dumps(VALID).replace("MODEL", model).replace("LORA", lora))
    cases = []
    for path in FIELDS:
        for value in BAD_VALUES:
            if any(
                value is a or (type(value) is type(a) and value == a) for a in ALLOWED.get(path, [])
            ):
                continue
            data = copy.deepcopy(valid)
            _set(data, path, value)
            cases.append((f"{path}={value!r}"[:60], data))
    for path in ("prompt", "experts", "experts.0.model", "experts.0.loras.0.path"):
        data = copy.deepcopy(valid)
        _set(data, path, None, delete=True)
        cases.append((f"missing {path}", data))
    for ref in BAD_REFERENCES:
        for path in ("experts.0.model", "experts.0.loras.0.path"):
            data = copy.deepcopy(valid)
            _set(data, path, ref)
            cases.append((f"{path}={ref!r}", data))
    rng = random.Random(0)
    text = json.dumps(valid)
    for i in range(20):
        cut = rng.randrange(1, len(text))
        cases.append((f"truncated at {cut}", text[:cut]))
        chars = list(text)
        for _ in range(3):
            chars[rng.randrange(len(chars))] = rng.choice('{}[],:"0x-')
        cases.append((f"scrambled {i}", "".join(chars)))
    cases += [("not an object", "[]"), ("a number", "3"), ("empty", ""), ("null", "null")]
    return cases


def test_there_are_at_least_a_hundred_cases():
    assert len(malformed_cases("toy", "toy")) >= 100


def test_every_malformed_recipe_is_one_error_type_with_a_message(tiny_sd1, tiny_lora):
    from composer import engine

    crashed, accepted = [], []
    for name, data in malformed_cases(tiny_sd1, tiny_lora):
        try:
            recipe = parse(data, check=registry.check_reference)
        except RecipeError as e:
            assert str(e) and len(str(e)) < 600, name
            continue
        except Exception as e:  # anything else is a crash the user would see as a traceback
            crashed.append((name, repr(e)))
            continue
        # Random scrambles can still be valid JSON recipes; those must then generate cleanly.
        if name.startswith("scrambled"):
            with contextlib.suppress(RecipeError):
                engine.generate(recipe)
            continue
        accepted.append(name)
    assert not crashed, crashed
    assert not accepted, accepted


@pytest.mark.parametrize("reference", ["../../etc/passwd", "/etc/shadow", "/proc/self/environ"])
def test_path_tricks_are_refused_in_messages_that_do_not_leak_contents(reference, tiny_sd1):
    data = json.loads(json.dumps(VALID).replace("MODEL", reference).replace("LORA", reference))
    with pytest.raises(RecipeError) as info:
        parse(data, check=registry.check_reference)
    assert "root:" not in str(info.value)
