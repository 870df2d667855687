import json

import pytest
from PIL import Image

import app
from composer.pnginfo import read_recipe
from composer.recipe import parse


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
    app.build()
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
    values = app.control_values(recipe)
    assert len(values) == len(app.CONTROLS)
    assert parse(app.recipe_dict(*values)) == recipe


@pytest.fixture(scope="module")
def served():
    from gradio_client import Client

    demo = app.build()
    demo.queue()
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=None,
        allowed_paths=[str(app.OUTPUT_DIR)],
        quiet=True,
    )
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_generate_endpoint_returns_pngs_that_carry_their_recipe(served, tiny_sd1):
    gallery, recipe_text, status = served.predict(recipe_json(tiny_sd1), api_name="/generate")
    assert len(gallery) == 2 and "2 image(s)" in status
    assert json.loads(recipe_text)["sampler"]["scheduler"] == "euler_a"
    second = read_recipe(gallery[1]["image"])
    assert second.sampler.seed == 12 and second.prompt == "a red circle"
    with Image.open(gallery[1]["image"]) as im:
        assert im.format == "PNG" and "Sampler: Euler a" in im.info["parameters"]


def test_bad_request_is_an_error_message_and_the_server_stays_up(served, tiny_sd1):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"sampler\.steps: 0 is not accepted"):
        served.predict(recipe_json(tiny_sd1, steps=0), api_name="/generate")
    with pytest.raises(AppError, match="unknown model"):
        served.predict(recipe_json("nothing-here"), api_name="/generate")
    gallery, _, _ = served.predict(recipe_json(tiny_sd1, num_images=1), api_name="/generate")
    assert len(gallery) == 1


def test_dropped_png_restores_every_control(served, tiny_sd1):
    gallery, _, _ = served.predict(recipe_json(tiny_sd1), api_name="/generate")
    with Image.open(gallery[0]["image"]) as im:
        im.load()
        values = app.restore_from_png(im)
    controls, shown = values[:-1], values[-1]
    restored = parse(app.recipe_dict(*controls))
    assert restored == read_recipe(gallery[0]["image"])
    assert json.loads(shown)["sampler"]["seed"] == 11


def test_png_without_recipe_is_a_gradio_error():
    import gradio as gr

    with pytest.raises(gr.Error, match="carries no"):
        app.restore_from_png(Image.new("RGB", (8, 8)))


def test_a_recipe_the_controls_cannot_show_goes_to_the_recipe_panel(tiny_sd1):
    import gradio as gr

    app.build()
    text = json.dumps(
        {
            "prompt": "a",
            "method": "superpose",
            "experts": [{"model": tiny_sd1}, {"model": tiny_sd1, "prompt": "b"}],
        }
    )
    values = app.restore_from_recipe(text)
    assert all(v == gr.update() for v in values[:-1])
    assert json.loads(values[-1])["method"] == "superpose"
