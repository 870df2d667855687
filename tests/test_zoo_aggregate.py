"""The bundled AFA aggregator on the toy zoo (issue 7): it must beat its baselines at denoising.

Held-out (x₀, ε, t) triples of toy-warm's and toy-cool's domains and of two-object scenes, the
same measurement as ``bench/aggregate_zoo.py`` on fewer triples (the bench uses 1024 per domain
and reports bootstrap intervals).
"""

import pytest
import torch

from bench.aggregate_zoo import denoising_errors, load_pipes
from pipelines.aggregation import Aggregator


@pytest.fixture(scope="module")
def errors():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipes = load_pipes()
        aggregator = Aggregator.from_pretrained("assets/aggregators/toy-warm-cool").eval()
        aggregator.check_experts([p.unet for p in pipes], ["toy-warm", "toy-cool"])
        return denoising_errors(pipes, aggregator, 96)
    finally:
        torch.set_num_threads(n)


def test_afa_denoises_better_than_every_baseline_on_the_union(errors):
    mse = errors["union"]["mse"]
    for baseline in ("toy-warm", "toy-cool", "eps averaging", "uniform feature averaging"):
        assert mse["afa"] < mse[baseline], (baseline, mse)


def test_afa_beats_both_experts_on_two_object_scenes(errors):
    mse = errors["scenes"]["mse"]
    assert mse["afa"] < min(mse["toy-warm"], mse["toy-cool"]), mse
