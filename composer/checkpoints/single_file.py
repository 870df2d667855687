"""Single-file checkpoints as users download them (SD 1.x with or without EMA, pruned; SD 2.x;
SDXL; fp32, fp16, bf16 or float8 tensors, which diffusers upcasts to the pipeline's dtype as it
loads them): which architecture a file holds, whose configs read it, and whether it predicts
ε or v.

SD 2.x files do not say whether they predict v (768-v) or ε (512-base), and the configs a file is
read with name one of the two. As AUTOMATIC1111 does (``is_using_v_parameterization_for_sd2``),
the loaded U-Net is asked once: at t = 999 on a constant input, an ε-model returns about the
input, a v-model about its negative (mean of output − input below −1). A file that carries a
``v_pred`` tensor (the v-prediction SDXL models' marker, which ComfyUI reads) predicts v.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from composer.checkpoints import validate
from composer.checkpoints.ldm_format import CONFIG_KEY

XL_MARKER = "conditioner.embedders.1"
V_MARKER = "v_pred"


def is_sdxl(keys) -> bool:
    return any(k.startswith(XL_MARKER) for k in keys)


def config_folder(location: str, models: dict[str, Path]) -> str | None:
    """The diffusers folder whose configs single file ``location`` is read with, offline.

    In order: the folder or bundled model (``models``) named in the file's ``__metadata__``
    (our exports write it), then ``COMPOSER_SINGLE_FILE_CONFIG``; ``None`` lets diffusers fetch
    the standard configs for the detected architecture from the Hub, which needs a network.
    """
    if location.endswith(".safetensors"):
        with safe_open(location, framework="pt") as f:
            named = (f.metadata() or {}).get(CONFIG_KEY)
        if named in models:
            return str(models[named])
        if named and (Path(named) / "model_index.json").is_file():
            return named
    return os.environ.get("COMPOSER_SINGLE_FILE_CONFIG") or None


def check_shapes(location: str, config: str) -> None:
    """The file's header sound and its U-Net of the shapes the configs in folder ``config``
    need (``validate``): what names the bad tensor when diffusers could not load the file."""
    unet_config = json.loads((Path(config) / "unet" / "config.json").read_text())
    validate.check_unet_shapes(location, validate.check_header(location), unet_config)


@torch.no_grad()
def prediction(pipe, keys) -> str | None:
    """``v_prediction`` or ``epsilon`` where the file tells (module docstring); None where it
    does not (SD 1.x and SDXL files: their configs say)."""
    if V_MARKER in keys:
        return "v_prediction"
    unet = pipe.unet
    if unet.config.get("cross_attention_dim") != 1024 or unet.config.get("addition_embed_type"):
        return None
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    cond = torch.full((1, 2, 1024), 0.5, device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([999], device=param.device), cond).sample
    return "v_prediction" if float((out.float() - x.float()).mean()) < -1 else "epsilon"


def set_prediction(pipe, location: str) -> None:
    """Give ``pipe``'s scheduler the prediction type its U-Net was trained for, where the file
    ``location`` tells."""
    with safe_open(location, framework="pt") as f:
        keys = set(f.keys())
    wanted = prediction(pipe, keys)
    if wanted and pipe.scheduler.config.get("prediction_type") != wanted:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=wanted
        )
