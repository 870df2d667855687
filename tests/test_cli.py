import json
import subprocess
import sys

from PIL import Image


def cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "composer", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def write_recipe(tmp_path, model, **sampler):
    path = tmp_path / "recipe.json"
    path.write_text(
        json.dumps(
            {
                "prompt": "a red circle",
                "experts": [{"model": model}],
                "sampler": {"steps": 3, "num_images": 2, "seed": 4, **sampler},
            }
        )
    )
    return path


def test_generate_writes_pngs_and_prints_one_json_line_per_image(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    done = cli(
        "generate",
        str(write_recipe(tmp_path, tiny_sd1)),
        "--out",
        str(out),
        "--set",
        "sampler.seed=9",
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [9, 10]
    assert [line["path"] for line in lines] == [str(out / "00000.png"), str(out / "00001.png")]
    assert all(line["seconds"] > 0 for line in lines)
    with Image.open(out / "00001.png") as im:
        assert "Seed: 10" in im.info["parameters"]

    info = cli("info", str(out / "00001.png"))
    assert info.returncode == 0, info.stderr
    recipe = json.loads(info.stdout)
    sampler = recipe["sampler"]  # the batch image 1 was made in: seed 9 at position 1
    assert (sampler["seed"], sampler["num_images"], sampler["batch_size"]) == (9, 2, 2)
    assert recipe["experts"][0]["model"] == tiny_sd1


def test_bad_recipe_exits_non_zero_with_the_message_and_no_traceback(tiny_sd1, tmp_path):
    done = cli(
        "generate", str(write_recipe(tmp_path, tiny_sd1, steps=-3)), "--out", str(tmp_path / "o")
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: sampler.steps: -3 is not accepted")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_unknown_model_missing_file_and_broken_json_are_one_line_errors(tmp_path):
    cases = [
        (
            ["generate", str(write_recipe(tmp_path, "no-such-model")), "--out", str(tmp_path)],
            "error: experts[0].model: unknown model 'no-such-model'",
        ),
        (
            ["generate", str(tmp_path / "missing.json"), "--out", str(tmp_path)],
            "error: recipe: cannot read",
        ),
        (["generate", "-", "--out", str(tmp_path)], "error: recipe: - is not valid JSON"),
        (["info", str(tmp_path / "missing.png")], "error: image:"),
    ]
    for args, message in cases:
        done = cli(*args, stdin="{")
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(message), done.stderr
        assert "Traceback" not in done.stderr


def test_models_lists_the_bundled_zoo():
    from composer import registry

    done = cli("models", "--json")
    assert done.returncode == 0
    listing = json.loads(done.stdout)
    assert listing["models"] == sorted(registry.bundled("models"))
    assert listing["loras"] == sorted(registry.bundled("loras"))


def test_lora_bake_writes_a_loadable_checkpoint_and_refuses_bad_arguments(tmp_path):
    out = tmp_path / "purple.safetensors"
    done = cli("lora", "bake", "toy-base", "toy-purple:0.5", "--out", str(out))
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["path"] == str(out) and line["dtype"] == "fp16" and out.is_file()
    from composer import registry

    assert registry.resolve_model(str(out)).kind == "single_file"
    assert registry.single_file_config(registry.resolve_model(str(out))) is not None
    for args, message in (
        (["toy-base"], "error: lora bake: give a model, then one or more LORA"),
        (["toy-base", "no-such-lora:0.5"], "error: experts[0].loras[0].path: unknown LoRA"),
        (["toy-base", "toy-purple:11"], "error: experts[0].loras[0].weight: 11"),
    ):
        done = cli("lora", "bake", *args, "--out", str(tmp_path / "x.safetensors"))
        assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
        assert "Traceback" not in done.stderr
