"""Diffusion Composer's page: the layout, and each event connected to its handler by name.

A tab per registered method with a page form (``ui.tabs``), the prompt and sampler controls
they share, the results column. Handlers (``ui.handlers``) take and return values by control
name; ``Page.wire`` turns names into components, so nothing here depends on the order of a list.
"""

from __future__ import annotations

import json
import os
import random
from importlib.util import find_spec

import gradio as gr

from composer.recipe import MAX_SEED, parse
from ui import form, handlers, views
from ui.examples import EXAMPLES
from ui.form import COMMON
from ui.tabs import component, method_tab

TITLE = (
    "# Diffusion Composer\nCombine Stable Diffusion checkpoints and LoRAs in one generation. "
    "Every image carries its recipe: drop it back here to restore it."
)
CSS = """
#results img, #maps img, #shared img { image-rendering: pixelated; }
#results .thumbnail-item { min-width: 128px; min-height: 128px; }
#kappa-plot { overflow: visible; }
#kappa-plot .vega-embed { width: 100%; }
#status { min-height: 1.5em; }
"""
"""The page's own styles, for ``launch(css=...)``: tiny results (32 px) drawn with square pixels
instead of blurred when the browser enlarges them."""

MAX_UPLOAD = os.environ.get("COMPOSER_MAX_UPLOAD", "20mb")
"""The largest file the page accepts (a dropped PNG is a few hundred KB); Gradio refuses larger
uploads with HTTP 413 before they reach the disk."""


def launch_options() -> dict:
    """``demo.launch`` arguments that every way of starting the page shares (``app.py``, the
    tests): the one folder files are served from, the page's styles, the upload limit, and an
    MCP server where the ``mcp`` package is installed (``pip install "gradio[mcp]"``): the
    documented endpoints (``PUBLIC_API``) become tools for assistants."""
    return {
        "allowed_paths": [str(handlers.OUTPUT_DIR)],
        "css": CSS,
        "max_file_size": MAX_UPLOAD,
        "mcp_server": find_spec("mcp") is not None,
    }


PUBLIC_API = ("generate", "link_recipe", "export_merge")
"""The endpoints documented for clients (the "Use via API" page) and, with the ``mcp`` package,
offered to assistants as MCP tools. Every other event stays callable but undocumented: among
them ``share``, which ``gradio_client`` calls in the session of its ``generate`` (README); an MCP
call has no session, so it shares with ``link_recipe`` instead."""


