"""Merge settings (``registry.Merge``) applied to whole models, one parameter tensor at a time.

The same functions serve the live merge (tensors already on the device, ``merge.live``) and the
export (tensors streamed from files, ``merge.stream``): ``check_compatible`` before any work,
``whole_model_thresholds`` when TIES trims over the whole model (``trims_whole_model``), then
``merge_parameter`` for each parameter name. A model is merged component by component
(``COMPONENTS``): U-Net and text encoder(s), each with its own whole-model trim thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from composer.merge.registry import Merge, MergeError, Operands, method

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""What a merge merges, as pipeline attributes: the U-Net and the text encoder(s). The VAE is
the first expert's (merged experts share one latent space)."""
_SHOWN = {
    "unet": "U-Nets",
    "text_encoder": "text encoders",
    "text_encoder_2": "second text encoders",
}


def trims_whole_model(settings: Merge) -> bool:
    """Whether the merge needs ``whole_model_thresholds`` first: a method that reads
    ``trim_scope`` (TIES, consensus), set to "model"."""
    return "trim_scope" in method(settings.method).params and settings.trim_scope == "model"


def check_compatible(
    models: Sequence[tuple[str, Mapping[str, tuple[int, ...]]]], component: str = "unet"
) -> None:
    """Refuse models whose parameters differ, naming both models and the first mismatch.

    ``models`` is ``[(display name, {parameter name: shape})]`` of one ``component``; the first
    is the reference."""
    shown = _SHOWN.get(component, component)
    (first, shapes), rest = models[0], models[1:]
    for other, theirs in rest:
        missing = sorted(set(shapes) - set(theirs))
        extra = sorted(set(theirs) - set(shapes))
        if missing or extra:
            what = f"{first} has {missing[0]}" if missing else f"{other} has {extra[0]}"
            raise MergeError(
                f"experts: {first!r} and {other!r} cannot be merged: their {shown} have different "
                f"parameters ({what}, the other does not; SD 1.x, SD 2.x and SDXL do not merge "
                "with each other)"
            )
        for name, shape in shapes.items():
            if tuple(theirs[name]) != tuple(shape):
                raise MergeError(
                    f"experts: {first!r} and {other!r} cannot be merged: in their {shown}, "
                    f"{name} is {tuple(shape)} in one and {tuple(theirs[name])} in the other"
                )


def merge_parameter(
    settings: Merge,
    name: str,
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    block_weight: float = 1.0,
    thresholds: torch.Tensor | None = None,
    shortcut: bool = False,
    fishers: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One parameter of a whole-model merge. A buffer that is not floating point (position ids)
    is the first expert's. With ``shortcut`` (text encoders, which experts often share), a
    parameter that every model, base included, holds alike is that value: what every method
    gives, without rounding (a weighted sum by thirds) or the 0/0 of task vectors that are all
    zero. Otherwise ``merge_tensor`` in fp32."""
    if not experts[0].is_floating_point():
        return experts[0]
    others = [*experts[1:], *([base] if base is not None else [])]
    if shortcut and all(torch.equal(experts[0], t.to(experts[0].dtype)) for t in others):
        return experts[0]
    try:
        return merge_tensor(
            settings,
            name,
            base.float() if base is not None else None,
            [t.float() for t in experts],
            weights,
            block_weight,
            thresholds,
            fishers,
        )
    except MergeError:
        raise
    except ValueError as e:  # a method that meets what it cannot merge says so, never drops it
        raise MergeError(f"merge: {name}: {e}") from None


def merge_tensor(
    settings: Merge,
    name: str,
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    block_weight: float = 1.0,
    thresholds: torch.Tensor | None = None,
    fishers: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One parameter's merged value (fp32 in, fp32 out).

    ``block_weight`` b scales how far this parameter moves from its reference (the base, or the
    first expert for methods without one) toward the merge: θ_ref + b·(θ_merged − θ_ref), so
    b = 1 is the plain merge and b = 0 keeps the reference (supermerger's per-block α when the
    merge is a weighted sum with weights 1 − α, α). ``thresholds`` are TIES's whole-model trim
    thresholds (one per expert), if ``settings.trim_scope`` is "model"; ``fishers`` the
    experts' Fisher estimates of this parameter (``fisher``)."""
    operands = Operands(name, base, experts, weights, thresholds, fishers)
    out = method(settings.method).fn(settings, operands)
    if block_weight != 1.0:
        ref = base if base is not None else experts[0]
        out = ref + block_weight * (out - ref)
    return out


def whole_model_thresholds(
    names: Iterable[str],
    task_vector: Callable[[str, int], torch.Tensor],
    n_experts: int,
    density: float,
) -> torch.Tensor:
    """Per expert, the magnitude threshold that keeps its top ⌈ρ·P⌉ task-vector entries over all P
    parameters of the model (the TIES reference code's whole-model ``topk_values_mask``).

    Exact, without holding the model's task vector at once: a bisection on the float32 bit
    pattern of the threshold (monotonic for non-negative floats), each round counting the
    entries ≥ the candidate tensor by tensor, 32 rounds. ``task_vector(name, i)`` returns τᵢ."""
    names = list(names)
    total = sum(task_vector(n, 0).numel() for n in names)
    keep = max(1, min(total, int(-(-density * total // 1))))
    thresholds = []
    for i in range(n_experts):
        low, high = 0, 0x7F800000  # bit patterns of 0.0 and +inf
        while low < high:  # the largest threshold t with count(|τ| ≥ t) ≥ keep
            mid = (low + high + 1) // 2
            value = torch.tensor(mid, dtype=torch.int32).view(torch.float32).item()
            count = sum(int((task_vector(n, i).abs() >= value).sum()) for n in names)
            if count >= keep:
                low = mid
            else:
                high = mid - 1
        thresholds.append(torch.tensor(low, dtype=torch.int32).view(torch.float32).item())
    return torch.tensor(thresholds)
