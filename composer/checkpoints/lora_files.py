r"""LoRA files: one module's layer as a ``LoraPair`` (A, B and the scale α/r), read from the
layouts users have and written in the one diffusers loads.

kohya and LyCORIS files (LoRA, LoCon, LoHa, LoKr; ``lora_formats``) are read here, diffusers' and
PEFT's with diffusers' ``lora_state_dict``; every tensor is checked finite and upcast to fp32.
Files are written in the PEFT layout diffusers' ``load_lora_weights`` reads, with the scale folded
into B (α = r).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass
class LoraPair:
    """One module's LoRA: ``down`` (A) and ``up`` (B) with their scale α/r folded in ``scale``;
    ``magnitude``, a DoRA layer's m (LyCORIS ``dora_scale``; PEFT ``lora_magnitude_vector`` with
    ``peft_dora``), rescales W + ΔW to it (``change``)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    magnitude: torch.Tensor | None = None
    peft_dora: bool = False

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

    def change(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """W' − W for this layer at ``strength`` on weight W (fp32, W's shape).

        Plain: s·ΔW. DoRA as lycoris' forward: W' = (W + ΔW)·(s·(m/‖W + ΔW‖ − 1) + 1) (the norm
        plus fp32 eps, per output row, or per input column when m is shaped (1, in, …)); as
        PEFT's: W' = m·(W + s·ΔW)/‖W + s·ΔW‖ per output row."""
        weight = weight.float()
        if self.magnitude is None:
            return self.delta(strength).reshape(weight.shape)
        m = self.magnitude.to(weight.device).float()
        inside = strength if self.peft_dora else 1.0
        new = weight + self.delta(inside).to(weight.device).reshape(weight.shape)
        per_input = m.dim() >= 2 and m.shape[0] == 1 and m.numel() == weight.shape[1] > 1
        if per_input:
            flat = new.transpose(0, 1).reshape(weight.shape[1], -1)
            norm = flat.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))
        else:
            norm = new.reshape(weight.shape[0], -1).norm(dim=1)
            norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        if self.peft_dora:
            return new * (m.reshape(norm.shape) / norm) - weight
        scale = m.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
        if strength != 1:
            scale = strength * (scale - 1) + 1
        return new * scale - weight


def read_lora(path: str) -> dict[str, LoraPair]:
    """A LoRA file (kohya, LyCORIS, PEFT or diffusers layout, ``.safetensors``) → module name as
    the file spells it (dotted with its ``unet.``/``text_encoder.`` prefix, or kohya's
    ``lora_unet_…``; ``lora_formats.place`` puts them on a model's weights) → ``LoraPair``.
    A non-finite value, integer weights, an empty file or an unknown tensor is a ``ValueError``
    naming both."""
    from composer.checkpoints import lora_formats
    from composer.checkpoints.validate import first_non_finite

    raw = _load(path)
    if not raw:
        raise ValueError(f"{path}: no LoRA weights found (the file holds no tensors)")
    bad = first_non_finite(raw.items())
    if bad:
        raise ValueError(f"{path}: tensor {bad} holds a non-finite value (NaN or infinity)")
    for key, tensor in raw.items():
        if not tensor.is_floating_point() and not key.endswith(".alpha"):
            raise ValueError(f"{path}: tensor {key} is {tensor.dtype}; LoRA weights are floats")
    if lora_formats.is_kohya(raw):
        return lora_formats.read_layers(raw, path)
    return _read_diffusers(path)


def is_native(path: str) -> bool:
    """Whether diffusers' own loader reads ``path`` as it is (its and PEFT's layouts)."""
    from safetensors import safe_open

    from composer.checkpoints import lora_formats

    if not path.endswith(".safetensors"):  # a pickle, where allowed
        return not lora_formats.is_kohya(_load(path))
    with safe_open(path, framework="pt") as f:
        return not lora_formats.is_kohya(f.keys())


def _load(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.endswith(".safetensors"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return load_file(path)


def _read_diffusers(path: str) -> dict[str, LoraPair]:
    from diffusers import StableDiffusionPipeline

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        path, return_lora_metadata=True
    )
    state = {k: v.float() for k, v in state.items()}
    pairs = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = state.get(module + ".lora_B.weight")
        if up is None:
            raise ValueError(f"{path}: {module} has lora_A but no lora_B")
        magnitude = state.get(module + ".lora_magnitude_vector.weight")
        magnitude = state.get(module + ".lora_magnitude_vector", magnitude)
        scale = lora_scale(module, down.shape[0], alphas, metadata)
        pairs[module] = LoraPair(down, up, scale, magnitude, peft_dora=magnitude is not None)
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
    ``pipe.load_lora_weights`` reads, modules named kohya's way in kohya's layout; ranks may
    differ between modules."""
    from safetensors.torch import save_file

    state = {}
    for module, p in pairs.items():
        up = (p.up.float() * p.scale).to(dtype).contiguous()
        if module.startswith("lora_"):  # kohya's names: kohya's layout, α = r
            state[f"{module}.lora_down.weight"] = p.down.to(dtype).contiguous()
            state[f"{module}.lora_up.weight"] = up
            state[f"{module}.alpha"] = torch.tensor(float(p.rank), dtype=dtype)
            continue
        state[f"{module}.lora_A.weight"] = p.down.to(dtype).contiguous()
        state[f"{module}.lora_B.weight"] = up
    save_file(state, path, metadata={"format": "pt", **(metadata or {})})


@lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int]) -> dict[str, LoraPair]:
    return read_lora(path)


def read_lora_cached(path: str) -> dict[str, LoraPair]:
    """``read_lora`` kept for the few LoRAs used last (keyed by path, size and mtime), so that a
    live re-merge with other merge settings does not read its LoRA files again."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return _read_cached(path, (stat.st_size, stat.st_mtime_ns) if stat else (0, 0))
