import json
import math
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import gradio as gr
import pytest
from PIL import Image

from composer import registry
from composer.methods.aggregate import aggregator_experts
from composer.methods.superpose import PAGE_EXPERTS, bias_of, shares_of
from composer.recipe import RecipeError, parse
from composer.sharing.links import decode_recipe
from composer.sharing.pnginfo import read_recipe
from composer.sharing.store import Store
from ui import form, handlers, maps, views
from ui.handlers import OUTPUT_DIR
from ui.page import build


def recipe_json(model, **sampler):
    return json.dumps(
        {
            "prompt": "a red circle",
            "negative_prompt": "blue",
            "experts": [{"model": model, "loras": []}],
            "sampler": {
                "scheduler": "Euler a",
                "steps": 3,
                "guidance_scale": 4.5,
                "seed": 11,
                "width": None,
                "height": None,
                "num_images": 2,
                **sampler,
            },
        }
    )


def test_controls_and_recipe_convert_both_ways(tiny_sd1, tiny_lora):
    recipe = parse(
        {
            "prompt": "a",
            "negative_prompt": "b",
            "experts": [{"model": tiny_sd1, "loras": [{"path": tiny_lora, "weight": 0.5}]}],
            "sampler": {
                "scheduler": "dpmpp_2m_karras",
                "steps": 7,
                "guidance_scale": 3,
                "seed": 5,
                "width": 32,
                "height": 48,
                "num_images": 3,
            },
        }
    )
    values = form.from_recipe(recipe)
    assert set(values) <= set(form.names())
    assert parse(form.to_recipe(values)) == recipe


@pytest.mark.parametrize(
    "superpose",
    [
        {"mode": "or", "temperature": 0.5, "bias": [0.0, math.log(3), 0.25]},
        {"mode": "and", "temperature": 1.0, "bias": None},
        {"mode": "or", "temperature": None, "bias": None},  # follows the guidance scale
        {"mode": "joint", "temperature": 1.0, "bias": [0.3, -1.7, 2.0]},
    ],
)
def test_superpose_controls_and_recipe_convert_both_ways(
    tiny_sd1, tiny_sd1_other, tiny_lora, superpose
):
    recipe = parse(
        {
            "prompt": "main",
            "method": "superpose",
            "experts": [
                {"model": tiny_sd1, "loras": [{"path": tiny_lora, "weight": 0.7}]},
                {"model": tiny_sd1_other, "prompt": "second"},
                {"model": tiny_sd1_other, "prompt": "third"},
            ],
            "superpose": superpose,
            "sampler": {"steps": 9, "seed": 4, "num_images": 2},
        }
    )
    named = form.from_recipe(recipe)
    assert named["method"] == "superpose" and named["superpose.shown"] == 3
    assert named["superpose.1.prompt"] == "second" and named["superpose.0.prompt"] == ""
    assert named["superpose.temperature_cfg"] is (superpose["temperature"] is None)
    assert parse(form.to_recipe(named)) == recipe  # the exact bias survives the round trip


@pytest.mark.parametrize("aggregator", [None, "toy-warm-cool"])
def test_aggregate_controls_and_recipe_convert_both_ways(tiny_sd1, tiny_sd1_other, aggregator):
    recipe = parse(
        {
            "prompt": "a red circle and a blue square",
            "method": "aggregate",
            "experts": [{"model": tiny_sd1}, {"model": tiny_sd1_other}, {"model": tiny_sd1}],
            "aggregate": {"aggregator": aggregator},
            "sampler": {"steps": 7, "seed": 2, "width": 64, "height": 32},
        }
    )
    named = form.from_recipe(recipe)
    assert named["method"] == "aggregate" and named["aggregate.shown"] == 3
    assert named["aggregate.2.model"] == tiny_sd1
    assert parse(form.to_recipe(named)) == recipe
    # each expert's own prompt (a part of the picture) has a box on the tab too
    parts = parse({**recipe.to_dict(), "experts": [
        {"model": tiny_sd1, "prompt": "a red circle"}, {"model": tiny_sd1_other}]})  # fmt: skip
    assert form.fits(parts)
    named = form.from_recipe(parts)
    assert named["aggregate.0.prompt"] == "a red circle" and named["aggregate.1.prompt"] == ""
    assert parse(form.to_recipe(named)) == parts
    star = {"model": tiny_sd1, "loras": [{"path": "toy-star"}]}
    with_lora = parse({**recipe.to_dict(), "experts": [star, {"model": tiny_sd1_other}]})
    assert not form.fits(with_lora)


