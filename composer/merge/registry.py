"""The merge methods, declared once each: what a method computes per tensor, whether it needs a
base, how many experts it takes and which settings it reads (sd-mecha's ``@merge_method``).

The recipe's accepted names and its validation, the CLI and the page's controls all read these
declarations (``MERGE_METHODS``, ``PARAMS``); ``merge.plan.merge_tensor`` dispatches through them.
Adding a merge method is one pure tensor function in ``merge.methods`` and one declaration here.

This module imports no torch (the recipe parser and ``python -m composer info`` read it): the
declared functions import ``merge.methods`` when they first run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


class MergeError(ValueError):
    """A merge that cannot be done as asked. Its message names the recipe field (``merge.base``,
    ``experts``…) and what would be accepted; callers outside ``merge`` show it as it is."""


@dataclass(frozen=True)
class Merge:
    method: str = "weighted_sum"
    base: str | None = None
    density: float = 0.2
    lambda_: float = 1.0
    seed: int = 0
    block_weights: tuple[float, ...] | None = None
    overrides: tuple[tuple[str, float], ...] = ()
    """Per-parameter regex → coefficient, applied after the block weights (last match wins)."""
    sign_rule: str = "mass"
    """TIES/DARE-TIES sign election: ``mass`` (the paper) or ``count``."""
    trim_scope: str = "tensor"
    """TIES trim thresholds per ``tensor`` (peft, most tools) or over the whole ``model`` (the
    TIES reference code)."""
    consensus_of: str = "task_arithmetic"
    """``consensus``: the merge its masks are applied to, ``task_arithmetic`` or ``ties``."""
    consensus_k: int = 2
    mask_lambda: float = 0.4
    fisher_samples: int = 32
    """``fisher``: how many of each model's own samples its Fisher estimate averages."""
    fisher_estimator: str = "true"
    """``fisher``: ``true`` (u ~ N(0, I)) or ``empirical`` Fisher (``merge.fisher``)."""


@dataclass(frozen=True)
class Param:
    """One setting a merge method reads: ``name`` in the recipe's ``merge`` section, ``attr`` on
    ``Merge``. A number is accepted from ``low`` to ``high`` (whole numbers if ``integer``); a
    string is one of ``choices``, given as (label, value) pairs. ``page`` is the page's slider
    (low, high, step), or ``None`` for a number box or radio buttons."""

    name: str
    attr: str
    default: Any
    label: str
    info: str = ""
    low: float | None = None
    high: float | None = None
    integer: bool = False
    choices: tuple[tuple[str, str], ...] = ()
    page: tuple[float, float, float] | None = None

    @property
    def values(self) -> tuple[str, ...]:
        """The accepted strings of a choice."""
        return tuple(value for _, value in self.choices)


MAX_EXPERTS = 8
"""``consensus_k`` cannot exceed the experts a recipe may hold (the recipe's ``MAX_EXPERTS``)."""

PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            "density", "density", 0.2, "Density (kept fraction)",
            "TIES, DARE: the fraction ρ of each task vector that is kept",
            low=0.0, high=1.0, page=(0, 1, 0.01),
        ),
        Param(
            "lambda", "lambda_", 1.0, "λ (task scale)",
            "the merged task vector's scale (add_difference: the difference's)",
            low=-10.0, high=10.0, page=(-2, 3, 0.05),
        ),
        Param(
            "seed", "seed", 0, "Mask seed (DARE)", "DARE's random drop masks",
            low=0, high=2**32 - 1, integer=True,
        ),
        Param(
            "sign_rule", "sign_rule", "mass", "Sign election",
            "TIES: the sign of the larger total magnitude, or of more experts",
            choices=(("mass (paper)", "mass"), ("count", "count")),
        ),
        Param(
            "trim_scope", "trim_scope", "tensor", "Trim scope",
            "TIES: the top ρ of each tensor, or of the whole model (the paper's code)",
            choices=(("per tensor", "tensor"), ("whole model (paper)", "model")),
        ),
        Param(
            "consensus_of", "consensus_of", "task_arithmetic", "Consensus over",
            "consensus: the merge whose task vector the TALL masks filter",
            choices=(("task arithmetic", "task_arithmetic"), ("TIES", "ties")),
        ),
        Param(
            "consensus_k", "consensus_k", 2, "Consensus k",
            "consensus: keep the entries that at least k experts' masks select",
            low=1, high=MAX_EXPERTS, integer=True,
        ),
        Param(
            "mask_lambda", "mask_lambda", 0.4, "Mask λ (TALL)",
            "consensus: an expert's mask keeps |τᵢ| ≥ λ·|τ_merged − τᵢ|",
            low=0.0, high=10.0,
        ),
        Param(
            "fisher_samples", "fisher_samples", 32, "Fisher samples",
            "fisher: each model's own samples its Fisher estimate averages (cached per model)",
            low=1, high=1024, integer=True,
        ),
        Param(
            "fisher_estimator", "fisher_estimator", "true", "Fisher estimator",
            "fisher: the true Fisher (the model's own noise) or the empirical one",
            choices=(("true", "true"), ("empirical", "empirical")),
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Operands:
    """One parameter across the models, as a declared method merges it (fp32 tensors)."""

    name: str
    """Its name (``checkpoints.names.merge_name``): what seeds DARE's masks."""
    base: Tensor | None
    experts: Sequence[Tensor]
    weights: Sequence[float] | None
    """The experts' weights (``None``: all 1)."""
    thresholds: Tensor | None = None
    """TIES's whole-model trim thresholds, one per expert (``trim_scope`` "model")."""
    fishers: Sequence[Tensor] | None = None
    """``fisher``: each expert's diagonal Fisher for this parameter (``None`` where none was
    estimated: the text encoders)."""


TensorMerge = Callable[[Merge, Operands], "Tensor"]
"""A declared method: ``fn(settings, operands)`` → the parameter's merged value."""


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: ``fn`` merges one parameter (``TensorMerge``); ``experts`` is how many
    it takes: (at least, at most or ``None``)."""

    name: str
    fn: TensorMerge
    needs_base: bool
    experts: tuple[int, int | None]
    params: tuple[str, ...]
    """The ``PARAMS`` it reads."""
    summary: str
    for_loras: bool = False
    """Also offered by ``composer lora merge``, on the LoRAs' ΔW over a zero base."""


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    *,
    summary: str,
    needs_base: bool = True,
    experts: tuple[int, int | None] = (1, None),
    params: tuple[str, ...] = (),
    for_loras: bool = False,
) -> Callable[[TensorMerge], TensorMerge]:
    """Declare the decorated function as the merge method of its name."""

    def declare(fn: TensorMerge) -> TensorMerge:
        if fn.__name__ in MERGE_METHODS:
            raise ValueError(f"a merge method named {fn.__name__!r} is already declared")
        unknown = [p for p in params if p not in PARAMS]
        if unknown:
            raise ValueError(f"merge method {fn.__name__!r} reads unknown settings {unknown}")
        MERGE_METHODS[fn.__name__] = MergeMethod(
            fn.__name__, fn, needs_base, experts, params, summary, for_loras
        )
        return fn

    return declare


def method(name: str) -> MergeMethod:
    """The declaration of ``name``."""
    if name not in MERGE_METHODS:
        raise MergeError(f"merge.method: {name!r} is not available")
    return MERGE_METHODS[name]


def check(settings: Merge, n_experts: int, has_base: bool) -> None:
    """What a merge needs besides its settings' ranges (which the recipe checks): a base for
    task-vector methods, and the number of experts the method takes."""
    declared = method(settings.method)
    if declared.needs_base and not has_base:
        raise MergeError(
            f"merge.base: null is not accepted for method {settings.method!r}; expected the "
            "common ancestor of the experts (e.g. toy-base), whose weights the task vectors are "
            "measured from"
        )
    low, high = declared.experts
    if n_experts < low or (high is not None and n_experts > high):
        if low == high:
            takes = f"exactly {low}"
        elif high is None:
            takes = f"at least {low}"
        else:
            takes = f"{low} to {high}"
        raise MergeError(f"experts: merge method {settings.method!r} takes {takes} experts")


# --- the methods (θ₀ base, θᵢ experts, wᵢ weights; the equations are in ``merge.methods``) --


