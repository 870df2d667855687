"""composer/merge/lora.py: LoRA sums, SVD truncation and extraction against direct ΔW sums."""

import pytest
import torch

from composer.merge.lora import LoraPair, concat, extract, from_delta, merge_pairs


def pair(out, inp, r, scale=1.0, conv=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if conv:
        return LoraPair(
            torch.randn(r, inp, 3, 3, generator=gen),
            torch.randn(out, r, 1, 1, generator=gen),
            scale,
        )
    return LoraPair(torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen), scale)


@pytest.mark.parametrize("conv", [False, True])
def test_concatenation_is_the_exact_sum_of_deltas(conv):
    a, b = pair(6, 5, 2, 0.5, conv, seed=1), pair(6, 5, 3, 2.0, conv, seed=2)
    merged = concat([a, b], [0.8, -1.5])
    assert merged.rank == 5 and merged.scale == 1.0
    torch.testing.assert_close(merged.delta(), a.delta(0.8) + b.delta(-1.5))
    if conv:
        assert merged.delta().shape == (6, 5, 3, 3)


def test_svd_truncation_is_exact_at_full_rank_and_best_below():
    a, b = pair(8, 7, 2, seed=3), pair(8, 7, 2, seed=4)
    full = merge_pairs([a, b], [1.0, 1.0], rank=4)
    torch.testing.assert_close(full.delta(), a.delta() + b.delta())
    low = merge_pairs([a, b], [1.0, 1.0], rank=2)
    target = a.delta() + b.delta()
    s = torch.linalg.svdvals(target)
    # Eckart–Young: the error of the best rank-2 approximation is the norm of the dropped values
    err = torch.linalg.matrix_norm(target - low.delta())
    assert float(err) == pytest.approx(float(s[2:].norm()), rel=1e-4)


def test_extract_recovers_a_low_rank_difference():
    base = torch.randn(10, 6)
    change = pair(10, 6, 3, seed=5).delta()
    lora = extract(base, base + change, rank=3)
    torch.testing.assert_close(lora.delta(), change, atol=1e-4, rtol=1e-4)
    assert from_delta(change, 3).rank == 3


def test_ties_on_deltas_keeps_agreeing_entries():
    """Two LoRAs whose ΔW agree in sign on the first column and disagree on the second: TIES at
    density 1 averages the first column and keeps the larger-mass side of the second."""
    d1 = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    d2 = torch.tensor([[3.0, -5.0], [3.0, -5.0]])
    p1, p2 = from_delta(d1, 2), from_delta(d2, 2)
    merged = merge_pairs([p1, p2], [1.0, 1.0], method="ties", density=1.0, rank=2)
    torch.testing.assert_close(
        merged.delta(), torch.tensor([[2.0, -5.0], [2.0, -5.0]]), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="concat, ties"):
        merge_pairs([p1, p2], [1.0, 1.0], method="magic")


def test_merged_lora_file_equals_both_adapters_active(tmp_path):
    """toy-purple ⊕ toy-star by concatenation, written and loaded back: the U-Net's output equals
    the one with both original adapters active at strength 1 (diffusers' set_adapters)."""
    from diffusers import StableDiffusionPipeline

    from composer import registry
    from composer.checkpoints.lora_files import write_lora
    from composer.merge.lora import merge_files

    purple = registry.resolve_lora("toy-purple")
    star = registry.resolve_lora("toy-star")
    out = tmp_path / "purple-star.safetensors"
    write_lora(str(out), merge_files([purple, star], [1.0, 0.7]))

    pipe = StableDiffusionPipeline.from_pretrained(registry.bundled("models")["toy-base"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    cond = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    pipe.load_lora_weights(purple, adapter_name="purple")
    pipe.load_lora_weights(star, adapter_name="star")
    pipe.set_adapters(["purple", "star"], [1.0, 0.7])
    with torch.no_grad():
        both = pipe.unet(x, t, cond).sample
        pipe.load_lora_weights(str(out), adapter_name="merged")
        pipe.set_adapters(["merged"])
        merged = pipe.unet(x, t, cond).sample
        pipe.disable_lora()
        plain = pipe.unet(x, t, cond).sample
    torch.testing.assert_close(merged, both, atol=1e-5, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-3


def test_cli_extracts_a_lora_that_moves_base_toward_the_tuned_model(tmp_path):
    from diffusers import UNet2DConditionModel

    from composer import registry
    from composer.__main__ import main

    out = tmp_path / "warm.safetensors"
    assert main(["lora", "extract", "toy-base", "toy-warm", "--rank", "16", "--out", str(out)]) == 0
    models = registry.bundled("models")
    base = UNet2DConditionModel.from_pretrained(models["toy-base"], subfolder="unet")
    warm = UNet2DConditionModel.from_pretrained(models["toy-warm"], subfolder="unet")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        target, before = warm(x, t, cond).sample, base(x, t, cond).sample
        base.load_lora_adapter(str(out), prefix="unet", adapter_name="warm")
        after = base(x, t, cond).sample
    assert (after - target).norm() < 0.5 * (before - target).norm()


def test_cli_lora_merge_rejects_mismatched_strengths(tmp_path, capsys):
    from composer.__main__ import main

    code = main(
        [
            "lora",
            "merge",
            "toy-purple",
            "toy-star",
            "--strength",
            "1",
            "--out",
            str(tmp_path / "x.safetensors"),
        ]
    )
    assert code == 2 and "2 LoRAs" in capsys.readouterr().err
