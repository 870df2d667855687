r"""kohya and LyCORIS LoRA files: each module's layer as an exact pair of factors, and the
module names of every layout placed on a model's weights.

What a layer means is what the reference implementation, ``lycoris-lora``, computes in its
modules' forward pass (what AUTOMATIC1111 and ComfyUI apply). With α/r the file's ``alpha`` over
the layer's rank (scale 1 without an alpha), at strength 1:

- LoRA / LoCon: ΔW = (α/r)·up·down; with a Tucker core, ΔW = (α/r)·mid ×₁ up ×₂ down.
- LoHa: ΔW = (α/r)·(w1a·w1b) ⊙ (w2a·w2b), each half optionally a Tucker product with t1/t2.
- LoKr: ΔW = (α/r)·w1 ⊗ w2, each side whole or a product (w2 optionally Tucker); r is the rank
  of the factorised side, and a file whose two sides are whole has scale 1.
- ``dora_scale`` (DoRA): W' = (W + ΔW)·(s·(m/‖W + ΔW‖ − 1) + 1), the norm per output row
  (per input column when m has that shape), as lycoris' ``weight_decompose``.

(``merge_to`` in lycoris-lora 4.1.3 scales LoHa and LoKr by α/r twice; its forward does not.)

Every layer becomes one ``LoraPair`` whose up·down equals ΔW exactly, so merging, baking and
generation share one reading: LoHa's Hadamard product is the product of the row-wise and
column-wise Khatri–Rao products of its halves (rank r²), LoKr's Kronecker product is
kron(U₁, U₂)·kron(V₁, V₂) (mixed-product property), a Tucker core is folded into ``down``; where
that rank exceeds the smaller side of W the pair is the full ΔW against an identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from composer.checkpoints.lora_files import LoraPair

LAYER_SUFFIXES = (
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "alpha",
    "dora_scale",
)


def is_kohya(keys: Iterable[str]) -> bool:
    """Whether a file's keys are kohya's or LyCORIS' layout (not diffusers' or PEFT's)."""
    ends = tuple("." + s for s in LAYER_SUFFIXES if s != "alpha")
    return any(k.endswith(ends) for k in keys)


def read_layers(state: Mapping[str, torch.Tensor], path: str) -> dict[str, LoraPair]:
    """A kohya/LyCORIS state dict → module name as the file spells it → ``LoraPair``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in LAYER_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{path}: {key} is not a tensor of a LoRA, LoCon, LoHa or LoKr layer")
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor.float()
    pairs = {}
    for module, t in groups.items():
        try:
            if "hada_w1_a" in t:
                pair = _loha(t)
            elif "lokr_w1" in t or "lokr_w1_a" in t:
                pair = _lokr(t)
            elif "lora_down.weight" in t:
                pair = _lora(t)
            else:
                raise ValueError(f"has only {', '.join(sorted(t))}")
        except (KeyError, RuntimeError, ValueError) as e:
            reason = f"lacks {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise ValueError(f"{path}: layer {module} is not a valid layer ({reason})") from None
        pairs[module] = pair
    return pairs


def _scale(t: dict, rank: int | None) -> float:
    alpha = t.get("alpha")
    alpha = float(alpha) if alpha is not None else 0.0
    return alpha / rank if rank and alpha else 1.0


def _lora(t: dict) -> LoraPair:
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    rank = down.shape[0]
    mid = t.get("lora_mid.weight")
    if mid is not None:  # Tucker: ΔW[o, i, k] = Σ up[o, p]·mid[p, q, k]·down[q, i]
        down = torch.einsum("pq...,qi->pi...", mid, down.reshape(rank, -1))
    return _pair(up.reshape(up.shape[0], rank), down, _scale(t, rank), t)


def _tucker_rows(core: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """V with V[i, (r, k)] = Σⱼ core[i, j, k]·b[j, r]: a Tucker half as U·V with U = aᵀ."""
    return torch.einsum("ij...,jr->ir...", core, b)


def _loha(t: dict) -> LoraPair:
    rank = t["hada_w1_b"].shape[0]
    halves = []
    for n in (1, 2):
        a, b, core = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"], t.get(f"hada_t{n}")
        halves.append((a.T.contiguous(), _tucker_rows(core, b)) if core is not None else (a, b))
    (u1, v1), (u2, v2) = halves
    up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
    v1f, v2f = v1.reshape(v1.shape[0], -1), v2.reshape(v2.shape[0], -1)
    down = (v1f[:, None, :] * v2f[None, :, :]).reshape(-1, *v1.shape[1:])
    return _pair(up, down, _scale(t, rank), t)


def _whole(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole Kronecker side as U·V with an identity on its smaller dimension."""
    rows, cols = w.shape[0], w.reshape(w.shape[0], -1).shape[1]
    if rows <= cols:
        return torch.eye(rows), w
    return w.reshape(rows, cols), torch.eye(cols).reshape(cols, *w.shape[1:])


