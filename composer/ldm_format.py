"""diffusers weights → the original Stable Diffusion ("LDM") single-file layout.

AUTOMATIC1111, ComfyUI and Civitai pass checkpoints around as one ``.safetensors`` file in the
layout of the original CompVis code (``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``);
diffusers reads such files with ``from_single_file`` but has no writer. This module is the inverse
of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
``convert_ldm_clip_checkpoint`` (``diffusers/loaders/single_file_utils.py``) for SD 1.x-style
pipelines (one CLIP text encoder), derived from the U-Net config rather than a fixed table, so it
also serves the toy zoo's 3-level U-Net. ``tests/test_ldm_format.py`` checks that diffusers'
own reader gives back every tensor.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

CONFIG_KEY = "composer_config"
"""``__metadata__`` key naming the diffusers folder (or bundled model) whose configs and
tokenizer the file needs; ``composer.registry`` passes it to ``from_single_file(config=…)``."""
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

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


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
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
    out = {}
    for key, value in state.items():
        best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
        new = key if best is None else prefixes[best] + key[len(best) :]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            module, _, leaf = new.rpartition(".")
            head, _, name = module.partition(".mid.attn_1.")
            new = f"{head}.mid.attn_1.{attention[name]}.{leaf}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """All weights of an SD 1.x-style pipeline in the single-file layout, on the CPU."""
    state = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers ≥ 5.6 flattened CLIPTextModel; the file layout keeps ``text_model.``.
        inner = key if key.startswith("text_model.") else "text_model." + key
        state[TEXT_PREFIX + inner] = value
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_single_file(pipe, path, config: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``pipe`` as one LDM-layout ``.safetensors`` file that names its ``config`` folder."""
    save_file(pipeline_to_ldm(pipe), str(path), metadata={**(metadata or {}), CONFIG_KEY: config})
