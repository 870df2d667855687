"""diffusers weights → the original Stable Diffusion ("LDM") single-file layout.

AUTOMATIC1111, ComfyUI and Civitai pass checkpoints around as one ``.safetensors`` file in the
layout of the original CompVis / Stability code
(``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``); diffusers reads such files with
``from_single_file`` but has no writer. This module is the inverse of diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint``
/ ``convert_open_clip_checkpoint`` (``diffusers/loaders/single_file_utils.py``) for SD 1.x-style
pipelines (one CLIP text encoder under ``cond_stage_model.transformer.``) and SDXL (CLIP under
``conditioner.embedders.0.transformer.``, OpenCLIP under ``conditioner.embedders.1.model.``),
derived from the configs rather than a fixed table, so it also serves the toy zoo's 3-level
U-Net. ``tests/test_ldm_format.py`` checks that diffusers' own reader gives back every tensor.

Most tensors keep their values under a new name. Three do not: the VAE's mid-block attention
projections are Linear in diffusers and 1×1 convolutions in LDM (``conv``); OpenCLIP stores each
layer's q, k and v projections as one ``in_proj`` tensor, [W_q; W_k; W_v] (``qkv``); and its
``text_projection`` is the transpose of diffusers' ``text_projection.weight`` (``t``). A layout is
therefore a list of ``Entry(name, sources, op)``, written one entry at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from safetensors.torch import save_file

CONFIG_KEY = "composer_config"
"""``__metadata__`` key naming the diffusers folder (or bundled model) whose configs and
tokenizer the file needs; ``composer.registry`` passes it to ``from_single_file(config=…)``."""
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
XL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
XL_TEXT_2_PREFIX = "conditioner.embedders.1.model."


class Entry(NamedTuple):
    """One tensor of the single-file layout: its ``name`` there, the diffusers parameter names of
    one component that it is made of, and ``op`` (``copy``, ``conv``, ``qkv`` or ``t``)."""

    name: str
    sources: tuple[str, ...]
    op: str = "copy"


def assemble(op: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """An entry's tensor from its sources' tensors."""
    if op == "qkv":
        return torch.cat(list(tensors), dim=0)
    (value,) = tensors
    if op == "t":
        return value.T.contiguous()
    if op == "conv" and value.ndim == 2:
        return value[:, :, None, None]
    return value


def assembled_shape(op: str, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """``assemble``'s output shape, known before any tensor is read."""
    if op == "qkv":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    (shape,) = shapes
    if op == "t":
        return tuple(reversed(shape))
    if op == "conv" and len(shape) == 2:
        return (*shape, 1, 1)
    return tuple(shape)


def clip_inner(name: str) -> str:
    """A CLIP text-encoder parameter name as the file layouts (and LoRA files) spell it:
    transformers ≥ 5.6 flattened ``CLIPTextModel`` (``encoder.layers.0…``), the layouts keep
    ``text_model.``; ``CLIPTextModelWithProjection`` still nests, and its ``text_projection``
    sits outside ``text_model``."""
    if name.startswith(("text_model.", "text_projection.")):
        return name
    return "text_model." + name


_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def unet_prefix_map(config: dict) -> dict[str, str]:
    """diffusers module prefix → LDM module prefix for a ``UNet2DConditionModel`` config."""
    per = config["layers_per_block"]
    per = per if isinstance(per, int) else per[0]
    downs, ups = config["down_block_types"], config["up_block_types"]
    out = dict(_UNET_FIXED)
    for i, kind in enumerate(downs):
        for j in range(per):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(per + 1) * i + j + 1}.0"
            if "CrossAttn" in kind:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(per + 1) * i + j + 1}.1"
        if i < len(downs) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(per + 1) * (i + 1)}.0.op"
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    for i, kind in enumerate(ups):
        has_attention = "CrossAttn" in kind
        for j in range(per + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(per + 1) * i + j}.0"
            if has_attention:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(per + 1) * i + j}.1"
        if i < len(ups) - 1:
            out[f"up_blocks.{i}.upsamplers.0"] = (
                f"output_blocks.{(per + 1) * i + per}.{2 if has_attention else 1}"
            )
    return out


def _map_key(key: str, prefixes: dict[str, str]) -> str:
    """Replace the longest matching module prefix of ``key``; resnet parts are renamed too."""
    best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"no LDM name for {key!r}")
    rest = key[len(best) :]
    if ".resnets." in best:
        for new, old in _RESNET:
            rest = rest.replace(f".{new}.", f".{old}.")
    return prefixes[best] + rest


