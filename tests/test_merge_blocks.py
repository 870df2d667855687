"""Block names of composer/merge/blocks.py on real SD 1.5 and SDXL U-Net layouts (from configs)."""

import pytest
from diffusers import UNet2DConditionModel

from composer.merge.blocks import block_names, block_of, names_for_config, weight_map

SD15 = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2}
SDXL = {"down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2, "layers_per_block": 2}


def test_block_lists_are_supermergers():
    sd15 = names_for_config(SD15)
    assert len(sd15) == 26 and sd15[:3] == ["BASE", "IN00", "IN01"]
    assert sd15[12:15] == ["IN11", "M00", "OUT00"] and sd15[-1] == "OUT11"
    sdxl = names_for_config(SDXL)
    assert len(sdxl) == 20 and sdxl[9:12] == ["IN08", "M00", "OUT00"] and sdxl[-1] == "OUT08"


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("conv_in.weight", "IN00"),
        ("down_blocks.0.resnets.0.conv1.weight", "IN01"),
        ("down_blocks.0.attentions.1.proj_in.weight", "IN02"),
        ("down_blocks.0.downsamplers.0.conv.weight", "IN03"),
        ("down_blocks.1.resnets.0.conv1.weight", "IN04"),
        ("down_blocks.2.downsamplers.0.conv.bias", "IN09"),
        ("down_blocks.3.resnets.1.conv2.weight", "IN11"),
        ("mid_block.attentions.0.proj_out.weight", "M00"),
        ("up_blocks.0.resnets.0.conv1.weight", "OUT00"),
        ("up_blocks.0.upsamplers.0.conv.weight", "OUT02"),
        ("up_blocks.1.attentions.2.proj_out.weight", "OUT05"),
        ("up_blocks.3.resnets.2.conv2.weight", "OUT11"),
        ("conv_out.weight", "OUT11"),
        ("time_embedding.linear_1.weight", "BASE"),
    ],
)
def test_sd15_parameter_blocks(name, block):
    assert block_of(name, 4, 2) == block


def test_every_block_of_a_real_layout_gets_parameters():
    """A U-Net built with SD 1.5's block layout (narrow channels): each of the 26 blocks except
    BASE's text encoder part owns some parameter, and no parameter falls outside the list."""
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        layers_per_block=2,
    )
    blocks = {block_of(n, 4, 2) for n, _ in unet.named_parameters()}
    assert blocks == set(block_names(4, 2))


def test_weight_map_block_weights_then_regex_overrides():
    weights = [0.0] * 26
    weights[block_names(4, 2).index("M00")] = 0.5
    weight = weight_map(SD15, weights, [(r"attentions\.\d+\.transformer_blocks", 2.0)])
    assert weight("mid_block.resnets.0.conv1.weight") == 0.5
    assert weight("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight") == 2.0
    assert weight("conv_in.weight") == 0.0
    assert weight_map(SD15, None)("conv_in.weight") == 1.0
    with pytest.raises(ValueError, match="block_weights has 20 values; this U-Net has 26 blocks"):
        weight_map(SD15, [1.0] * 20)