def _lokr(t: dict) -> LoraPair:
    if "lokr_w1" in t:
        u1, v1 = _whole(t["lokr_w1"])
        rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    else:
        u1, v1 = t["lokr_w1_a"], t["lokr_w1_b"]
        rank = u1.shape[1]
    if "lokr_w2" in t:
        u2, v2 = _whole(t["lokr_w2"])
    elif "lokr_t2" in t:
        u2, v2 = t["lokr_w2_a"].T.contiguous(), _tucker_rows(t["lokr_t2"], t["lokr_w2_b"])
    else:
        u2, v2 = t["lokr_w2_a"], t["lokr_w2_b"]
    up = torch.kron(u1, u2)
    v1f, v2f = v1.reshape(v1.shape[0], -1), v2.reshape(v2.shape[0], -1)
    down = torch.kron(v1f, v2f)
    if v2.dim() > 2:  # the kernel of a conv's second side: in = c·d, then (kh, kw)
        kernel = v2.shape[2:]
        down = down.reshape(down.shape[0], -1, *kernel)
    return _pair(up, down, _scale(t, rank), t)


def _pair(up: torch.Tensor, down: torch.Tensor, scale: float, t: dict) -> LoraPair:
    """``LoraPair`` of ΔW = scale·up·down, as the full ΔW against an identity where the pair's
    rank exceeds W's smaller side (LoHa's r², LoKr's products)."""
    out, rank = up.shape[0], up.shape[1]
    columns = down.reshape(rank, -1).shape[1]
    if rank > min(out, columns):
        delta = up @ down.reshape(rank, -1)
        if out <= columns:
            up, down = torch.eye(out), delta.reshape(out, *down.shape[1:])
        else:
            up, down = delta, torch.eye(columns).reshape(columns, *down.shape[1:])
    dora = t.get("dora_scale")
    return LoraPair(down.contiguous(), up.contiguous(), scale, dora)


# --- names ---------------------------------------------------------------------------------------

_FLAT = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}


def spellings(weight: str, ldm_unet: Mapping[str, str] | None = None) -> list[str]:
    """The module names LoRA files use for ``weight`` (a ``names.lora_name``): dotted (diffusers,
    PEFT), kohya's flattened ``lora_unet_…``/``lora_te[12]_…``, U-Net modules also by their LDM
    name (kohya's SDXL files; ``ldm_unet`` maps diffusers to LDM parameter names), text-encoder
    modules with and without ``text_model.`` (transformers ≥ 5.6 dropped it)."""
    module = weight.removesuffix(".weight")
    component, _, inner = module.partition(".")
    inners = [inner]
    if component == "unet" and ldm_unet and inner + ".weight" in ldm_unet:
        inners.append(ldm_unet[inner + ".weight"].removesuffix(".weight"))
    elif inner.startswith("text_model."):
        inners.append(inner.removeprefix("text_model."))
    out = [f"{component}.{i}" for i in inners]
    for prefix in _FLAT.get(component, ()):
        out += [prefix + i.replace(".", "_") for i in inners]
    return out


def place(
    pairs: Mapping[str, LoraPair],
    weights: Mapping[str, tuple[int, ...]],
    unet_config: dict | None = None,
) -> dict[str, LoraPair]:
    """``pairs`` (by the file's module names) → by the weight each changes (``weights``: shape
    by ``names.lora_name``). A module that names no weight, or whose ΔW has another shape, is a
    ``ValueError`` naming the module: a LoRA for another model is never half applied."""
    ldm = None
    if unet_config is not None and any(k.startswith("lora_unet_") for k in pairs):
        from composer.checkpoints.ldm_format import _map_key, unet_prefix_map

        prefixes = unet_prefix_map(unet_config)
        ldm = {}
        for name in weights:
            if name.startswith("unet."):
                try:
                    ldm[name[5:]] = _map_key(name[5:], prefixes)
                except KeyError:
                    continue
    index = {s: w for w in weights if w.endswith(".weight") for s in spellings(w, ldm)}
    unknown = [m for m in pairs if m not in index]
    if unknown:
        share = "all" if len(unknown) == len(pairs) else f"{len(unknown)}"
        raise ValueError(
            f"{share} of its {len(pairs)} modules match no module of this model "
            f"(e.g. {unknown[0]}); it was made for another architecture"
        )
    placed: dict[str, LoraPair] = {}
    for module, pair in pairs.items():
        weight = index[module]
        shape = weights[weight]
        if pair.shape[0] != shape[0] or math.prod(pair.shape) != math.prod(shape):
            raise ValueError(
                f"its ΔW for {module} is {pair.shape}, the weight is {tuple(shape)}; "
                "it was made for another architecture"
            )
        if weight in placed:
            raise ValueError(f"two of its layers change {weight} ({module})")
        placed[weight] = pair
    return placed


def kohya_name(module: str, xl: bool = False) -> str:
    """A module name as kohya spells it (``lora_unet_…``, ``lora_te_…``; ``lora_te1_…`` for an
    SDXL file, ``xl``), text-encoder modules with ``text_model_``: how files of both layouts
    meet in one merged file."""
    component, dot, inner = module.partition(".")
    if dot and component in _FLAT:
        prefix = _FLAT[component][1 if component == "text_encoder" and xl else 0]
        module = prefix + inner.replace(".", "_")
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        rest = module.removeprefix(prefix)
        if rest != module and rest.startswith(("encoder_", "embeddings_", "final_layer_norm")):
            return prefix + "text_model_" + rest
    return module
