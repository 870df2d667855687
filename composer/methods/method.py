"""What a composition method is: the one declaration the engine, the recipe parser, the CLI and
the page read (``composer.methods`` registers one per module).

A method owns its recipe section (a frozen dataclass, its parser and its JSON form), its checks
of a whole recipe, its runner, its cost estimate for ZeroGPU and the description of its page form.
The form is plain data (``Form``, ``Control``): ``ui`` turns it into Gradio controls and converts
between their values and a recipe, so a method never imports Gradio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

Values = dict[str, Any]
"""A form's control values by name; expert rows under ``"rows"`` as a list of such dicts."""


@dataclass(frozen=True)
class Control:
    """One control of a page form.

    ``kind`` is one of ``model``, ``lora``, ``aggregator`` (a dropdown of bundled names that also
    takes a typed path or Hub id), ``choice`` (a dropdown of ``choices``), ``radio``, ``slider``
    (``low``..``high`` by ``step``), ``number``, ``integer``, ``text``, ``check`` or ``state``
    (a value the page keeps without showing it). ``choices`` are values or (label, value) pairs.
    ``default`` may be a callable, evaluated when the page is built (bundled names)."""

    name: str
    kind: str
    label: str = ""
    default: Any = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    info: str = ""
    enables: str | None = None
    """``check`` only: the control that is shown while this box is *not* ticked (hidden, not greyed:
    a greyed value that is not the one used misleads)."""
    fills_rows: Callable[[str], list[str]] | None = None
    """Picking a value puts these models into the expert rows (an aggregator's experts)."""


@dataclass(frozen=True)
class Form:
    """A method's tab: an introduction, its own controls and up to ``rows`` repeated rows (one
    per expert, or per LoRA for a single model). ``read`` turns values into the recipe's
    ``experts`` and section; ``write`` does the reverse, or returns ``None`` for a recipe the
    controls cannot show exactly (it then opens in the Recipe panel)."""

    tab: str
    intro: str
    read: Callable[[Values], dict]
    write: Callable[[Any], Values | None]
    controls: tuple[Control, ...] = ()
    row: tuple[Control, ...] = ()
    rows: int = 0
    min_rows: int = 2
    row_default: Callable[[int], Values] | None = None
    rows_title: str | None = None
    """Rows inside an accordion of this title (else shown in the tab with Add/Remove buttons)."""
    advanced: tuple[str, ...] = ()
    """Controls shown in a closed accordion."""
    export: bool = False
    """The tab offers Export (``composer.engine.export``)."""


@dataclass(frozen=True)
class Method:
    """One composition method. ``experts`` is how many experts it takes (low, high)."""

    name: str
    summary: str
    experts: tuple[int, int]
    run: Callable
    """``run(job) -> Result`` (``composer.methods.sampling``): sample the recipe's images."""
    section: type | None = None
    """The dataclass of its recipe section (the section's key is the method's name)."""
    parse_section: Callable | None = None
    """``parse_section(fields, n_experts) -> section`` with ``composer.recipe.Fields``."""
    section_json: Callable[[Any], dict] = asdict
    check: Callable | None = None
    """``check(recipe)``: raise ``RecipeError`` for what the whole recipe may not combine; the
    engine asks before any model is loaded (a recipe that does not run still parses, so a page
    or a PNG can show it)."""
    models: Callable[[Any], Mapping[str, str]] = field(default=lambda recipe: {})
    """Model references beyond the experts', by recipe field (``{"merge.base": "toy-base"}``)."""
    references: Callable[[Any], list[tuple[str, str, str]]] = field(default=lambda recipe: [])
    """Other references the recipe names: ``(kind, reference, field)`` (an aggregator)."""
    place: Callable[[Any], dict[str, str]] | None = None
    """``place(recipe)``: model reference → device for models that go on a device of their own
    (superposition experts over several GPUs, ``composer.serve.placement``); ``{}`` or ``None``:
    every model on the default device."""
    unet_calls: Callable[[Any], int] = field(default=lambda recipe: 1)
    """U-Net passes per step per image (CFG aside), for the ZeroGPU time estimate."""
    extra_seconds: Callable[[Any], float] = field(default=lambda recipe: 0.0)
    """GPU seconds besides sampling (a live merge), for the ZeroGPU time estimate."""
    export: Callable | None = None
    """``export(recipe, out, dtype) -> dict``: write the recipe's model as one checkpoint."""
    sampler: str | None = None
    """What PNG info shows as ``Sampler`` when the method samples with steps of its own rather
    than the recipe's scheduler."""
    labels: Callable[[Any], list[str] | None] = field(default=lambda recipe: None)
    """Names of the lines of its per-step weights (κ) plot; ``None``: one per expert."""
    form: Form | None = None

    def settings(self, recipe) -> Any:
        """The recipe's section for this method, or its defaults when the recipe has none."""
        given = recipe.sections.get(self.name)
        return given if given is not None or self.section is None else self.section()
