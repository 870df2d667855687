"""AFA's layer walker and SABW aggregator against exact references (issue 7)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SD1_UNET, TINY_SDXL_UNET
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipelines.aggregation import (
    Aggregator,
    check_same_architecture,
    points,
    unet_fingerprint,
    uniform_combine,
    walk,
)
from pipelines.aggregation.training import denoising_loss


def _unet(config: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    for p in unet.parameters():  # diffusers zero-inits some outputs; make every path count
        p.data.add_(torch.randn_like(p) * 0.05)
    return unet


def _inputs(config: dict, batch: int = 2, h: int = 8, w: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen)
    text = torch.randn(batch, 7, config["cross_attention_dim"], generator=gen)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        added = {
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch),
        }
    return x, torch.tensor([500, 20]), text, added


def _only(index, features, context):
    (feature,) = features
    return feature


@pytest.mark.parametrize("config", [TINY_SD1_UNET, TINY_SDXL_UNET], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)], ids=["even", "odd"])
def test_one_expert_walked_equals_its_forward(config, size):
    unet = _unet(config, 0)
    x, t, text, added = _inputs(config, h=size[0], w=size[1])
    with torch.no_grad():
        expected = unet(x, t, text, added_cond_kwargs=added).sample
        walked = walk([unet], x, t, [text], _only, [added])
    assert torch.equal(walked, expected)


@pytest.mark.parametrize("config", [TINY_SD1_UNET, TINY_SDXL_UNET], ids=["sd1", "sdxl"])
def test_identical_experts_equal_one(config):
    unet = _unet(config, 0)
    x, t, text, added = _inputs(config)
    aggregator = Aggregator.for_unets([unet, unet, unet], groups=4, width=8, heads=2)
    with torch.no_grad():
        expected = unet(x, t, text, added_cond_kwargs=added).sample
        averaged = walk([unet] * 3, x, t, [text] * 3, uniform_combine, [added] * 3)
        aggregated = walk([unet] * 3, x, t, [text] * 3, aggregator.combine, [added] * 3)
    torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aggregated, expected, rtol=1e-5, atol=1e-6)


def _feature_average_reference(a, b, x, t, text_a, text_b):
    """Uniform feature averaging written out by hand for the tiny SD1 layout
    (DownBlock2D, CrossAttnDownBlock2D | mid | CrossAttnUpBlock2D, UpBlock2D)."""

    def avg(fa, fb):
        return (fa + fb) / 2

    ea = a.time_embedding(a.get_time_embed(x, t))
    eb = b.time_embedding(b.get_time_embed(x, t))

    def attn(block, j, h, text):
        return block.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]

    h0 = avg(a.conv_in(x), b.conv_in(x))
    h1 = avg(a.down_blocks[0].resnets[0](h0, ea), b.down_blocks[0].resnets[0](h0, eb))
    h2 = avg(a.down_blocks[0].downsamplers[0](h1), b.down_blocks[0].downsamplers[0](h1))
    h3 = avg(
        attn(a.down_blocks[1], 0, a.down_blocks[1].resnets[0](h2, ea), text_a),
        attn(b.down_blocks[1], 0, b.down_blocks[1].resnets[0](h2, eb), text_b),
    )
    h = avg(
        a.mid_block(h3, ea, encoder_hidden_states=text_a),
        b.mid_block(h3, eb, encoder_hidden_states=text_b),
    )
    up_a, up_b = a.up_blocks[0], b.up_blocks[0]
    for j, skip in enumerate([h3, h2]):
        z = torch.cat([h, skip], 1)
        h = avg(
            attn(up_a, j, up_a.resnets[j](z, ea), text_a),
            attn(up_b, j, up_b.resnets[j](z, eb), text_b),
        )
    h = avg(up_a.upsamplers[0](h), up_b.upsamplers[0](h))
    for j, skip in enumerate([h1, h0]):
        z = torch.cat([h, skip], 1)
        h = avg(a.up_blocks[1].resnets[j](z, ea), b.up_blocks[1].resnets[j](z, eb))
    return avg(
        a.conv_out(a.conv_act(a.conv_norm_out(h))), b.conv_out(b.conv_act(b.conv_norm_out(h)))
    )


def test_untrained_aggregator_is_feature_averaging():
    a, b = _unet(TINY_SD1_UNET, 0), _unet(TINY_SD1_UNET, 1)
    x, t, text, _ = _inputs(TINY_SD1_UNET)
    text_b = text.flip(0)
    aggregator = Aggregator.for_unets([a, b], groups=4, width=8, heads=2, position_channels=2)
    maps: list[torch.Tensor] = []
    with torch.no_grad():
        reference = _feature_average_reference(a, b, x, t, text, text_b)
        averaged = walk([a, b], x, t, [text, text_b], uniform_combine)
        aggregated = walk(
            [a, b], x, t, [text, text_b], lambda i, f, c: aggregator.combine(i, f, c, maps)
        )
    torch.testing.assert_close(averaged, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aggregated, reference, rtol=1e-5, atol=1e-6)
    assert len(maps) == len(points(a)) == 11
    assert all(torch.all(m == 0.5) for m in maps)
    # and the experts differ, so averaging is not trivially one of them
    with torch.no_grad():
        assert not torch.allclose(reference, a(x, t, text).sample, atol=1e-3)


def test_points_name_every_block_output():
    names = [p.name for p in points(_unet(TINY_SD1_UNET, 0))]
    assert names == [
        "conv_in", "down0.0", "down0.down", "down1.0", "mid",
        "up0.0", "up0.1", "up0.up", "up1.0", "up1.1", "head",
    ]  # fmt: skip


def test_aggregator_bound_to_other_experts_is_refused(tmp_path):
    a, b, c = (_unet(TINY_SD1_UNET, s) for s in (0, 1, 2))
    aggregator = Aggregator.for_unets([a, b], names=["warm", "cool"], groups=4, width=8, heads=2)
    aggregator.save_pretrained(tmp_path / "agg")
    loaded = Aggregator.from_pretrained(tmp_path / "agg")
    loaded.check_experts([a, b], ["warm", "cool"])
    with pytest.raises(ValueError, match=r"trained for warm, cool in that order; expert 1 \(cool"):
        loaded.check_experts([b, a], ["cool", "warm"])
    with pytest.raises(ValueError, match=r"expert 2 \(other"):
        loaded.check_experts([a, c], ["warm", "other"])
    with pytest.raises(ValueError, match=r"blends 2 experts .* not 3"):
        loaded.check_experts([a, b, c])


def test_fingerprint_ignores_device_dtype_not_weights():
    a, b = _unet(TINY_SD1_UNET, 0), _unet(TINY_SD1_UNET, 1)
    half = UNet2DConditionModel(**TINY_SD1_UNET)
    half.load_state_dict(a.state_dict())
    assert unet_fingerprint(half.half()) == unet_fingerprint(a) != unet_fingerprint(b)


def test_different_architectures_are_refused_naming_both():
    sd1 = _unet(TINY_SD1_UNET, 0)
    wider = _unet({**TINY_SD1_UNET, "block_out_channels": (8, 24)}, 0)
    with pytest.raises(
        ValueError,
        match=r"toy-a and big have different architectures: "
        r"block_out_channels is \[8, 16\] in toy-a but \[8, 24\] in big",
    ):
        check_same_architecture([sd1, wider], ["toy-a", "big"])
    with pytest.raises(ValueError, match="addition_embed_type"):
        check_same_architecture([sd1, _unet(TINY_SDXL_UNET, 0)], ["sd1", "sdxl"])


def test_one_training_step_lowers_a_fixed_batch_loss():
    a, b = _unet(TINY_SD1_UNET, 0), _unet(TINY_SD1_UNET, 1)
    for unet in (a, b):
        unet.requires_grad_(False)
    aggregator = Aggregator.for_unets([a, b], groups=4, width=8, heads=2, position_channels=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([100, 300, 600, 900])
    text = torch.randn(4, 7, 32, generator=gen)
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=1e-3)

    def loss():
        return denoising_loss(
            aggregator, [a, b], scheduler, latents, noise, timesteps, [text, text]
        )

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before
    assert all(p.grad is None for p in a.parameters())