class Page:
    """The built page: ``components`` by name (controls, as in ``ui.form.names()``, and the
    page's own parts: ``gallery``, ``status``, ``recipe_box``, ``tabs``, ``<method>.row<k>``…)."""

    def __init__(self):
        self.components: dict[str, gr.components.Component] = {}
        self.demo = self._build()
        for fn in self.demo.fns.values():  # the page's own plumbing is not an API (nor MCP tool)
            if fn.api_visibility == "public" and fn.api_name not in PUBLIC_API:
                fn.api_visibility = "undocumented"
            elif fn.api_visibility == "public" and fn.fn is not None:
                fn.fn.__name__ = fn.api_name  # the MCP tool's name (Gradio takes the function's)

    @property
    def controls(self) -> list:
        return [self.components[name] for name in form.names()]

    def wire(self, handler, outputs: list[str], values: bool = False, extra=(), api=False):
        """``handler``'s name-keyed result as component updates. With ``values`` it receives the
        controls' values by name first (the event's inputs: ``self.controls``), then ``extra``
        inputs' values. A ``gr.Error`` it raises goes to the status line and a toast, and
        nothing else changes (Gradio would paint every output, inputs among them, with an
        "Error" badge); with ``api`` it stays an error, for API clients."""
        out = self.components
        names = form.names()
        if not api and "status" not in outputs:
            outputs = [*outputs, "status"]

        # Gradio injects the request and the progress tracker only into positional parameters
        def call(request: gr.Request, progress=gr.Progress(), *args):
            if values:
                args = (dict(zip(names, args[: len(names)], strict=True)), *args[len(names) :])
            kwargs = {}
            code = handler.__code__.co_varnames[: handler.__code__.co_argcount]
            if "progress" in code:
                kwargs["progress"] = progress
            if "request" in code:
                kwargs["request"] = request
            if api:
                return self.out(handler(*args, **kwargs), outputs)
            try:
                return self.out(handler(*args, **kwargs), outputs)
            except gr.Error as e:
                gr.Warning(e.message, duration=15)
                return self.out({"status": f"⚠️ {e.message}"}, outputs)

        call.__doc__ = handler.__doc__  # what the API page and MCP clients read
        inputs = [*(self.controls if values else []), *(out[name] for name in extra)]
        return call, inputs, [out[name] for name in outputs]

    def _build(self) -> gr.Blocks:
        c = self.components
        start = form.defaults()
        keep = (3600, int(handlers.OUTPUT_KEEP_S))  # Gradio's copies of served files, hourly
        with gr.Blocks(title="Diffusion Composer", delete_cache=keep) as demo:
            gr.Markdown(TITLE)
            c["method"] = gr.State(start["method"])
            for name in ("kappas", "last", "rerun_recipe"):
                c[name] = gr.State(None)
            tabs = {}
            with gr.Row():
                with gr.Column(scale=5):
                    with gr.Tabs(selected="single") as c["tabs"]:
                        for method, method_form in form.forms().items():
                            labels = [label for label, _ in EXAMPLES.get(method, [])]
                            tabs[method] = method_tab(method, method_form, start, labels)
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
            c["allow_large"] = gr.Checkbox(
                False,
                label="Allow large sizes",
                info=f"above {handlers.ASK_FACTOR}× the model's own pixels",
                scale=0,
                min_width=160,
            )
        with gr.Row():
            c["go"] = gr.Button("Generate", variant="primary", elem_id="generate")
            c["halt"] = gr.Button("Stop", variant="stop", elem_id="stop")
            c["api_generate"] = gr.Button(visible=False)
            c["link_recipe"] = gr.Button(visible=False)  # API only (handlers.link_recipe)
            c["link_out"] = gr.Textbox(visible=False)

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
        c["status"] = gr.Markdown("", elem_id="status")
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
            color_title="expert",
            label="κ per step",
            visible=False,
            elem_id="kappa-plot",
        )
        c["maps"] = gr.Image(
            label="Aggregation maps",
            visible=False,
            format="png",
            interactive=False,
            elem_id="maps",
            buttons=["download"],
        )
        c["maps_caption"] = gr.Markdown("", visible=False, elem_id="maps-caption")
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
        with gr.Accordion("Comparison grid", open=False):
            gr.Markdown(
                "The controls' recipe over one or two fields' values: one labelled picture, "
                "and each cell's PNG with its own recipe."
            )
            with gr.Row():
                c["grid_x"] = gr.Textbox(
                    label="X: field=values", placeholder="merge.density=0.2,0.5,0.8",
                    elem_id="grid-x",
                )  # fmt: skip
                c["grid_y"] = gr.Textbox(
                    label="Y: field=values (optional)", placeholder="sampler.seed=1,2,3",
                    elem_id="grid-y",
                )  # fmt: skip
            c["grid_go"] = gr.Button("Make grid", size="sm", elem_id="grid-go")
            c["grid_picture"] = gr.Image(
                label="Grid", format="png", interactive=False, elem_id="grid-picture"
            )
            c["grid_files"] = gr.File(label="Cells (PNG with recipe)", file_count="multiple")
        with gr.Accordion("Shared", open=False) as c["shared_box"]:
            c["shared_gallery"] = gr.Gallery(
                label="Latest generations shared with “list it”; click one to open it",
                format="png",
                columns=8,
                height=160,
                object_fit="contain",
                allow_preview=False,
                elem_id="shared",
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

        def arm(request: gr.Request):
            handlers.arm(request.session_hash)

        jobs = []
        for button, handler, extra, values in (
            ("go", handlers.run_controls, ["allow_large"], True),
            ("run_json", handlers.run_recipe, ["recipe_box", "allow_large"], False),
            ("rerun", handlers.run_recipe, ["rerun_recipe", "allow_large"], False),
        ):
            c[button].click(arm, None, None, queue=False, api_visibility="private")
            jobs.append(
                c[button].click(
                    *wire(handler, results, values=values, extra=extra), api_visibility="private"
                )
            )
        jobs.append(
            c["api_generate"].click(
                *wire(handlers.run_recipe, results, extra=["recipe_box"], api=True),
                api_name="generate",
                api_description=(
                    "Generate images from a recipe (JSON: prompt, experts with models and LoRAs, "
                    "method, sampler; the format is ../shared/RECIPE.md). Returns the images, the "
                    "recipe as run, a status line and per-image traces."
                ),
            )
        )

        def stop(request: gr.Request):
            handlers.stop(request.session_hash)

        # Stop sets the run's cancel flag, which the U-Net's blocks check (``composer.methods
        # .batches.stop_inside``): the run itself ends within a block and says how far it got.
        # ``cancels=`` would only drop its answer and leave the page blank (gradio#7593).
        c["halt"].click(stop, None, None, queue=False, api_visibility="private")
        shown_maps = [c["maps"], c["maps_caption"]]
        for event in jobs:
            event.then(views.maps_picture, [c["kappas"]], shown_maps, api_visibility="private")
        c["link_recipe"].click(
            handlers.link_recipe, [c["recipe_box"]], [c["link_out"]], api_name="link_recipe",
            api_description="The ?recipe= share link of a recipe (JSON): it opens the page with "
            "the recipe's controls set, and Re-run makes the same images. Stores nothing.",
        )  # fmt: skip
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
        opened = [*self.restored(), "gallery", "status", "last", "rerun_recipe", "rerun",
                  "kappas", "plot"]  # fmt: skip

        def open_link(request: gr.Request):
            return self.out(handlers.open_link(dict(request.query_params)), opened)

        def open_shared(ids: list[str], evt: gr.SelectData):
            return self.out(handlers.open_entry(ids[evt.index]), opened)

        c_opened = [c[name] for name in opened]
        demo.load(open_link, None, c_opened, api_visibility="undocumented").then(
            views.maps_picture, [c["kappas"]], shown_maps, api_visibility="private"
        )
        c["shared_box"].expand(handlers.list_shared, None, [c["shared_gallery"], c["shared_ids"]],
                               api_visibility="undocumented")  # fmt: skip
        c["shared_gallery"].select(open_shared, [c["shared_ids"]], c_opened,
                                   api_visibility="undocumented").then(
            views.maps_picture, [c["kappas"]], shown_maps, api_visibility="private"
        )  # fmt: skip
        c["gallery"].select(views.select_image, [c["kappas"]], [c["plot"], *shown_maps],
                            queue=False)  # fmt: skip
        c["dice"].click(lambda: random.randint(0, MAX_SEED), None, c["seed"], queue=False)
        c["show"].click(*wire(lambda v: {"recipe_box": handlers.current_recipe(v)},
                              ["recipe_box"], values=True), queue=False)  # fmt: skip
        restored = [*self.restored(), "status"]
        c["apply"].click(*wire(handlers.restore_from_recipe, restored, extra=["recipe_box"]),
                         api_visibility="undocumented")  # fmt: skip
        c["dropped"].upload(*wire(handlers.restore_from_png, restored, extra=["dropped"]),
                            api_visibility="undocumented")  # fmt: skip
        c["grid_go"].click(
            *wire(handlers.make_grid, ["grid_picture", "grid_files"], values=True,
                  extra=["grid_x", "grid_y"]), api_visibility="private",
        )  # fmt: skip
        for method, tab in tabs.items():
            self._tab_events(method, tab)
            for button, (label, recipe) in zip(tab.examples, EXAMPLES.get(method, []),
                                               strict=True):  # fmt: skip
                example = json.dumps(recipe)

                def set_example(example=example, label=label):
                    return {"status": f"Example set: {label}. Press Generate.",
                            **handlers.restore(parse(example))}  # fmt: skip

                button.click(*wire(set_example, restored), queue=False,
                             api_visibility="private")  # fmt: skip

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
                    lambda follows: gr.update(visible=not follows), c[name],
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
                api_description=f"Export the {method} tab's merge as one fp16 .safetensors "
                "checkpoint named after its recipe; returns the file.",
            )


def build() -> Page:
    return Page()