@merge_method(needs_base=False, summary="Σ wᵢθᵢ / Σ wᵢ (AUTOMATIC1111's weighted sum, N models)")
def weighted_sum(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.weighted_sum(t.experts, t.weights)


@merge_method(
    experts=(2, 2), params=("lambda",), summary="A + λ(B − base) (AUTOMATIC1111's add difference)"
)
def add_difference(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.add_difference(t.experts[0], t.experts[1], t.base, s.lambda_)


@merge_method(params=("lambda",), summary="base + λ Σ wᵢτᵢ (Ilharco et al. 2023)")
def task_arithmetic(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.task_arithmetic(t.base, t.experts, t.weights, s.lambda_)


@merge_method(
    needs_base=False,
    experts=(2, 2),
    summary="spherical interpolation of two experts, at the second's share of the weights",
)
def slerp(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    total = t.weights[0] + t.weights[1]
    if abs(total) < 1e-12:
        raise MergeError("experts: slerp weights add up to 0")
    return m.slerp(t.experts[0], t.experts[1], t.weights[1] / total)


@merge_method(
    params=("density", "lambda", "sign_rule", "trim_scope"),
    for_loras=True,
    summary="trim, elect signs, disjoint mean of the task vectors (TIES, Yadav et al. 2023)",
)
def ties(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.ties(t.base, t.experts, s.density, s.lambda_, t.weights, s.sign_rule, t.thresholds)


@merge_method(
    params=("density", "lambda", "seed"),
    for_loras=True,
    summary="drop and rescale the task vectors, then add them (DARE, Yu et al. 2024)",
)
def dare(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.dare_linear(
        t.base, t.experts, s.density, s.lambda_, t.weights, seed=s.seed, name=t.name
    )


@merge_method(
    params=("density", "lambda", "seed", "sign_rule"),
    for_loras=True,
    summary="DARE's drop and rescale, then TIES's sign election (Yu et al. 2024)",
)
def dare_ties(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.dare_ties(
        t.base, t.experts, s.density, s.lambda_, t.weights, s.sign_rule, seed=s.seed, name=t.name
    )


@merge_method(summary="toward the experts' mean by their task vectors' angle (Jang et al. 2024)")
def model_stock(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    return m.model_stock(t.base, t.experts)


@merge_method(
    params=(  # TIES's settings too, for the masks over a TIES merge
        "density",
        "lambda",
        "sign_rule",
        "trim_scope",
        "consensus_of",
        "consensus_k",
        "mask_lambda",
    ),
    summary="keep what at least k experts' TALL masks select (Wang et al. 2024)",
)
def consensus(s: Merge, t: Operands) -> Tensor:
    from composer.merge import methods as m

    base, experts, weights = t.base, t.experts, t.weights
    if s.consensus_of == "ties":
        merged = m.ties(base, experts, s.density, 1.0, weights, s.sign_rule, t.thresholds) - base
    else:
        merged = m.task_arithmetic(base, experts, weights, 1.0) - base
    return m.consensus(base, experts, merged, s.lambda_, s.mask_lambda, s.consensus_k)


@merge_method(
    needs_base=False,
    experts=(2, None),
    params=("fisher_samples", "fisher_estimator"),
    summary="Σ wᵢFᵢθᵢ / Σ wᵢFᵢ, Fᵢ each U-Net's data-free Fisher (Matena & Raffel 2022)",
)
def fisher(s: Merge, t: Operands) -> Tensor:
    from composer.merge import fisher as f
    from composer.merge import methods as m

    if t.fishers is None:
        if not t.name.startswith("text_encoder"):
            raise MergeError(f"merge.method: 'fisher' has no Fisher estimate for {t.name}")
        return m.weighted_sum(t.experts, t.weights)  # none is estimated for text encoders
    return f.merge(t.experts, t.fishers, t.weights)


LORA_MERGE_METHODS = ("concat", *(name for name, m in MERGE_METHODS.items() if m.for_loras))
"""``composer lora merge --method``: ``concat`` (the exact sum, ``merge.lora.concat``) or a
declared method that merges LoRAs' ΔW."""
