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

LoRA files are read and written by ``composer.checkpoints.lora_files``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from composer.checkpoints.lora_files import LoraPair, read_lora, read_lora_cached
from composer.checkpoints.lora_formats import kohya_name, place
from composer.merge.registry import LORA_MERGE_METHODS, MERGE_METHODS, Merge, MergeError, Operands


def concat(pairs: Sequence[LoraPair], strengths: Sequence[float]) -> LoraPair:
    """Σᵢ sᵢ·ΔWᵢ exactly, as one LoRA of rank Σrᵢ (scale 1)."""
    if any(p.magnitude is not None for p in pairs):
        raise ValueError(
            "a DoRA layer (dora_scale) rescales the model's own weight: it can be baked into "
            "a model, not merged into another LoRA"
        )
    shape = common_shape(pairs)
    downs = [p.down.reshape(p.rank, *shape[1:]).float() for p in pairs]
    ups = [
        (s * p.scale) * p.up.reshape(shape[0], p.rank, *[1] * (len(shape) - 2)).float()
        for p, s in zip(pairs, strengths, strict=True)
    ]
    return LoraPair(torch.cat(downs, dim=0), torch.cat(ups, dim=1), 1.0)


def common_shape(pairs: Sequence[LoraPair]) -> tuple[int, ...]:
    """The shape of the weight ``pairs`` change, as the pair that knows most of it says: a
    conv's ΔW is (out, in, kh, kw), but some layouts store it flattened (LoHa's (out, in·kh·kw),
    a 1×1 kernel as a matrix)."""
    return max((p.shape for p in pairs), key=len)


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
    sum of ranks). Any other of ``LORA_MERGE_METHODS`` (``ties``, ``dare``, ``dare_ties``): the
    declared merge method, at λ = 1 and equal weights, applied to the experts' full ΔWᵢ over a
    zero base (TIES trims and elects signs per entry of ΔW, not of A and B, whose
    entries have no meaning alone), then SVD to ``rank`` (default: the largest input rank)."""
    if method == "concat":
        merged = concat(pairs, strengths)
        if rank is None or rank >= merged.rank:
            return merged
        return from_delta(merged.delta(), rank)
    if method not in LORA_MERGE_METHODS:
        *first, last = LORA_MERGE_METHODS
        raise ValueError(f"LoRA merge method must be {', '.join(first)} or {last}: {method!r}")
    if any(p.magnitude is not None for p in pairs):
        return concat(pairs, strengths)  # refuses, with the reason
    shape = common_shape(pairs)
    deltas = [p.delta(s).reshape(shape) for p, s in zip(pairs, strengths, strict=True)]
    zero = torch.zeros_like(deltas[0])
    settings = Merge(method, density=density, seed=seed, sign_rule=sign_rule)
    delta = MERGE_METHODS[method].fn(settings, Operands(name, zero, deltas, None))
    return from_delta(delta, rank or max(p.rank for p in pairs))


def extract(weight_a: torch.Tensor, weight_b: torch.Tensor, rank: int) -> LoraPair:
    """The rank-``rank`` LoRA that takes checkpoint A's weight closest to checkpoint B's."""
    return from_delta(weight_b.float() - weight_a.float(), rank)


def merge_files(
    paths: Sequence[str],
    strengths: Sequence[float],
    method: str = "concat",
    rank: int | None = None,
    density: float = 0.2,
    seed: int = 0,
) -> dict[str, LoraPair]:
    """Merge LoRA files module by module; a module only some files train is merged with zero
    from the others (its ΔW is 0 there). Files in kohya's layout and diffusers' meet under
    kohya's module names (``lora_formats.kohya_name``)."""
    loras = [read_lora(p) for p in paths]
    if any(m.startswith("lora_") for lora in loras for m in lora):
        xl = any(m.startswith(("lora_te2_", "text_encoder_2.")) for lora in loras for m in lora)
        loras = [{kohya_name(m, xl): p for m, p in lora.items()} for lora in loras]
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
    ``composer.checkpoints.files.ModelFiles`` (streamed, one tensor at a time)."""
    out = {}
    for name in tuned_files.names("unet"):
        if not name.endswith(".weight"):
            continue
        tuned = tuned_files.read(name, torch.device(device))
        if tuned.dim() not in (2, 4):
            continue
        delta = tuned - base_files.read(name, torch.device(device))
        if float(delta.abs().max()) == 0.0:
            continue
        out["unet." + name[: -len(".weight")]] = from_delta(delta, rank)
    return out


# --- baking -----------------------------------------------------------------------------------

Layers = dict[str, list[tuple[LoraPair, float]]]
"""Parameter name (``unet.<name>``, ``text_encoder.text_model.<name>``: ``names.lora_name``) →
the LoRA layers that change it, each with its strength."""


def bake_plan(
    loras: Iterable[tuple[str, str, float]],
    shapes: Mapping[str, tuple[int, ...]],
    model: str,
    unet_config: dict | None = None,
) -> Layers:
    """Read ``loras`` ((where, path, strength): ``where`` names the recipe field for messages)
    and place every layer on the weight it changes (``lora_formats.place``; ``unet_config``
    lets kohya's LDM-named U-Net modules be placed), before any tensor is computed.

    ``shapes`` holds the weights that can be baked (``Layers`` names). A layer with no weight of
    its shape in ``shapes`` is a ``MergeError``: the LoRA does not fit."""
    plan: Layers = {}
    for where, path, strength in loras:
        try:
            pairs = read_lora_cached(path)
        except (OSError, ValueError, KeyError) as e:
            raise MergeError(f"{where}: {path!r} could not be read as a LoRA ({e})") from None
        try:
            placed = place(pairs, shapes, unet_config)
        except ValueError as e:
            raise MergeError(f"{where}: {path!r} does not fit {model!r}: {e}") from None
        for name, pair in placed.items():
            plan.setdefault(name, []).append((pair, strength))
    return plan


def baked(weight: torch.Tensor, layers: Sequence[tuple[LoraPair, float]] = ()) -> torch.Tensor:
    r"""W' = W + Σⱼ (W'ⱼ − W) in fp32 on W's device, each layer's change computed from W alone
    (``LoraPair.change``: sⱼ·(αⱼ/rⱼ)·Bⱼ·Aⱼ for a plain layer), as lycoris applies several
    modules on one weight. W itself in fp32 when no layer changes it; W is never modified."""
    base = weight.float()
    out = base
    for pair, strength in layers:
        on = LoraPair(
            pair.down.to(base.device),
            pair.up.to(base.device),
            pair.scale,
            pair.magnitude,
            pair.peft_dora,
        )
        out = out + on.change(base, strength)
    return out
