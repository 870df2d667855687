"""A LoRA file → the adapter diffusers' ``load_lora_weights`` loads into one pipeline.

Every local file is read by ``checkpoints.lora_files.read_lora`` (the reader merges and exports
use) and placed on the pipeline's weights first, so a file for another architecture, with a
non-finite value or with a layer of the wrong shape is refused in one sentence before anything
is loaded. Then:

- diffusers' and PEFT's own layouts are loaded from the file by diffusers, as they are;
- kohya and LyCORIS files (LoRA, LoCon, LoHa, LoKr, Tucker cores, DoRA) are loaded as the PEFT
  LoRA whose B·A is exactly each layer's ΔW (``lora_formats``). diffusers reads kohya's plain
  LoRA and LoCon itself but not LoHa, LoKr, Tucker cores or lycoris' DoRA ("The following keys
  have not been correctly renamed"), and its pipeline adapter API builds LoRA configs only (PEFT's
  LoHa/LoKr tuners beside LoRA adapters in one model need PEFT's mixed model, which diffusers
  does not use); one exact translation for every kohya/LyCORIS layer keeps what a file means the
  same in generation, merges and exports, and leaves switching, strengths and unloading to
  diffusers and PEFT (``set_adapters``, ``delete_adapters``). The price: a LoHa of dimension r
  is a LoRA of rank r² (at most the weight's smaller side, then the full ΔW), so a high-dimension
  LoHa or LoKr adapter can hold as much memory as the weights it changes.

A DoRA layer's change depends on the weight it rescales and, in lycoris, non-linearly on the
strength, so such a file is loaded as the full change at one strength (adapter weight 1), one
adapter per strength used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from composer.checkpoints.lora_files import LoraPair, is_native, read_lora_cached
from composer.checkpoints.lora_formats import place
from composer.checkpoints.names import lora_name

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Adapter:
    """What to load (a file path or a PEFT state dict), at which adapter weight, cached under
    ``key``."""

    source: str | dict
    weight: float
    key: str


def adapter_for(pipe, path: str, strength: float) -> Adapter:
    """The adapter that applies LoRA file ``path`` at ``strength`` to ``pipe``; a Hub id is
    left to diffusers. A file that cannot be applied is a ``ValueError`` whose message starts
    with ``path``."""
    if not Path(path).is_file():
        return Adapter(path, strength, path)
    weights = _weights(pipe)
    shapes = {name: tuple(w.shape) for name, (_, _, w) in weights.items()}
    try:
        placed = place(read_lora_cached(path), shapes, dict(pipe.unet.config))
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: {e}") from None
    if is_native(path):
        return Adapter(path, strength, path)
    dora = any(p.magnitude is not None for p in placed.values())
    state = {}
    for name, pair in placed.items():
        component, module, weight = weights[name]
        up, down = _factors(pair, weight, strength if dora else 1.0)
        state[f"{component}.{module}.lora_A.weight"] = (
            down.reshape(down.shape[0], *weight.shape[1:]).to(weight.dtype).contiguous()
        )
        state[f"{component}.{module}.lora_B.weight"] = (
            up.reshape(weight.shape[0], -1, *[1] * (weight.dim() - 2)).to(weight.dtype).contiguous()
        )
    if dora:
        return Adapter(state, 1.0, f"{path}@{strength!r}")
    return Adapter(state, strength, path)


def _factors(pair: LoraPair, weight: torch.Tensor, strength: float):
    """(B, A) with B·A = the layer's change at ``strength`` (scale folded into B)."""
    if pair.magnitude is None:
        return pair.up.float() * (pair.scale * strength), pair.down.float()
    change = pair.change(weight.float().cpu(), strength).reshape(weight.shape[0], -1)
    rows, cols = change.shape
    if rows <= cols:
        return torch.eye(rows), change
    return change, torch.eye(cols)


def _weights(pipe) -> dict[str, tuple[str, str, torch.Tensor]]:
    """The weights a LoRA may change, by ``names.lora_name``: (component, module path, W)
    without any adapter already loaded (PEFT keeps W as ``….base_layer.weight``)."""
    out = {}
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if ".lora_" in key or "lora_magnitude_vector" in key or not key.endswith(".weight"):
                continue
            key = key.replace(".base_layer.", ".")
            out[lora_name(component, key)] = (component, key[: -len(".weight")], tensor)
    return out