def test_choosing_the_bundled_aggregator_fills_in_its_experts():
    updates = handlers.fill_rows("aggregate", aggregator_experts("toy-warm-cool"), 3)
    assert updates["aggregate.shown"] == 2
    rows = [updates[f"aggregate.row{k}"] for k in range(PAGE_EXPERTS)]
    assert [r["visible"] for r in rows] == [True, True, False, False]
    assert [updates[f"aggregate.{k}.model"] for k in range(2)] == ["toy-warm", "toy-cool"]
    assert handlers.fill_rows("aggregate", aggregator_experts(""), 3) == {}  # rows stay


def test_target_shares_are_the_exponentiated_bias():
    assert shares_of([0.0, math.log(3)]) == [1.0, 3.0]
    assert shares_of([2.0, 2.0]) == [1.0, 1.0]
    # an edited share replaces the restored bias; equal shares mean no bias
    assert bias_of([1.0, 3.0], [0.0, 0.5]) == pytest.approx([0.0, math.log(3)])
    assert bias_of([2.0, 2.0], None) is None
    assert bias_of(shares_of([0.1, 0.9]), [0.1, 0.9]) == [0.1, 0.9]


def test_a_zero_share_is_refused_by_the_recipe_parser(tiny_sd1):
    recipe = parse(
        {
            "prompt": "a",
            "method": "superpose",
            "experts": [{"model": tiny_sd1}, {"model": tiny_sd1, "prompt": "b"}],
        }
    )
    named = form.from_recipe(recipe)
    named["superpose.1.share"] = 0.0
    with pytest.raises(RecipeError, match=r"superpose\.bias"):
        parse(form.to_recipe(named))


@pytest.fixture(scope="module")
def served():
    from gradio_client import Client

    demo = build().demo
    demo.queue()
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=None,
        allowed_paths=[str(OUTPUT_DIR)],
        quiet=True,
    )
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_generate_endpoint_returns_pngs_that_carry_their_recipe(served, tiny_sd1):
    gallery, recipe_text, status, _plot = served.predict(
        recipe_json(tiny_sd1), api_name="/generate"
    )
    assert len(gallery) == 2 and "2 image(s)" in status
    assert json.loads(recipe_text)["sampler"]["scheduler"] == "euler_a"
    second = read_recipe(gallery[1]["image"])  # the recipe of the batch it was made in
    assert (second.sampler.seed, second.sampler.batch_size) == (11, 2)
    assert second.prompt == "a red circle"
    with Image.open(gallery[1]["image"]) as im:
        assert im.format == "PNG" and "Sampler: Euler a" in im.info["parameters"]
        assert "Seed: 12, " in im.info["parameters"]


def test_bad_request_is_an_error_message_and_the_server_stays_up(served, tiny_sd1):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"sampler\.steps: 0 is not accepted"):
        served.predict(recipe_json(tiny_sd1, steps=0), api_name="/generate")
    with pytest.raises(AppError, match="unknown model"):
        served.predict(recipe_json("nothing-here"), api_name="/generate")
    gallery, *_ = served.predict(recipe_json(tiny_sd1, num_images=1), api_name="/generate")
    assert len(gallery) == 1


def test_aggregate_generation_shows_the_maps_beside_the_image(tiny_sd1, tiny_sd1_other):
    recipe = {
        "prompt": "a red circle",
        "method": "aggregate",
        "experts": [{"model": tiny_sd1}, {"model": tiny_sd1_other}],
        "sampler": {"steps": 2, "num_images": 2},
    }
    result = handlers.run_recipe(json.dumps(recipe))
    gallery, status, kappas = result["gallery"], result["status"], result["kappas"]
    assert len(gallery) == 2 and "2 image(s)" in status
    assert result["plot"]["visible"] is False
    view, caption = views.maps_picture(kappas, 1)
    assert view["visible"] is True and caption["visible"] is True
    assert "mid" in caption["value"] and "50% at mid" in caption["value"]
    picture = view["value"]
    image_side, title = 256, maps.TITLE_HEIGHT  # 16-pixel images are shown 16× larger
    assert picture.size == (5 * image_side + 4 * 2, image_side + title)
    assert all(part["visible"] is False for part in views.maps_picture(None))


