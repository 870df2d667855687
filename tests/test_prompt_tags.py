"""``<lora:NAME:w>`` in prompts and textual-inversion embeddings, end to end on tiny models."""

from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from composer import engine, registry
from composer.recipe import RecipeError, parse
from composer.sharing.pnginfo import png_bytes, read_recipe


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


def generate(cache, prompt, model, loras=(), embeddings=(), negative="", **sampler):
    recipe = parse(
        {
            "prompt": prompt,
            "negative_prompt": negative,
            "experts": [{"model": model, "loras": [{"path": p, "weight": w} for p, w in loras]}],
            "embeddings": list(embeddings),
            "sampler": {"steps": 2, "seed": 3, **sampler},
        },
        check=registry.check_reference,
    )
    return engine.generate(recipe, cache=cache)


def pixels(result):
    return np.asarray(result.images[0]).astype(np.int16)


def test_lora_tag_gives_the_same_image_as_the_listed_lora_and_is_not_encoded(
    tiny_sd1, tiny_lora, cache
):
    tagged = generate(cache, f"a red circle <lora:{tiny_lora}:0.8>", tiny_sd1)
    listed = generate(cache, "a red circle", tiny_sd1, loras=[(tiny_lora, 0.8)])
    plain = generate(cache, "a red circle", tiny_sd1)
    assert np.array_equal(pixels(tagged), pixels(listed))  # same LoRA, same encoded text
    assert not np.array_equal(pixels(tagged), pixels(plain))  # the tag did attach the LoRA
    assert tagged.recipe.prompt == f"a red circle <lora:{tiny_lora}:0.8>"  # stored as written


def test_lora_tag_without_weight_is_strength_one_and_lyco_is_the_same(tiny_sd1, tiny_lora, cache):
    bare = generate(cache, f"a red circle <lyco:{tiny_lora}>", tiny_sd1)
    listed = generate(cache, "a red circle", tiny_sd1, loras=[(tiny_lora, 1.0)])
    assert np.array_equal(pixels(bare), pixels(listed))


def test_tagged_png_remakes_its_image(tiny_sd1, tiny_lora, cache):
    made = generate(cache, f"<lora:{tiny_lora}:0.5> a blue square", tiny_sd1)
    png = Image.open(BytesIO(png_bytes(made.images[0], made.metadata[0])))
    again = engine.generate(read_recipe(png), cache=cache)
    assert np.array_equal(pixels(made), pixels(again))
    assert "<lora:" in png.info["parameters"].split("\n")[0]


def test_tag_in_an_experts_prompt_attaches_to_that_expert_only():
    recipe = parse(
        {
            "prompt": "a shape <lora:toy-purple:0.5>",
            "method": "superpose",
            "experts": [
                {"model": "toy-warm", "prompt": "a circle <lora:toy-cool:0.7>"},
                {"model": "toy-warm"},
            ],
        }
    )
    assert [(lo.path, lo.weight) for lo in recipe.expert_loras(0)] == [("toy-cool", 0.7)]
    assert [(lo.path, lo.weight) for lo in recipe.expert_loras(1)] == [("toy-purple", 0.5)]
    assert recipe.expert_prompt(0) == "a circle" and recipe.expert_prompt(1) == "a shape"
    assert parse(recipe.to_json()) == recipe  # tags travel in the prompt text
    moved = recipe.untagged()
    assert moved.prompt == "a shape" and moved.experts[0].loras == recipe.expert_loras(0)


@pytest.mark.parametrize(
    "tag",
    ["<lora:>", "<lora:x:abc>", "<lora:x", "<lora:x:1:0.5>", "<lora x>", "<hypernet:x:1>"],
)
def test_malformed_tag_is_refused_naming_it(tag):
    with pytest.raises(RecipeError) as e:
        parse({"prompt": f"a red circle {tag}", "experts": [{"model": "toy-warm"}]})
    assert tag in str(e.value) and "prompt" in str(e.value)


