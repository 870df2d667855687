"""Diffusion Composer's page: the layout, and each event connected to its handler by name.

A tab per registered method with a page form (``ui.tabs``), the prompt and sampler controls
they share, the results column. Handlers (``ui.handlers``) take and return values by control
name; ``Page.wire`` turns names into components, so nothing here depends on the order of a list.
"""

from __future__ import annotations

import random

import gradio as gr

from composer.recipe import MAX_SEED
from ui import form, handlers, views
from ui.form import COMMON
from ui.tabs import component, method_tab

TITLE = (
    "# Diffusion Composer\nCombine Stable Diffusion checkpoints and LoRAs in one generation. "
    "Every image carries its recipe: drop it back here to restore it."
)


class Page:
    """The built page: ``components`` by name (controls, as in ``ui.form.names()``, and the
    page's own parts: ``gallery``, ``status``, ``recipe_box``, ``tabs``, ``<method>.row<k>``…)."""

    def __init__(self):
        self.components: dict[str, gr.components.Component] = {}
        self.demo = self._build()

    @property
    def controls(self) -> list:
        return [self.components[name] for name in form.names()]

    def wire(self, handler, outputs: list[str], values: bool = False, extra=()):
        """``handler``'s name-keyed result as component updates. With ``values`` it receives the
        controls' values by name first (the event's inputs: ``self.controls``), then ``extra``
        inputs' values."""
        out = self.components
        names = form.names()

        def call(*args, progress=gr.Progress(), request: gr.Request = None):
            if values:
                args = (dict(zip(names, args[: len(names)], strict=True)), *args[len(names) :])
            kwargs = {}
            code = handler.__code__.co_varnames[: handler.__code__.co_argcount]
            if "progress" in code:
                kwargs["progress"] = progress
            if "request" in code:
                kwargs["request"] = request
            return self.out(handler(*args, **kwargs), outputs)

        inputs = [*(self.controls if values else []), *(out[name] for name in extra)]
        return call, inputs, [out[name] for name in outputs]

    def _build(self) -> gr.Blocks:
        c = self.components
        start = form.defaults()
        with gr.Blocks(title="Diffusion Composer") as demo:
            gr.Markdown(TITLE)
            c["method"] = gr.State(start["method"])
            for name in ("kappas", "last", "rerun_recipe"):
                c[name] = gr.State(None)
            tabs = {}
            with gr.Row():
                with gr.Column(scale=5):
                    with gr.Tabs(selected="single") as c["tabs"]:
                        for method, method_form in form.forms().items():
                            tabs[method] = method_tab(method, method_form, start)
                            c.update(tabs[method].controls)
                            for k, row in enumerate(tabs[method].rows):
                                c[f"{method}.row{k}"] = row
                            if tabs[method].exported is not None:
                                c[f"{method}.exported"] = tabs[method].exported
                    self._common(start)
                with gr.Column(scale=6):
                    self._results()
            self._events(tabs, demo)
        return demo

    def _common(self, start: dict) -> None:
        c, by_name = self.components, {control.name: control for control in COMMON}
        c["prompt"] = component(by_name["prompt"], start["prompt"], lines=2)
        c["negative"] = component(by_name["negative"], start["negative"])
        with gr.Row():
            for name in ("scheduler", "steps", "cfg"):
                c[name] = component(by_name[name], start[name])
        with gr.Row():
            c["seed"] = component(by_name["seed"], start["seed"])
            c["dice"] = gr.Button("Random", scale=0, min_width=80)
            c["count"] = component(by_name["count"], start["count"])
            c["batch"] = component(by_name["batch"], start["batch"])
        with gr.Row():
            for name in ("width", "height"):
                c[name] = component(by_name[name], start[name])
        with gr.Row():
            c["go"] = gr.Button("Generate", variant="primary")
            c["halt"] = gr.Button("Stop", variant="stop")

    def _results(self) -> None:
        c = self.components
        c["gallery"] = gr.Gallery(
            label="Results",
            format="png",
            columns=4,
            height="auto",
            object_fit="contain",
            elem_id="results",
        )
        c["status"] = gr.Markdown("")
        with gr.Row():
            c["share"] = gr.Button("Share", size="sm")
            c["listed"] = gr.Checkbox(False, label="Also list it under Shared", scale=0)
            c["rerun"] = gr.Button("Re-run", size="sm", visible=False)
        with gr.Group(visible=False) as c["links"]:
            c["link"] = gr.Textbox(
                label="Link to this generation (recipe and images)",
                buttons=["copy"],
                interactive=False,
                elem_id="share-link",
            )
            c["stateless_link"] = gr.Textbox(
                label="Link with the recipe only (needs no storage on the server)",
                buttons=["copy"],
                interactive=False,
                elem_id="recipe-link",
            )
        c["plot"] = gr.LinePlot(
            x="step",
            y="kappa",
            color="expert",
            y_lim=[0, 1],
            y_title="κ (expert weight)",
            label="κ per step",
            visible=False,
            height=300,
        )
        c["maps"] = gr.Image(
            label="Aggregation maps", visible=False, format="png", interactive=False
        )
        c["dropped"] = gr.Image(
            type="pil",
            label="Drop a PNG made here to restore its recipe",
            sources=["upload"],
            format="png",
            height=160,
        )
        with gr.Accordion("Recipe", open=False):
            c["recipe_box"] = gr.Code(language="json", label="Recipe JSON", interactive=True)
            with gr.Row():
                c["show"] = gr.Button("Show recipe of the controls")
                c["apply"] = gr.Button("Set controls from this recipe")
                c["run_json"] = gr.Button("Generate from this recipe")
        with gr.Accordion("Shared", open=False) as c["shared_box"]:
            c["shared_gallery"] = gr.Gallery(
                label="Latest generations shared with “list it”; click one to open it",
                format="png",
                columns=6,
                height="auto",
                object_fit="contain",
                allow_preview=False,
            )
            c["shared_ids"] = gr.State([])

    def restored(self) -> list[str]:
        """Everything a restore may update: the controls, the Recipe panel, the tabs, the rows."""
        rows = [name for name in self.components if ".row" in name]
        return [*form.names(), "recipe_box", "tabs", *rows]

    def out(self, updates: dict, outputs: list[str]) -> dict:
        """Name-keyed updates → component-keyed, for the names among ``outputs``. Gradio reads an
        empty dict as one value, so "nothing changes" is an unchanged first output."""
        shown = {self.components[name]: v for name, v in updates.items() if name in outputs}
        return shown or {self.components[outputs[0]]: gr.update()}

    def _events(self, tabs: dict, demo: gr.Blocks) -> None:
        c, wire = self.components, self.wire
        results = list(handlers.RESULTS)
        job = c["go"].click(*wire(handlers.run_controls, results, values=True),
                            api_visibility="undocumented")  # fmt: skip
        job_json = c["run_json"].click(
            *wire(handlers.run_recipe, results, extra=["recipe_box"]), api_name="generate"
        )
        job_rerun = c["rerun"].click(*wire(handlers.run_recipe, results, extra=["rerun_recipe"]),
                                     api_visibility="undocumented")  # fmt: skip

        def stop(request: gr.Request):
            handlers.stop(request.session_hash)

        c["halt"].click(stop, None, None, cancels=[job, job_json, job_rerun], queue=False)
        for event in (job, job_json, job_rerun):
            event.then(views.maps_picture, [c["kappas"]], c["maps"], api_visibility="private")
        c["share"].click(
            handlers.share, [c["last"], c["listed"]], [c["link"], c["stateless_link"]],
            api_name="share",
        ).success(lambda: gr.update(visible=True), None, c["links"], queue=False,
                  api_visibility="private")  # fmt: skip
        c["gallery"].change(
            lambda: gr.update(visible=False),
            None,
            c["links"],
            queue=False,
            api_visibility="private",
        )  # the links belong to the images they were made for)
        opened = [*self.restored(), "gallery", "status", "last", "rerun_recipe", "rerun"]

        def open_link(request: gr.Request):
            return self.out(handlers.open_link(dict(request.query_params)), opened)

        def open_shared(ids: list[str], evt: gr.SelectData):
            return self.out(handlers.open_entry(ids[evt.index]), opened)

        c_opened = [c[name] for name in opened]
        demo.load(open_link, None, c_opened, api_visibility="undocumented")
        c["shared_box"].expand(handlers.list_shared, None, [c["shared_gallery"], c["shared_ids"]],
                               api_visibility="undocumented")  # fmt: skip
        c["shared_gallery"].select(open_shared, [c["shared_ids"]], c_opened,
                                   api_visibility="undocumented")  # fmt: skip
        c["gallery"].select(views.select_image, [c["kappas"]], [c["plot"], c["maps"]],
                            queue=False)  # fmt: skip
        c["dice"].click(lambda: random.randint(0, MAX_SEED), None, c["seed"], queue=False)
        c["show"].click(*wire(lambda v: {"recipe_box": handlers.current_recipe(v)},
                              ["recipe_box"], values=True), queue=False)  # fmt: skip
        restored = self.restored()
        c["apply"].click(*wire(handlers.restore_from_recipe, restored, extra=["recipe_box"]),
                         api_visibility="undocumented")  # fmt: skip
        c["dropped"].upload(*wire(handlers.restore_from_png, restored, extra=["dropped"]),
                            api_visibility="undocumented")  # fmt: skip
        for method, tab in tabs.items():
            self._tab_events(method, tab)

    def _tab_events(self, method: str, tab) -> None:
        c, wire = self.components, self.wire
        method_form = form.forms()[method]
        tab.tab.select(lambda m=method: m, None, c["method"], queue=False)
        rows = [f"{method}.row{k}" for k in range(method_form.rows)]
        shown = f"{method}.shown"
        if tab.add is not None:
            for button, delta in ((tab.add, 1), (tab.remove, -1)):
                button.click(
                    *wire(lambda n, d=delta: handlers.change_rows(method, n, d), [shown, *rows],
                          extra=[shown]), queue=False,
                )  # fmt: skip
        for control in method_form.controls:
            name = f"{method}.{control.name}"
            if control.enables:
                c[name].change(
                    lambda follows: gr.update(interactive=not follows), c[name],
                    c[f"{method}.{control.enables}"], queue=False, api_visibility="private",
                )  # fmt: skip
            if control.fills_rows is not None:
                targets = [shown, *rows, *(f"{method}.{k}.model" for k in range(len(rows)))]

                def fill(reference, n, fills=control.fills_rows):
                    return handlers.fill_rows(method, fills(reference), n)

                c[name].input(*wire(fill, targets, extra=[name, shown]), queue=False)
        if tab.export is not None:
            exported = f"{method}.exported"
            tab.export.click(
                *wire(lambda v: {exported: handlers.export(v)}, [exported], values=True),
                api_name=f"export_{method}",
            )


def build() -> Page:
    return Page()