def test_superpose_endpoint_returns_kappa_per_step_for_the_plot(served, tiny_sd1):
    text = json.dumps(
        {
            "prompt": "a red circle",
            "method": "superpose",
            "experts": [{"model": tiny_sd1}, {"model": tiny_sd1, "prompt": "a blue square"}],
            "superpose": {"mode": "or", "bias": [0.0, 1.0]},
            "sampler": {"steps": 4, "seed": 2, "num_images": 2},
        }
    )
    gallery, _, _status, plot = served.predict(text, api_name="/generate")
    assert len(gallery) == 2
    with Image.open(gallery[0]["image"]) as im:
        assert "SuperDiff" in im.info["parameters"]
    rows = plot["value"]["data"]
    columns = plot["value"]["columns"]
    table = [dict(zip(columns, row, strict=True)) for row in rows]
    assert sorted({r["step"] for r in table}) == [1, 2, 3, 4]
    for step in range(1, 5):
        kappas = [r["kappa"] for r in table if r["step"] == step]
        assert len(kappas) == 2 and sum(kappas) == pytest.approx(1.0, abs=1e-6)
    # step 1 is decided before any density is accumulated: κ = softmax(bias)
    first = [r["kappa"] for r in table if r["step"] == 1]
    assert first == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], abs=1e-6)


def test_dropped_png_restores_every_control(served, tiny_sd1):
    gallery, *_ = served.predict(recipe_json(tiny_sd1), api_name="/generate")
    with Image.open(gallery[0]["image"]) as im:
        im.load()
        values = handlers.restore_from_png(im)
    shown, tab = values["recipe_box"], values["tabs"]
    assert tab["selected"] == "single"
    restored = parse(form.to_recipe(values))
    assert restored == read_recipe(gallery[0]["image"])
    assert json.loads(shown)["sampler"]["seed"] == 11


def test_png_without_recipe_is_a_gradio_error():
    import gradio as gr

    with pytest.raises(gr.Error, match="carries no"):
        handlers.restore_from_png(Image.new("RGB", (8, 8)))


def test_a_recipe_the_controls_cannot_show_goes_to_the_recipe_panel(tiny_sd1):

    text = json.dumps(
        {
            "prompt": "a",
            "method": "superpose",
            "experts": [{"model": tiny_sd1, "prompt": str(k)} for k in range(PAGE_EXPERTS + 1)],
        }
    )
    values = handlers.restore_from_recipe(text)
    assert not set(values) & set(form.names())  # every control stays as it was
    assert json.loads(values["recipe_box"])["method"] == "superpose"


def test_merge_controls_and_recipe_convert_both_ways(tiny_sd1, tiny_sd1_other):
    recipe = parse(
        {
            "prompt": "merged",
            "method": "merge",
            "experts": [
                {"model": tiny_sd1, "weight": 0.7},
                {"model": tiny_sd1_other, "weight": 0.3},
                {"model": tiny_sd1_other, "weight": -0.2},
            ],
            "merge": {
                "method": "dare_ties",
                "base": tiny_sd1,
                "density": 0.35,
                "lambda": 1.25,
                "seed": 9,
                "block_weights": [1.0, 0.5] + [0.0] * 8,
                "sign_rule": "count",
                "trim_scope": "model",
            },
            "sampler": {"steps": 3, "seed": 1, "num_images": 1},
        }
    )
    named = form.from_recipe(recipe)
    assert named["merge.shown"] == 3 and named["merge.block_weights"].startswith("1, 0.5, 0")
    assert parse(form.to_recipe(named)) == recipe


def test_merge_tab_exports_a_file_that_loads_as_a_model(tiny_sd1, tiny_sd1_other):
    from safetensors import safe_open

    recipe = parse(
        {
            "prompt": "merged",
            "method": "merge",
            "experts": [{"model": tiny_sd1}, {"model": tiny_sd1_other}],
            "merge": {"method": "weighted_sum"},
        }
    )
    path = handlers.export(form.from_recipe(recipe))
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["composer_recipe"])["method"] == "merge"
        assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
    assert parse({"prompt": "a", "experts": [{"model": path}]}, check=registry.check_reference)