def test_tags_that_would_mean_nothing_are_refused():
    with pytest.raises(RecipeError, match="negative_prompt"):
        parse({"prompt": "a", "negative_prompt": "<lora:x:1>", "experts": [{"model": "m"}]})
    with pytest.raises(RecipeError, match="no expert"):
        parse({"prompt": "<lora:x:1>", "experts": [{"model": "m", "prompt": "a"}]})
    with pytest.raises(RecipeError, match="named twice"):
        parse({"prompt": "a <lora:x:1>", "experts": [{"model": "m", "loras": [{"path": "x"}]}]})


def test_unknown_tagged_lora_is_refused_naming_the_tag():
    with pytest.raises(RecipeError, match="<lora:no-such-lora:1>"):
        parse(
            {"prompt": "a <lora:no-such-lora:1>", "experts": [{"model": "toy-warm"}]},
            check=registry.check_reference,
        )


# --- embeddings --------------------------------------------------------------------------------


def a1111_embedding(folder, name, width=32, vectors=2, key="emb_params", seed=0):
    generator = torch.Generator().manual_seed(seed)
    path = folder / f"{name}.safetensors"
    save_file({key: torch.randn(vectors, width, generator=generator)}, str(path))
    return str(path)


def test_embedding_changes_the_image_only_where_its_token_is_written(tiny_sd1, tmp_path, cache):
    path = a1111_embedding(tmp_path, "zorblax")
    emb = [{"path": path}]  # token: the file's name, as A1111 names it
    without = generate(cache, "a red circle", tiny_sd1)
    unused = generate(cache, "a red circle", tiny_sd1, embeddings=emb)
    used = generate(cache, "a red circle zorblax", tiny_sd1, embeddings=emb)
    negative = generate(cache, "a red circle", tiny_sd1, embeddings=emb, negative="zorblax")
    assert np.array_equal(pixels(without), pixels(unused))
    assert not np.array_equal(pixels(without), pixels(used))
    assert not np.array_equal(pixels(without), pixels(negative))
    assert used.recipe.to_dict()["embeddings"] == [{"path": path, "token": "zorblax"}]
    assert 'TI hashes: "zorblax: ' in used.metadata[0].chunks[0][1].decode()

    png = Image.open(BytesIO(png_bytes(used.images[0], used.metadata[0])))
    again = engine.generate(read_recipe(png), cache=cache)
    assert np.array_equal(pixels(used), pixels(again))

    # the cached pipeline was not changed: the word means nothing without the embedding again
    pipe = cache._entries[registry.resolve_model(tiny_sd1).location].pipe
    assert "zorblax" not in pipe.tokenizer.get_vocab()
    plain_word = generate(cache, "a red circle zorblax", tiny_sd1)
    assert not np.array_equal(pixels(plain_word), pixels(used))
    assert np.array_equal(pixels(generate(cache, "a red circle", tiny_sd1)), pixels(without))


