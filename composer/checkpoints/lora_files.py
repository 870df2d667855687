r"""LoRA files: one module's layer as a ``LoraPair`` (A, B and the scale α/r), read from the
layouts users have and written in the one diffusers loads.

Files are read with diffusers' ``lora_state_dict`` (kohya, PEFT and diffusers layouts) and written
in the PEFT layout diffusers' ``load_lora_weights`` reads, with the scale folded into B (α = r).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass
class LoraPair:
    """One module's LoRA: ``down`` (A) and ``up`` (B) with their scale α/r folded in ``scale``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ΔW (and of the weight it changes)."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """ΔW = s·scale·B·A, in the module weight's shape (a conv's kernel dims come from A)."""
        up = self.up.reshape(self.up.shape[0], -1).float()
        down = self.down.reshape(self.rank, -1).float()
        dw = strength * self.scale * (up @ down)
        return dw.reshape(self.up.shape[0], *self.down.shape[1:])


def read_lora(path: str) -> dict[str, LoraPair]:
    """A LoRA file (kohya, PEFT or diffusers layout, ``.safetensors``) → module name (with its
    ``unet.``/``text_encoder.`` prefix) → ``LoraPair`` with the scale diffusers loads it with
    (``lora_scale``)."""
    from diffusers import StableDiffusionPipeline

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        path, return_lora_metadata=True
    )
    if any("lora_magnitude_vector" in k for k in state):
        raise ValueError(f"{path}: DoRA (a magnitude vector per layer) is not a plain LoRA")
    pairs = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = state.get(module + ".lora_B.weight")
        if up is None:
            raise ValueError(f"{path}: {module} has lora_A but no lora_B")
        pairs[module] = LoraPair(down, up, lora_scale(module, down.shape[0], alphas, metadata))
    if not pairs:
        raise ValueError(f"{path}: no LoRA weights found")
    return pairs


def lora_scale(module: str, rank: int, alphas: dict | None, metadata: dict | None) -> float:
    """α/r for one module, as diffusers and PEFT apply it: from the PEFT config a file carries
    (``lora_alpha``, per-module ``alpha_pattern`` matched as PEFT matches it, α/√r with
    ``use_rslora``), else from kohya's per-module ``alpha``, else α = r (scale 1, the diffusers
    convention for files without alphas)."""
    from peft.utils.other import get_pattern_key

    component, _, inner = module.partition(".")
    if metadata and f"{component}.lora_alpha" in metadata:
        pattern = metadata.get(f"{component}.alpha_pattern") or {}
        alpha = pattern.get(get_pattern_key(pattern, inner), metadata[f"{component}.lora_alpha"])
        root = metadata.get(f"{component}.use_rslora")
        return float(alpha) / (math.sqrt(rank) if root else rank)
    alpha = (alphas or {}).get(module + ".alpha")
    return float(alpha) / rank if alpha is not None else 1.0


def write_lora(
    path: str,
    pairs: dict[str, LoraPair],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``pairs`` in the PEFT layout (scale folded into B, so α = r) that
    ``pipe.load_lora_weights`` reads; ranks may differ between modules."""
    from safetensors.torch import save_file

    state = {}
    for module, p in pairs.items():
        state[f"{module}.lora_A.weight"] = p.down.to(dtype).contiguous()
        state[f"{module}.lora_B.weight"] = (p.up.float() * p.scale).to(dtype).contiguous()
    save_file(state, path, metadata={"format": "pt", **(metadata or {})})


@lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int]) -> dict[str, LoraPair]:
    return read_lora(path)


def read_lora_cached(path: str) -> dict[str, LoraPair]:
    """``read_lora`` kept for the few LoRAs used last (keyed by path, size and mtime), so that a
    live re-merge with other merge settings does not read its LoRA files again."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return _read_cached(path, (stat.st_size, stat.st_mtime_ns) if stat else (0, 0))
