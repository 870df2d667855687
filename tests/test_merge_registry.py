"""composer/merge/registry.py: one declaration per merge method, read by the recipe, the CLI, the
page and ``merge_tensor``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer.merge.plan import merge_tensor
from composer.merge.registry import (
    LORA_MERGE_METHODS,
    MERGE_METHODS,
    PARAMS,
    Merge,
    MergeError,
    check,
    merge_method,
)


def test_the_declarations_import_without_torch():
    code = "import sys, composer.merge.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_the_declarations_keep_the_recipes_names_and_settings():
    assert list(MERGE_METHODS) == [
        "weighted_sum",
        "add_difference",
        "task_arithmetic",
        "slerp",
        "ties",
        "dare",
        "dare_ties",
        "model_stock",
        "consensus",
        "fisher",
    ]
    assert [(p.name, p.attr) for p in PARAMS.values()][:2] == [
        ("density", "density"),
        ("lambda", "lambda_"),
    ]
    for p in PARAMS.values():
        assert getattr(Merge(), p.attr) == p.default
    assert LORA_MERGE_METHODS == ("concat", "ties", "dare", "dare_ties")


def test_check_names_the_missing_base_and_the_number_of_experts():
    with pytest.raises(MergeError, match=r"merge\.base: null is not accepted for method 'ties'"):
        check(Merge("ties"), 2, has_base=False)
    with pytest.raises(MergeError, match="merge method 'slerp' takes exactly 2 experts"):
        check(Merge("slerp"), 3, has_base=False)
    check(Merge("weighted_sum"), 1, has_base=False)
    check(Merge("add_difference"), 2, has_base=True)


def test_a_merge_method_is_one_declaration():
    @merge_method(needs_base=False, summary="the larger value of each entry")
    def entrywise_max(settings, operands):
        return torch.stack(list(operands.experts)).amax(0)

    try:
        a, b = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])
        out = merge_tensor(Merge("entrywise_max"), "w", None, [a, b], [1.0, 1.0])
        assert torch.equal(out, torch.tensor([3.0, 5.0]))
        check(Merge("entrywise_max"), 2, has_base=False)
        with pytest.raises(ValueError, match="already declared"):
            merge_method(summary="again")(entrywise_max)
    finally:
        MERGE_METHODS.pop("entrywise_max")


def test_a_declaration_reads_only_known_settings():
    def typo(settings, operands):
        return operands.experts[0]

    with pytest.raises(ValueError, match="unknown settings"):
        merge_method(params=("densty",), summary="x")(typo)
    assert "typo" not in MERGE_METHODS