def test_share_endpoint_stores_the_generation_and_its_link_opens_it(
    served, tiny_sd1, tmp_path, monkeypatch
):
    monkeypatch.setenv("COMPOSER_DATA", str(tmp_path))  # read per request, by the server too
    gallery, recipe_text, *_ = served.predict(recipe_json(tiny_sd1), api_name="/generate")
    link, stateless = served.predict(False, api_name="/share")
    made = [Path(item["image"]).read_bytes() for item in gallery]
    assert link.startswith(served.src.rstrip("/") + "/?id=")
    share_id = parse_qs(urlsplit(link).query)["id"][0]
    entry = Store(tmp_path).open(share_id)
    assert entry.pngs == tuple(made) and entry.recipe == parse(recipe_text)
    assert decode_recipe(parse_qs(urlsplit(stateless).query)["recipe"][0]) == entry.recipe

    page = handlers.open_link({"id": share_id})
    assert parse(form.to_recipe(page)) == entry.recipe
    shown, status, last, rerun_recipe = (page[k] for k in ("gallery", "status", "last",
                                                           "rerun_recipe"))  # fmt: skip
    assert [Path(path).read_bytes() for path, _ in shown] == made
    assert share_id in status and last["paths"] == [path for path, _ in shown]

    again = handlers.run_recipe(rerun_recipe)["gallery"]
    assert [pixels(path) for path, _ in again] == [pixels(path) for path, _ in shown]


def pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_share_before_any_generation_is_an_error_message(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Nothing to share yet: generate first"):
        Client(served.src, verbose=False).predict(False, api_name="/share")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"id": "../x"}, "share id: '../x' is not accepted"),
        ({"id": "AAAAAAAAAAAA"}, "no shared generation has the id"),
        ({"recipe": "%%%"}, "recipe link: '%%%' is not accepted"),
    ],
)
def test_a_link_that_cannot_be_opened_is_a_status_message(query, message, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSER_DATA", str(tmp_path))
    page = handlers.open_link(query)
    assert not set(page) & {*form.names(), "gallery", "recipe_box"}  # nothing else changes
    assert page["status"].startswith("This link cannot be opened: ")
    assert message in page["status"]
    assert page["rerun"] == gr.update(visible=False)


def test_the_shared_panel_lists_listed_generations_newest_first_and_opens_them(
    tmp_path, monkeypatch
):
    from io import BytesIO

    monkeypatch.setenv("COMPOSER_DATA", str(tmp_path))

    def saved(prompt: str, listed: bool) -> tuple[str, bytes]:
        buf = BytesIO()
        Image.new("RGB", (8, 8), (len(prompt), 0, 0)).save(buf, format="PNG")
        text = json.dumps({"prompt": prompt, "experts": [{"model": "toy-warm"}]})
        return Store().save(text, [buf.getvalue()], listed=listed), buf.getvalue()

    first, _ = saved("a red circle", listed=True)
    saved("not listed", listed=False)
    last, last_png = saved("a blue square", listed=True)
    items, ids = handlers.list_shared()
    assert ids == [last, first]
    assert [caption for _, caption in items] == ["single: a blue square", "single: a red circle"]
    assert Path(items[0][0]).read_bytes() == last_png

    page = handlers.open_entry(ids[1])
    assert parse(form.to_recipe(page)).prompt == "a red circle"
    assert first in page["status"]


def test_stop_ends_a_run_inside_a_unet_pass_and_says_how_far_it_got(tiny_sd1):
    """The cancel flag is checked before every block of the U-Net, not only between steps: a
    flag set during step 3's pass ends the run before step 3 finishes, and the hooks are gone
    afterwards."""
    from composer import engine
    from composer.registry import CACHE, resolve_model

    recipe = parse(recipe_json(tiny_sd1, steps=10, num_images=1))
    cancel, passes, finished = threading.Event(), [], []
    with CACHE.lease(resolve_model(tiny_sd1)) as lease:
        unet = lease.pipe.unet
        before = sum(len(m._forward_pre_hooks) for m in unet.modules())

    def count(*_):
        passes.append(1)
        if len(passes) == 3:
            cancel.set()

    hook = unet.conv_in.register_forward_hook(count)
    try:
        with pytest.raises(engine.Cancelled):
            engine.generate(
                recipe, cancel=cancel, progress=lambda done, total: finished.append(done)
            )
    finally:
        hook.remove()
    assert finished == [1, 2] and len(passes) == 3
    assert sum(len(m._forward_pre_hooks) for m in unet.modules()) == before


def test_a_stopped_run_says_stopped_after_k_of_n_steps(tiny_sd1, monkeypatch):
    from composer import engine

    def stop_at_once(recipe, cancel=None, progress=None):
        progress(7, 30)
        raise engine.Cancelled([])

    monkeypatch.setattr(engine, "generate", stop_at_once)
    result = handlers.run_recipe(recipe_json(tiny_sd1, steps=10, num_images=3))
    assert result["status"] == "Stopped after 7 of 30 steps." and result["gallery"] == []


def test_sizes_far_above_the_models_own_ask_first_and_are_refused_past_the_limit():
    toy = {"prompt": "a red circle", "experts": [{"model": "toy-warm"}]}
    assert (
        handlers.size_refusal(parse({**toy, "sampler": {"width": 128, "height": 128}}), False) == ""
    )
    asks = handlers.size_refusal(parse({**toy, "sampler": {"width": 256, "height": 256}}), False)
    assert "64× the pixels of toy-warm's own 32×32" in asks and "Allow large sizes" in asks
    assert (
        handlers.size_refusal(parse({**toy, "sampler": {"width": 256, "height": 256}}), True) == ""
    )
    huge = handlers.size_refusal(parse({**toy, "sampler": {"width": 2048, "height": 2048}}), True)
    assert "4,096×" in huge and "at most 1,024×" in huge
    with pytest.raises(gr.Error, match="Allow large sizes"):
        handlers.run_recipe(json.dumps({**toy, "sampler": {"width": 512, "height": 512}}))


def test_a_page_error_goes_to_the_status_line_and_changes_no_control():
    page = build()
    call, _inputs, outputs = page.wire(handlers.restore_from_recipe, page.restored(),
                                       extra=["recipe_box"])  # fmt: skip
    updates = call(None, None, '{"prompt": "x", "experts": [{"modle": "toy-warm"}]}')
    shown = {name: updates[page.components[name]] for name in page.components
             if page.components[name] in updates}  # fmt: skip
    assert list(shown) == ["status"]
    assert 'unknown field "modle"; did you mean "model"?' in shown["status"]
    assert page.components["status"] in outputs


def test_set_controls_checks_models_like_a_run():
    with pytest.raises(gr.Error, match="nothing-here"):
        handlers.restore_from_recipe(
            json.dumps({"prompt": "x", "experts": [{"model": "nothing-here"}]})
        )


def test_an_exported_file_is_named_after_its_recipe():
    from ui.examples import EXAMPLES

    (_, merge), *_ = EXAMPLES["merge"]
    assert handlers.export_name(parse(merge)) == "merge-ties-toy-warm-toy-cool.safetensors"


def test_every_example_is_a_configuration_the_controls_show_and_the_parser_accepts():
    from composer import registry
    from ui.examples import EXAMPLES

    assert set(EXAMPLES) == set(form.forms())
    for examples in EXAMPLES.values():
        for _label, recipe in examples:
            parsed = parse(json.dumps(recipe), check=registry.check_reference)
            assert form.fits(parsed)
            assert parse(
                json.dumps(form.to_recipe({**form.defaults(), **form.from_recipe(parsed)}))
            )


def test_link_recipe_returns_a_link_that_carries_the_recipe_and_refuses_a_bad_one(served):
    """The ``link_recipe`` endpoint (an MCP tool): no session, nothing stored, a ``?recipe=``
    link whose recipe is the one sent; an unknown model is the parser's message."""
    from gradio_client.exceptions import AppError

    recipe = {"prompt": "a red circle", "experts": [{"model": "toy-warm"}], "sampler": {"seed": 7}}
    link = served.predict(json.dumps(recipe), api_name="/link_recipe")
    value = parse_qs(urlsplit(link).query)["recipe"][0]
    assert decode_recipe(value) == parse(recipe)
    with pytest.raises(AppError, match="no-such-model"):
        served.predict(json.dumps({**recipe, "experts": [{"model": "no-such-model"}]}),
                       api_name="/link_recipe")  # fmt: skip
