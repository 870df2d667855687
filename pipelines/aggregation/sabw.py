r"""The Spatial-Aware Block-Wise aggregator (SABW) of AFA, one small network per aggregation point.

Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation", ICLR 2025, §3.3:
at a point with expert features F₁…F_N (B, C, H, W),

    h = Conv1×1([F₁, …, F_N])                    (plus, optionally, two coordinate channels)
    h = ResnetBlock2D(h, mean time embedding)
    h = Transformer2DModel(h, cross-attention to the mean prompt embedding)
    w = softmax_i(Conv1×1_zero(h))              per pixel, over the N experts
    F = Σᵢ wᵢ ⊙ Fᵢ

The last convolution starts at zero, so an untrained aggregator gives wᵢ = 1/N exactly: uniform
feature averaging, the baseline AFA improves on. diffusers' own ``ResnetBlock2D`` and
``Transformer2DModel`` are used as they are.

Our one addition is ``position_channels``: the paper's Transformer2D has no positional encoding,
so at coarse points an aggregator cannot tell the left of the frame from the right except through
the convolutions' zero padding. With 2, the normalised (x, y) of every pixel is concatenated to
the features before the first convolution. 0 is the paper's architecture.

An ``Aggregator`` folder (``save_pretrained``: ``config.json`` + the weights as safetensors)
stores its configuration and the ordered fingerprints of the experts it was trained for; loading it
for other experts is refused (``check_experts``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from pipelines.aggregation.walker import Context, points

FINGERPRINT_VALUES = 4096


def unet_fingerprint(unet: UNet2DConditionModel) -> str:
    """A short hash of a U-Net's weights that does not depend on device or fp32/fp16 storage.

    sha256 over every parameter's name, shape and first ``FINGERPRINT_VALUES`` values rounded to
    fp16 (a fine-tune changes every tensor, so this tells checkpoints apart without reading
    gigabytes). LoRA layers are left out: the fingerprint is the base model's.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        values = tensor.detach().flatten()[:FINGERPRINT_VALUES].to("cpu", torch.float16)
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def coordinates(like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): x and y of every pixel centre, each running from −1 to 1 across the frame."""
    b, _, h, w = like.shape
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    return grid.unsqueeze(0).expand(b, -1, -1, -1)


class SABW(nn.Module):
    """One point's aggregator: N feature maps of ``channels`` channels → per-pixel weights."""

    def __init__(
        self,
        channels: int,
        num_experts: int,
        temb_dim: int,
        text_dim: int,
        width: int,
        heads: int,
        depth: int,
        groups: int,
        position_channels: int,
    ):
        super().__init__()
        self.position_channels = position_channels
        self.proj_in = nn.Conv2d(num_experts * channels + position_channels, width, 1)
        self.resnet = ResnetBlock2D(
            in_channels=width, out_channels=width, temb_channels=temb_dim, groups=groups
        )
        self.transformer = Transformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=width,
            num_layers=depth,
            norm_num_groups=groups,
            cross_attention_dim=text_dim,
        )
        self.proj_out = nn.Conv2d(width, num_experts, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def weights(self, features: Sequence[torch.Tensor], context: Context) -> torch.Tensor:
        """(B, N, H, W) softmax weights over the experts."""
        x = torch.cat(list(features), dim=1)
        if self.position_channels:
            x = torch.cat([x, coordinates(x)], dim=1)
        h = self.proj_in(x)
        h = self.resnet(h, context.temb.to(h.dtype))
        h = self.transformer(h, encoder_hidden_states=context.text.to(h.dtype), return_dict=False)[
            0
        ]
        return self.proj_out(h).softmax(dim=1)


def blend(features: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ ⊙ Fᵢ with per-pixel weights (B, N, H, W)."""
    return sum(weights[:, i : i + 1] * f for i, f in enumerate(features))


class Aggregator(ModelMixin, ConfigMixin):
    """One ``SABW`` per aggregation point of the experts' U-Net architecture.

    Build it for given experts with ``Aggregator.for_unets``; ``save_pretrained`` /
    ``from_pretrained`` as for any diffusers model.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        point_names: Sequence[str] = (),
        point_channels: Sequence[int] = (),
        num_experts: int = 2,
        temb_dim: int = 1280,
        text_dim: int = 768,
        width: int = 64,
        heads: int = 4,
        depth: int = 1,
        groups: int = 32,
        position_channels: int = 0,
        expert_fingerprints: Sequence[str] = (),
        expert_names: Sequence[str] = (),
    ):
        super().__init__()
        if len(point_names) != len(point_channels):
            raise ValueError("point_names and point_channels must have the same length")
        if width % heads or width % groups:
            raise ValueError(
                f"width {width} must be a multiple of heads {heads} and groups {groups}"
            )
        self.points = nn.ModuleList(
            SABW(
                channels,
                num_experts,
                temb_dim,
                text_dim,
                width,
                heads,
                depth,
                groups,
                position_channels,
            )
            for channels in point_channels
        )

    @classmethod
    def for_unets(
        cls,
        unets: Sequence[UNet2DConditionModel],
        names: Sequence[str] | None = None,
        **config,
    ) -> Aggregator:
        """A fresh (uniform-averaging) aggregator bound to these experts, in this order."""
        walk_points = points(unets[0])
        return cls(
            point_names=[p.name for p in walk_points],
            point_channels=[p.channels for p in walk_points],
            num_experts=len(unets),
            temb_dim=unets[0].time_embedding.linear_2.out_features,
            text_dim=unets[0].config.cross_attention_dim,
            expert_fingerprints=[unet_fingerprint(u) for u in unets],
            expert_names=list(names or [f"expert {i}" for i in range(len(unets))]),
            **config,
        )

    def check_experts(
        self, unets: Sequence[UNet2DConditionModel], names: Sequence[str] | None = None
    ) -> None:
        """Refuse experts other than those this aggregator was trained for, in the same order."""
        names = list(names or [f"expert {i}" for i in range(len(unets))])
        trained_for = list(self.config.expert_names) or list(self.config.expert_fingerprints)
        if len(unets) != self.config.num_experts:
            raise ValueError(
                f"this aggregator blends {self.config.num_experts} experts "
                f"({', '.join(trained_for)}), not {len(unets)}"
            )
        expected = list(self.config.expert_fingerprints)
        for i, (unet, name) in enumerate(zip(unets, names, strict=True)):
            got = unet_fingerprint(unet)
            if expected and got != expected[i]:
                raise ValueError(
                    f"this aggregator was trained for {', '.join(trained_for)} in that order; "
                    f"expert {i + 1} ({name}, fingerprint {got}) is not {trained_for[i]} "
                    f"(fingerprint {expected[i]})"
                )
        walk_points = points(unets[0])
        if [p.channels for p in walk_points] != list(self.config.point_channels):
            raise ValueError("the experts' U-Net architecture differs from the aggregator's")

    def combine(
        self,
        index: int,
        features: Sequence[torch.Tensor],
        context: Context,
        maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Blend the features at point ``index``; append the weights to ``maps`` if given."""
        weights = self.points[index].weights(features, context)
        if maps is not None:
            maps.append(weights.detach())
        return blend(features, weights)


def uniform_combine(
    index: int,
    features: Sequence[torch.Tensor],
    context: Context,
    maps: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Uniform feature averaging: what an untrained aggregator does, without its weights."""
    if maps is not None:
        f = features[0]
        maps.append(f.new_full((f.shape[0], len(features), *f.shape[2:]), 1.0 / len(features)))
    return sum(features) / len(features)
