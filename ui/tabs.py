"""Gradio controls from the methods' form descriptions: one control per ``Control`` and one tab
per ``Form`` (its introduction, its own controls, its rows with Add/Remove, an accordion for the
advanced ones, Export where the method offers it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from composer import hosted, registry, zoo
from composer.methods import Control, Form
from ui.form import evaluated, shown_rows


def component(control: Control, value=None, label: str | None = None, **layout):
    """The Gradio control for ``control``, showing ``value`` (its default when ``None``)."""
    c = control
    value = evaluated(c.default) if value is None else value
    label = c.label if label is None else label
    info = {"info": c.info} if c.info else {}
    if c.kind in ("model", "lora", "aggregator"):
        names = list(registry.bundled(f"{c.kind}s"))
        if c.kind == "lora" and not hosted.active():  # the user's own folder, by name
            names += [n for n in zoo.user_files("loras") if n not in names]
        first = [None] if c.kind == "lora" else []
        choices = [*c.choices, *first, *names]
        return gr.Dropdown(
            choices, value=value, allow_custom_value=True, label=label, **info, **layout
        )
    if c.kind == "choice":
        return gr.Dropdown(list(c.choices), value=value, label=label, **info, **layout)
    if c.kind == "radio":
        return gr.Radio(list(c.choices), value=value, label=label, **info, **layout)
    if c.kind == "slider":
        return gr.Slider(c.low, c.high, value=value, step=c.step, label=label, **info, **layout)
    if c.kind in ("number", "integer"):
        precision = {"precision": 0} if c.kind == "integer" else {}
        return gr.Number(
            value, label=label, minimum=c.low, maximum=c.high, **precision, **info, **layout
        )
    if c.kind == "text":
        return gr.Textbox(value, label=label, **info, **layout)
    if c.kind == "check":
        return gr.Checkbox(value, label=label, **info, **layout)
    if c.kind == "state":
        return gr.State(value)
    raise ValueError(f"control {c.name!r}: unknown kind {c.kind!r}")


@dataclass
class Tab:
    """What ``method_tab`` made: the tab, its controls by name, its row groups and buttons."""

    tab: gr.Tab
    controls: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    add: gr.Button | None = None
    remove: gr.Button | None = None
    export: gr.Button | None = None
    exported: gr.File | None = None
    examples: list = field(default_factory=list)
    """One button per example (``ui.examples``), in order."""


def method_tab(method: str, form: Form, values: dict, examples: list[str] = ()) -> Tab:
    """The tab of ``method``; ``values`` are the controls' starting values by name
    (``ui.form.defaults``); ``examples`` the labels of its example buttons. Must be called
    inside ``gr.Tabs``."""
    with gr.Tab(form.tab, id=method) as tab:
        made = Tab(tab)
        if form.intro:
            gr.Markdown(form.intro)
        if examples:
            with gr.Row(elem_classes="examples"):
                gr.Markdown("**Try:**", container=False)
                made.examples = [
                    gr.Button(label, size="sm", elem_classes="example", scale=0)
                    for label in examples
                ]
        plain = [c for c in form.controls if c.name not in form.advanced]
        _controls(method, plain, values, made)
        if form.row:
            if form.rows_title:
                with gr.Accordion(form.rows_title, open=False):
                    _rows(method, form, values, made)
            else:
                _rows(method, form, values, made)
        advanced = [c for c in form.controls if c.name in form.advanced]
        if advanced:
            with gr.Accordion("More options", open=False):
                _controls(method, advanced, values, made)
        if form.export:
            with gr.Row():
                made.export = gr.Button("Export .safetensors", size="sm")
                made.exported = gr.File(label="Exported checkpoint", elem_id=f"{method}-exported")
    return made


def _controls(method: str, controls: list[Control], values: dict, made: Tab) -> None:
    shown = [c for c in controls if c.kind != "state"]
    for c in controls:
        if c.kind == "state":
            made.controls[f"{method}.{c.name}"] = component(c, values[f"{method}.{c.name}"])
    for start in range(0, len(shown), 3):
        with gr.Row():
            for c in shown[start : start + 3]:
                name = f"{method}.{c.name}"
                enabled = {}
                if any(o.enables == c.name for o in controls):
                    toggle = next(o for o in controls if o.enables == c.name)
                    enabled = {"visible": not values[f"{method}.{toggle.name}"]}
                made.controls[name] = component(c, values[name], **enabled)


def _rows(method: str, form: Form, values: dict, made: Tab) -> None:
    visible = values.get(f"{method}.shown", form.rows)
    for k in range(form.rows):
        with gr.Group(visible=k < visible) as group, gr.Row():
            for c in form.row:
                name = f"{method}.{k}.{c.name}"
                label = f"{c.label} {k + 1}" if c.kind in ("model", "lora") else None
                made.controls[name] = component(c, values[name], label=label)
        made.rows.append(group)
    if shown_rows(form):
        made.controls[f"{method}.shown"] = gr.State(visible)
        with gr.Row():
            made.add = gr.Button("Add expert", size="sm")
            made.remove = gr.Button("Remove expert", size="sm")
