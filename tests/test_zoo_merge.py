"""Weight merging on the bundled zoo (an 8-seed sample of bench/results/merge-zoo-cpu.json).

Issue 5's targets are on 64 seeds: TIES of toy-warm and toy-cool over toy-base keeps ≥ 90 % of
each expert's accuracy on its own prompt, and the purple and star LoRAs merged draw purple stars.
Measured on 64 seeds: TIES with equal weights draws "a red circle" 100 % but "a blue square" only
58 % (37 blue, 19 green: the merge blurs blue with cool's other colour); with toy-cool weighted
1.2 (``WEIGHTED_TIES``, chosen on four other prompts by ``--weights``, never on these two) 98 %
and 91 %. The merged LoRAs draw 83 % purple stars. Here, on 8 seeds: 6 of 8 red circles and 4 of
8 blue squares for equal weights (so a regression to the first zoo's purple merges, 0 of 64,
fails), 8 and 7 of 8 for the weighted merge (the test asks 7 of each), and 5 of 8 purple stars;
chance is about 1/6 for a colour and a shape. The other merges are measured beside TIES in the
bench.
"""

import pytest

from bench.merge_zoo import (
    MERGES,
    PROMPTS,
    WEIGHTED_TIES,
    accuracy,
    merge_recipe,
    weighted_experts,
)
from composer import registry
from composer.checkpoints.lora_files import write_lora
from composer.merge.lora import merge_files
from toyworld.measure import DEFAULT_SAMPLER

SEEDS = 8


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


@pytest.mark.parametrize(("prompt", "least"), [("a red circle", 6 / 8), ("a blue square", 4 / 8)])
def test_ties_of_warm_and_cool_keeps_each_experts_colour(prompt, least, cache):
    color, shape, _ = PROMPTS[prompt]
    row = accuracy(merge_recipe(prompt, MERGES["ties"]), color, shape, SEEDS, cache)
    assert row["accuracy"] >= least, row


@pytest.mark.parametrize("prompt", ["a red circle", "a blue square"])
def test_ties_with_cool_weighted_keeps_both_colours(prompt, cache):
    color, shape, _ = PROMPTS[prompt]
    recipe = merge_recipe(prompt, MERGES["ties"], weighted_experts(WEIGHTED_TIES))
    row = accuracy(recipe, color, shape, SEEDS, cache)
    assert row["accuracy"] >= 7 / 8, row


def test_merged_purple_and_star_loras_draw_purple_stars(cache, tmp_path):
    merged = tmp_path / "purple-star.safetensors"
    paths = [registry.resolve_lora("toy-purple"), registry.resolve_lora("toy-star")]
    write_lora(str(merged), merge_files(paths, [1.0, 1.0]))
    recipe = {
        "prompt": "a purple star",
        "experts": [{"model": "toy-base", "loras": [{"path": str(merged), "weight": 1.0}]}],
        "sampler": dict(DEFAULT_SAMPLER),
    }
    row = accuracy(recipe, "purple", "star", SEEDS, cache)
    assert row["accuracy"] >= 5 / 8, row