def unet_name_map(config: dict) -> dict[str, str]:
    """Every parameter of the U-Net that ``config`` describes: diffusers name → LDM name (without
    ``UNET_PREFIX``). Built on the meta device: no memory, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    prefixes = unet_prefix_map(config)
    return {k: _map_key(k, prefixes) for k in unet.state_dict()}


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefix_map(config)
    return {UNET_PREFIX + _map_key(k, prefixes): v for k, v in state.items()}


def vae_layout(names: Iterable[str], config: dict) -> list[Entry]:
    """The VAE's parameters (diffusers names) in the LDM layout, under ``VAE_PREFIX``."""
    n = len(config["up_block_types"])
    prefixes = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}"] = f"{part}.mid.block_{k + 1}"
    for i in range(len(config["down_block_types"])):
        prefixes[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
    for i in range(n):
        prefixes[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{n - 1 - i}.block"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    attention = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out = []
    for key in names:
        best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
        new = key if best is None else prefixes[best] + key[len(best) :]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        op = "copy"
        if ".mid.attn_1." in new:
            module, _, leaf = new.rpartition(".")
            head, _, name = module.partition(".mid.attn_1.")
            new, op = f"{head}.mid.attn_1.{attention[name]}.{leaf}", "conv"
        out.append(Entry(VAE_PREFIX + new, (key,), op))
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return {
        e.name: assemble(e.op, [state[s] for s in e.sources]) for e in vae_layout(state, config)
    }


_OPEN_CLIP_FIXED = {
    "text_model.embeddings.position_embedding.weight": ("positional_embedding", "copy"),
    "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", "copy"),
    "text_model.final_layer_norm.weight": ("ln_final.weight", "copy"),
    "text_model.final_layer_norm.bias": ("ln_final.bias", "copy"),
    "text_projection.weight": ("text_projection", "t"),
}
_OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


def text_layout(names: Iterable[str], prefix: str, open_clip: bool = False) -> list[Entry]:
    """A CLIP text encoder's parameters in the single-file layout under ``prefix``: the
    transformers layout as it is (SD 1.x, SDXL's first encoder), or OpenCLIP's (SDXL's second,
    ``open_clip``), whose layers fuse q, k and v into ``attn.in_proj_weight``/``_bias``."""
    by_inner = {clip_inner(k): k for k in names}
    if not open_clip:
        return [Entry(prefix + inner, (key,)) for inner, key in by_inner.items()]
    out = []
    for inner, key in by_inner.items():
        if inner.endswith(".position_ids"):
            continue  # a buffer older transformers saved; OpenCLIP has none
        if inner in _OPEN_CLIP_FIXED:
            name, op = _OPEN_CLIP_FIXED[inner]
            out.append(Entry(prefix + name, (key,), op))
            continue
        layer, _, rest = inner.removeprefix("text_model.encoder.layers.").partition(".")
        if rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue  # fused with q below
        if rest.startswith("self_attn.q_proj."):
            leaf = rest.rpartition(".")[2]
            parts = tuple(
                by_inner[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{leaf}"]
                for p in "qkv"
            )
            out.append(
                Entry(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}", parts, "qkv")
            )
            continue
        for new, old in _OPEN_CLIP_LAYER:
            if rest.startswith(new + "."):
                rest = old + rest[len(new) :]
                break
        else:
            raise KeyError(f"no OpenCLIP name for {inner!r}")
        out.append(Entry(f"{prefix}transformer.resblocks.{layer}.{rest}", (key,)))
    return out


def open_clip_sources(name: str) -> tuple[tuple[str, ...], str] | None:
    """``text_layout``'s inverse for one OpenCLIP tensor (``name`` without the prefix): the
    transformers-layout names it is made of (``clip_inner`` spelling) and the op that made it,
    or None for a tensor that is not a text-encoder parameter (``logit_scale``, an attention
    mask). ``disassemble`` takes source j back out of the tensor."""
    fixed = {ldm: (inner, op) for inner, (ldm, op) in _OPEN_CLIP_FIXED.items()}
    if name in fixed:
        inner, op = fixed[name]
        return (inner,), op
    head, dot, rest = name.removeprefix("transformer.resblocks.").partition(".")
    if not (name.startswith("transformer.resblocks.") and head.isdigit() and dot):
        return None
    layer = f"text_model.encoder.layers.{head}."
    if rest.startswith("attn.in_proj_"):
        leaf = rest.removeprefix("attn.in_proj_")
        return tuple(f"{layer}self_attn.{p}_proj.{leaf}" for p in "qkv"), "qkv"
    for new, old in _OPEN_CLIP_LAYER:
        if rest.startswith(old + "."):
            return (layer + new + rest[len(old) :],), "copy"
    return None


def disassemble(op: str, value: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Source ``index`` of ``count`` back out of a tensor that ``assemble(op, …)`` made."""
    if op == "qkv":
        return value.chunk(count, dim=0)[index]
    if op == "t":
        return value.T.contiguous()
    return value


def text_prefixes(xl: bool) -> dict[str, tuple[str, bool]]:
    """The text encoders of a pipeline → (prefix, OpenCLIP layout?) in its single-file layout."""
    if xl:
        return {"text_encoder": (XL_TEXT_PREFIX, False), "text_encoder_2": (XL_TEXT_2_PREFIX, True)}
    return {"text_encoder": (TEXT_PREFIX, False)}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """All weights of an SD 1.x-style or SDXL pipeline in the single-file layout, on the CPU."""
    state = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    xl = getattr(pipe, "text_encoder_2", None) is not None
    for component, (prefix, open_clip) in text_prefixes(xl).items():
        weights = getattr(pipe, component).state_dict()
        for entry in text_layout(weights, prefix, open_clip):
            state[entry.name] = assemble(entry.op, [weights[k] for k in entry.sources])
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_single_file(pipe, path, config: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``pipe`` as one LDM-layout ``.safetensors`` file that names its ``config`` folder."""
    save_file(pipeline_to_ldm(pipe), str(path), metadata={**(metadata or {}), CONFIG_KEY: config})