def test_embedding_equals_diffusers_own_loading(tiny_sd1, tmp_path, cache):
    """The vectors reach the encoder exactly as ``load_textual_inversion`` puts them."""
    from diffusers import StableDiffusionPipeline

    path = a1111_embedding(tmp_path, "quexel", key="string_to_param.*", seed=1)
    ours = generate(cache, "quexel, a square", tiny_sd1, embeddings=[{"path": path}])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    from safetensors.torch import load_file

    pipe.load_textual_inversion({"quexel": load_file(path)["string_to_param.*"]})
    theirs = pipe(
        "quexel, a square",
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    assert np.abs(np.asarray(ours.images[0]) / 255.0 - theirs).max() <= 1 / 255 + 1e-6


def test_sdxl_embedding_uses_both_text_encoders(tiny_sdxl, tmp_path, cache):
    pipe = registry.load_pipeline(
        registry.resolve_model(tiny_sdxl), torch.device("cpu"), torch.float32
    )
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    path = tmp_path / "glimmer.safetensors"
    save_file({"clip_l": torch.randn(1, widths[0]), "clip_g": torch.randn(1, widths[1])}, path)
    emb = [{"path": str(path)}]
    plain = generate(cache, "a glimmer", tiny_sdxl)
    used = generate(cache, "a glimmer", tiny_sdxl, embeddings=[{**emb[0], "token": "glimmer"}])
    assert not np.array_equal(pixels(plain), pixels(used))
    sd1 = a1111_embedding(tmp_path, "flat", width=widths[0])
    with pytest.raises(RecipeError, match="SDXL"):
        generate(cache, "a flat", tiny_sdxl, embeddings=[{"path": sd1}])


def test_bad_embeddings_are_refused(tiny_sd1, tmp_path, cache):
    wrong = a1111_embedding(tmp_path, "wide", width=48)
    with pytest.raises(RecipeError, match="48 wide"):
        generate(cache, "a wide", tiny_sd1, embeddings=[{"path": wrong}])
    with pytest.raises(RecipeError, match=r"embeddings\[0\]\.path"):
        parse(
            {"prompt": "a", "experts": [{"model": "toy-warm"}], "embeddings": [{"path": "no.pt"}]},
            check=registry.check_reference,
        )
    with pytest.raises(RecipeError, match="twice"):
        parse(
            {
                "prompt": "a",
                "experts": [{"model": "m"}],
                "embeddings": [
                    {"path": "a.safetensors", "token": "t"},
                    {"path": "b", "token": "t"},
                ],
            }
        )


@pytest.mark.parametrize("method", ["superpose", "aggregate", "merge"])
def test_embedding_reaches_every_method(method, tiny_sd1, tmp_path, cache):
    path = a1111_embedding(tmp_path, "vexil", seed=2)

    def run(prompt):
        recipe = parse(
            {
                "prompt": "a red circle",
                "method": method,
                "experts": [{"model": tiny_sd1, "prompt": prompt}, {"model": tiny_sd1}],
                "embeddings": [{"path": path}],
                "sampler": {"steps": 2, "seed": 1},
            },
            check=registry.check_reference,
        )
        return pixels(engine.generate(recipe, cache=cache))

    assert not np.array_equal(run("a red circle vexil"), run("a red circle"))


def test_names_in_the_users_own_folders_resolve_like_a1111s(
    tiny_sd1, tiny_lora, tmp_path, monkeypatch, cache
):
    """``<lora:NAME>`` finds NAME.safetensors in ``COMPOSER_LORA_DIR`` (subfolders too, as A1111's
    models/Lora), and an embedding is named by its file in ``COMPOSER_EMBEDDING_DIR``; hosted
    mode ignores both folders."""
    import shutil

    from composer import hosted

    loras, embeddings = tmp_path / "Lora", tmp_path / "embeddings"
    (loras / "styles").mkdir(parents=True)
    embeddings.mkdir()
    shutil.copy(registry.resolve_lora(tiny_lora), loras / "styles" / "my_style.safetensors")
    a1111_embedding(embeddings, "zorblax")
    monkeypatch.setenv("COMPOSER_LORA_DIR", str(loras))
    monkeypatch.setenv("COMPOSER_EMBEDDING_DIR", str(embeddings))

    by_name = generate(cache, "a red circle <lora:my_style:0.8>", tiny_sd1)
    listed = generate(cache, "a red circle", tiny_sd1, loras=[(tiny_lora, 0.8)])
    assert np.array_equal(pixels(by_name), pixels(listed))
    named = generate(cache, "a red circle zorblax", tiny_sd1, embeddings=[{"path": "zorblax"}])
    by_path = generate(cache, "a red circle zorblax", tiny_sd1,
                       embeddings=[{"path": str(embeddings / "zorblax.safetensors")}])  # fmt: skip
    assert np.array_equal(pixels(named), pixels(by_path))
    assert named.recipe.to_dict()["embeddings"] == [{"path": "zorblax", "token": "zorblax"}]

    monkeypatch.setattr(hosted, "active", lambda: True)
    with pytest.raises(RecipeError, match="my_style"):
        registry.resolve_lora("my_style")
    with pytest.raises(RecipeError, match="zorblax"):
        registry.resolve_embedding("zorblax")
