r"""LoRA arithmetic: exact sums by concatenation, rank reduction by SVD, TIES/DARE on ΔW,
extraction of a LoRA from two checkpoints, and baking LoRAs into a model's weights.

A LoRA on a module with weight W (out × in, or out × in × kh × kw for a conv) is a pair
A (r × in[·kh·kw]) and B (out × r) with scale α/r: applied at strength s it adds

    ΔW = s · (α/r) · B · A.

Sum of LoRAs, exactly: Σᵢ sᵢ(αᵢ/rᵢ)·Bᵢ·Aᵢ = [c₁B₁ … c_nB_n] · [A₁; …; A_n] with cᵢ = sᵢαᵢ/rᵢ, one
LoRA of rank Σrᵢ with α = r (scale 1). At a fixed smaller rank k the best approximation in the
Frobenius norm is the truncated SVD of the summed ΔW (Eckart–Young): B = U_k·S_k, A = V_kᵀ.

Baking is W' = W + Σⱼ sⱼ·ΔWⱼ for every weight W that LoRA j changes: what diffusers' ``fuse_lora``
computes inside a loaded pipeline, done here one tensor at a time from the LoRA files, so that a
merge (live or streamed to disk) can take each expert with its LoRAs as that expert's weights.

Files are read with diffusers' ``lora_state_dict`` (kohya, PEFT and diffusers layouts) and written
in the PEFT layout diffusers' ``load_lora_weights`` reads, with the scale folded into B (α = r).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from composer.checkpoints.ldm_format import clip_inner
from composer.merge import methods as m
from composer.recipe import RecipeError


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


def concat(pairs: Sequence[LoraPair], strengths: Sequence[float]) -> LoraPair:
    """Σᵢ sᵢ·ΔWᵢ exactly, as one LoRA of rank Σrᵢ (scale 1)."""
    downs = [p.down.float() for p in pairs]
    ups = [
        (s * p.scale) * p.up.reshape(p.up.shape[0], p.rank, *p.up.shape[2:]).float()
        for p, s in zip(pairs, strengths, strict=True)
    ]
    return LoraPair(torch.cat(downs, dim=0), torch.cat(ups, dim=1), 1.0)


def from_delta(delta: torch.Tensor, rank: int, conv_up_shape: bool = False) -> LoraPair:
    """The rank-``rank`` LoRA closest to ``delta`` (truncated SVD), scale 1."""
    out = delta.shape[0]
    flat = delta.reshape(out, -1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = max(1, min(rank, s.numel()))
    up = u[:, :k] * s[:k]
    down = vh[:k]
    if delta.dim() == 4:
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(out, k, 1, 1)
    return LoraPair(down.contiguous(), up.contiguous(), 1.0)


def merge_pairs(
    pairs: Sequence[LoraPair],
    strengths: Sequence[float],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
    name: str = "",
    sign_rule: str = "mass",
) -> LoraPair:
    """One module's merged LoRA. ``concat``: exact (then SVD-truncated if ``rank`` is below the
    sum of ranks). ``ties`` / ``dare_ties`` / ``dare``: the method applied to the experts' full
    ΔWᵢ over a zero base (TIES trims and elects signs per entry of ΔW, not of A and B, whose
    entries have no meaning alone), then SVD to ``rank`` (default: the largest input rank)."""
    if method == "concat":
        merged = concat(pairs, strengths)
        if rank is None or rank >= merged.rank:
            return merged
        return from_delta(merged.delta(), rank)
    deltas = [p.delta(s) for p, s in zip(pairs, strengths, strict=True)]
    zero = torch.zeros_like(deltas[0])
    if method == "ties":
        delta = m.ties(zero, deltas, density, 1.0, None, sign_rule)
    elif method == "dare_ties":
        delta = m.dare_ties(zero, deltas, density, seed, name, 1.0, None, sign_rule)
    elif method == "dare":
        delta = m.dare_linear(zero, deltas, density, seed, name)
    else:
        raise ValueError(f"LoRA merge method must be concat, ties, dare_ties or dare: {method!r}")
    return from_delta(delta, rank or max(p.rank for p in pairs))


def extract(weight_a: torch.Tensor, weight_b: torch.Tensor, rank: int) -> LoraPair:
    """The rank-``rank`` LoRA that takes checkpoint A's weight closest to checkpoint B's."""
    return from_delta(weight_b.float() - weight_a.float(), rank)


# --- files ------------------------------------------------------------------------------------


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


def merge_files(
    paths: Sequence[str],
    strengths: Sequence[float],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
) -> dict[str, LoraPair]:
    """Merge LoRA files module by module; a module only some files train is merged with zero
    from the others (its ΔW is 0 there)."""
    loras = [read_lora(p) for p in paths]
    modules = list(dict.fromkeys(k for lora in loras for k in lora))
    out = {}
    for module in modules:
        present = [
            (lora[module], s) for lora, s in zip(loras, strengths, strict=True) if module in lora
        ]
        if method == "concat" or len(present) == 1:
            pairs, weights = zip(*present, strict=True)
            out[module] = merge_pairs(pairs, weights, "concat", rank)
        else:
            shape = present[0][0].delta().shape
            pairs = [
                lora.get(module)
                or LoraPair(
                    torch.zeros(1, *shape[1:]), torch.zeros(shape[0], 1, *[1] * (len(shape) - 2))
                )
                for lora in loras
            ]
            out[module] = merge_pairs(pairs, strengths, method, rank, density, seed, module)
    return out


def extract_models(tuned_files, base_files, rank: int, device: str = "cpu") -> dict[str, LoraPair]:
    """A LoRA that turns the base U-Net toward the tuned one: per Linear/Conv weight (2-D or
    4-D, norms and biases skipped), the rank-``rank`` SVD of θ_tuned − θ_base. The arguments are
    ``composer.merge.export.ModelFiles`` (streamed, one tensor at a time)."""
    out = {}
    for name in tuned_files.unet_names():
        if not name.endswith(".weight"):
            continue
        tuned = tuned_files.unet(name, torch.device(device))
        if tuned.dim() not in (2, 4):
            continue
        delta = tuned - base_files.unet(name, torch.device(device))
        if float(delta.abs().max()) == 0.0:
            continue
        out["unet." + name[: -len(".weight")]] = from_delta(delta, rank)
    return out


# --- baking -----------------------------------------------------------------------------------

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
Layers = dict[str, list[tuple[LoraPair, float]]]
"""Parameter name (``unet.<name>``, ``text_encoder.text_model.<name>``) → the LoRA layers that
change it, each with its strength."""


def parameter_of(module: str) -> str:
    """A LoRA module name (``read_lora``'s keys) → the name of the weight it changes, spelt as
    ``Layers`` spells it (text-encoder names with ``text_model.``, see ``clip_inner``)."""
    component, _, inner = module.partition(".")
    if component in TEXT_ENCODERS:
        inner = clip_inner(inner)
    return f"{component}.{inner}.weight"


@lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int]) -> dict[str, LoraPair]:
    return read_lora(path)


def read_lora_cached(path: str) -> dict[str, LoraPair]:
    """``read_lora`` kept for the few LoRAs used last (keyed by path, size and mtime), so that a
    live re-merge with other merge settings does not read its LoRA files again."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return _read_cached(path, (stat.st_size, stat.st_mtime_ns) if stat else (0, 0))


def bake_plan(
    loras: Iterable[tuple[str, str, float]],
    shapes: Mapping[str, tuple[int, ...]],
    model: str,
) -> Layers:
    """Read ``loras`` ((where, path, strength): ``where`` names the recipe field for messages)
    and place every layer on the weight it changes, before any tensor is computed.

    ``shapes`` holds the weights that can be baked (``Layers`` names). A layer with no weight of
    its shape in ``shapes`` is a ``RecipeError``: the LoRA does not fit."""
    plan: Layers = {}
    components = sorted({k.partition(".")[0] for k in shapes})
    for where, path, strength in loras:
        try:
            pairs = read_lora_cached(path)
        except (OSError, ValueError, KeyError) as e:
            raise RecipeError(f"{where}: {path!r} could not be read as a LoRA ({e})") from None
        for module, pair in pairs.items():
            name = parameter_of(module)
            shape = shapes.get(name)
            if shape is None:
                raise RecipeError(
                    f"{where}: {path!r} does not fit {model!r}: it changes {module}, which is not "
                    f"a weight of its {', '.join(components)} that can be baked"
                )
            if pair.shape[0] != shape[0] or math.prod(pair.shape) != math.prod(shape):
                raise RecipeError(
                    f"{where}: {path!r} does not fit {model!r}: its ΔW for {module} is "
                    f"{pair.shape}, the weight is {tuple(shape)}"
                )
            plan.setdefault(name, []).append((pair, strength))
    return plan


def baked(weight: torch.Tensor, layers: Sequence[tuple[LoraPair, float]] = ()) -> torch.Tensor:
    r"""W' = W + Σⱼ sⱼ·(αⱼ/rⱼ)·Bⱼ·Aⱼ in fp32 on W's device (W itself in fp32 when no layer
    changes it). Never modifies W."""
    out = weight.float()
    for pair, strength in layers:
        on = LoraPair(pair.down.to(out.device), pair.up.to(out.device), pair.scale)
        out = out + on.delta(strength).reshape(out.shape)
    return out
