r"""Walk N stock diffusers U-Nets in lock-step, blending their features after every block.

AFA (Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation", ICLR 2025, §3.2)
aggregates the experts' features after each block of the U-Net. Their release forks diffusers
0.21's U-Net; we step through the *public* submodules of unmodified diffusers U-Nets instead, in
the order ``UNet2DConditionModel.forward`` runs them:

    conv_in → for each down block: (resnet, attention) pairs, then the downsampler
            → mid block → for each up block: (resnet, attention) pairs, then the upsampler
            → the output head (norm, act, conv_out)

Each of these is a *point*. At a point every expert runs its own module on the shared input,
then ``combine(point, features)`` blends the N outputs into one tensor, which is every expert's
next input and what goes onto the one shared skip stack. Each expert keeps its own time embedding
and its own text-encoder output. With one expert and ``combine`` returning its only input the
walk is exactly ``unet(x, t, c).sample``: the tests check that bit for bit.

ControlNet residuals, T2I adapters, GLIGEN, attention masks and class labels are not arguments
of the walk; FreeU, which would act inside the up blocks, is refused rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_COMPARED_CONFIG = (
    "addition_embed_type",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "projection_class_embeddings_input_dim",
    "time_embedding_type",
)


@dataclass(frozen=True)
class Point:
    """One aggregation point: its name (``down1.0``, ``down1.down``, ``mid``, ``up2.1``,
    ``head``…) and the channels of the features blended there."""

    name: str
    channels: int


@dataclass
class Context:
    """What every aggregator sees besides the features: the experts' mean time embedding
    (B, D_t) and a prompt embedding (B, L, D_c): the experts' mean, or the aggregators' own
    (``walk``'s ``aggregator_text``)."""

    temb: torch.Tensor
    text: torch.Tensor


Combine = Callable[[int, list[torch.Tensor], Context], torch.Tensor]
"""``combine(point_index, features, context) -> blended``: N tensors (B, C, H, W) in, one out."""


def _config_value(unet: UNet2DConditionModel, key: str):
    value = unet.config.get(key)
    return list(value) if isinstance(value, (list, tuple)) else value


def check_same_architecture(unets: Sequence[UNet2DConditionModel], names: Sequence[str]) -> None:
    """Refuse experts that cannot be walked in lock-step, naming both and the first mismatch.

    Block types must be ones the walker knows, and every expert's configuration must match the
    first's in everything that decides the feature shapes.
    """
    if len(unets) != len(names):
        raise ValueError(f"{len(unets)} U-Nets but {len(names)} names")
    for unet, name in zip(unets, names, strict=True):
        blocks = [
            *unet.config.down_block_types,
            *unet.config.up_block_types,
            unet.config.mid_block_type,
        ]
        unknown = [b for b in blocks if b not in (*DOWN_BLOCKS, *MID_BLOCKS, *UP_BLOCKS)]
        if unknown:
            raise ValueError(
                f"{name}: block type {unknown[0]} cannot be aggregated; supported: "
                + ", ".join((*DOWN_BLOCKS, *MID_BLOCKS, *UP_BLOCKS))
            )
    first, first_name = unets[0], names[0]
    for unet, name in zip(unets[1:], names[1:], strict=True):
        for key in _COMPARED_CONFIG:
            a, b = _config_value(first, key), _config_value(unet, key)
            if a != b:
                raise ValueError(
                    f"{first_name} and {name} have different architectures: "
                    f"{key} is {a!r} in {first_name} but {b!r} in {name}"
                )


def points(unet: UNet2DConditionModel) -> list[Point]:
    """The aggregation points of ``unet``, in the order the walk reaches them."""
    out = [Point("conv_in", unet.conv_in.out_channels)]
    for b, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(block.resnets):
            out.append(Point(f"down{b}.{j}", resnet.out_channels))
        if block.downsamplers is not None:
            out.append(Point(f"down{b}.down", block.downsamplers[0].out_channels))
    out.append(Point("mid", unet.mid_block.resnets[-1].out_channels))
    for b, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            out.append(Point(f"up{b}.{j}", resnet.out_channels))
        if block.upsamplers is not None:
            out.append(Point(f"up{b}.up", block.upsamplers[0].out_channels))
    out.append(Point("head", unet.conv_out.out_channels))
    return out


def time_embedding(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The embedding every resnet of ``unet`` receives, computed as its ``forward`` does
    (timestep, SDXL's added text/size embedding, the optional activation)."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def _attend(attn, hidden: torch.Tensor, text: torch.Tensor, kwargs: dict | None) -> torch.Tensor:
    return attn(
        hidden, encoder_hidden_states=text, cross_attention_kwargs=kwargs, return_dict=False
    )[0]


def walk(
    unets: Sequence[UNet2DConditionModel],
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: Sequence[torch.Tensor],
    combine: Combine,
    added_cond_kwargs: Sequence[dict[str, torch.Tensor] | None] | None = None,
    cross_attention_kwargs: dict | None = None,
    aggregator_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the experts block by block on ``sample``, blending after every point.

    ``encoder_hidden_states[i]`` (and ``added_cond_kwargs[i]`` for SDXL) belong to expert i.
    The aggregators cross-attend to ``aggregator_text`` when given (a prompt of the whole image
    while each expert reads its own part, e.g. "a red circle and a blue square" over "a red
    circle" and "a blue square"), else to the mean of the experts' embeddings.
    Returns the blended output of the heads, shaped like ``sample``.
    """
    n = len(unets)
    for u in unets:
        if any(getattr(block, "s1", None) for block in u.up_blocks):
            raise ValueError(
                "FreeU is enabled on an expert; disable it to aggregate (disable_freeu)"
            )
    if len(encoder_hidden_states) != n:
        raise ValueError(f"{n} U-Nets but {len(encoder_hidden_states)} encoder_hidden_states")
    added = list(added_cond_kwargs) if added_cond_kwargs is not None else [None] * n
    first = unets[0]
    if first.config.center_input_sample:
        sample = 2 * sample - 1.0
    texts = [
        u.process_encoder_hidden_states(encoder_hidden_states=e, added_cond_kwargs=a)
        for u, e, a in zip(unets, encoder_hidden_states, added, strict=True)
    ]
    embs = [
        time_embedding(u, sample, timestep, e, a)
        for u, e, a in zip(unets, encoder_hidden_states, added, strict=True)
    ]
    context = Context(
        temb=torch.stack(embs).mean(0),
        text=torch.stack(texts).mean(0) if aggregator_text is None else aggregator_text,
    )
    up_factor = 2**first.num_upsamplers
    forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])
    index = 0

    def blend(features: list[torch.Tensor]) -> torch.Tensor:
        nonlocal index
        out = combine(index, features, context)
        index += 1
        return out

    h = blend([u.conv_in(sample) for u in unets])
    skips = [h]
    for b, block in enumerate(first.down_blocks):
        blocks = [u.down_blocks[b] for u in unets]
        for j in range(len(block.resnets)):
            features = []
            for blk, emb, text in zip(blocks, embs, texts, strict=True):
                x = blk.resnets[j](h, emb)
                if getattr(blk, "attentions", None):
                    x = _attend(blk.attentions[j], x, text, cross_attention_kwargs)
                features.append(x)
            h = blend(features)
            skips.append(h)
        if block.downsamplers is not None:
            h = blend([blk.downsamplers[0](h) for blk in blocks])
            skips.append(h)

    features = []
    for u, emb, text in zip(unets, embs, texts, strict=True):
        if getattr(u.mid_block, "has_cross_attention", False):
            features.append(
                u.mid_block(
                    h,
                    emb,
                    encoder_hidden_states=text,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            )
        else:
            features.append(u.mid_block(h, emb))
    h = blend(features)

    upsample_size = None
    for b, block in enumerate(first.up_blocks):
        blocks = [u.up_blocks[b] for u in unets]
        is_final = b == len(first.up_blocks) - 1
        for j in range(len(block.resnets)):
            x_in = torch.cat([h, skips.pop()], dim=1)
            features = []
            for blk, emb, text in zip(blocks, embs, texts, strict=True):
                x = blk.resnets[j](x_in, emb)
                if getattr(blk, "attentions", None):
                    x = _attend(blk.attentions[j], x, text, cross_attention_kwargs)
                features.append(x)
            h = blend(features)
        if block.upsamplers is not None:
            if not is_final and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            h = blend([blk.upsamplers[0](h, upsample_size) for blk in blocks])

    heads = []
    for u in unets:
        x = h
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        heads.append(u.conv_out(x))
    return blend(heads)
