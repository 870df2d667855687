"""A merge of models read from files, computed one parameter at a time (what an export writes).

Every input stays memory-mapped and each merged parameter is computed when it is asked for, from
the experts' (and base's) tensors read just then, with each expert's LoRAs baked in as its tensor
is read (``lora.baked``): peak memory is a few tensors, not a model. Architectures and shapes
(LoRAs' included) are checked when the merge is set up, before any work. Parameters are merged
under their ``names.merge_name`` as the live merge merges them, so both give the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from composer.merge import lora
from composer.merge.blocks import weight_map
from composer.merge.plan import (
    check_compatible,
    merge_parameter,
    trims_whole_model,
    whole_model_thresholds,
)
from composer.merge.registry import Merge, MergeError


class Weights(Protocol):
    """A model's parameters read one at a time (``composer.checkpoints.files.ModelFiles``)."""

    reference: str
    config: dict
    """Its U-Net's config (block weights)."""

    def components(self) -> list[str]: ...
    def names(self, component: str) -> list[str]: ...
    def shapes(self, component: str) -> dict[str, tuple[int, ...]]: ...
    def read(self, name: str, device: torch.device) -> torch.Tensor: ...
    def bakeable(self) -> dict[str, tuple[int, ...]]: ...


class StreamedMerge:
    """``merged(name)``: parameter ``name`` of the merge of ``experts`` (each with its weight in
    ``weights`` and its LoRAs in ``loras``: (recipe field, file, strength)) over ``base``, in fp32
    on ``device``. Without ``settings``, the one expert with its LoRAs baked in (``composer lora
    bake``). The components merged are the first expert's (``components``)."""

    def __init__(
        self,
        settings: Merge | None,
        experts: Sequence[Weights],
        base: Weights | None,
        weights: Sequence[float],
        loras: Sequence[Sequence[tuple[str, str, float]]],
        device: torch.device,
    ):
        self.settings, self.experts, self.base = settings, list(experts), base
        self.weights, self.device = list(weights), device
        first = self.experts[0]
        models = [*self.experts, *([base] if base else [])]
        self.components = first.components()
        for c in self.components:
            check_compatible([(m.reference, m.shapes(c)) for m in models], c)
        self.layers = [
            lora.bake_plan(files, m.bakeable(), m.reference, m.config)
            for m, files in zip(self.experts, loras, strict=True)
        ]
        self.component = {n: c for c in self.components for n in first.names(c)}
        self.thresholds = dict.fromkeys(self.components)
        if settings is None:
            return
        try:
            self.block_weight = weight_map(first.config, settings.block_weights, settings.overrides)
        except ValueError as e:
            raise MergeError(f"merge.block_weights: {e}") from None
        if trims_whole_model(settings):
            for c in self.components:
                self.thresholds[c] = whole_model_thresholds(
                    first.names(c),
                    lambda n, i: self.expert(i, n) - self.reference(n),
                    len(self.experts),
                    settings.density,
                )

    def expert(self, i: int, name: str) -> torch.Tensor:
        """Expert ``i``'s parameter with its LoRAs baked in."""
        key = "unet." + name if self.component[name] == "unet" else name
        return lora.baked(self.experts[i].read(name, self.device), self.layers[i].get(key, ()))

    def reference(self, name: str) -> torch.Tensor:
        return self.base.read(name, self.device)

    def merged(self, name: str) -> torch.Tensor:
        if self.settings is None:
            return self.expert(0, name)
        c = self.component[name]
        return merge_parameter(
            self.settings,
            name,
            self.reference(name) if self.base else None,
            [self.expert(i, name) for i in range(len(self.experts))],
            self.weights,
            self.block_weight(name),
            self.thresholds[c],
            shortcut=c != "unet",
        )
