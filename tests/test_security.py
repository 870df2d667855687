"""Issue 20: hostile input. Each case fails without its fix.

The one door (``composer.untrusted``): every way a recipe arrives — JSON text, a Python dict, the
CLI, a ``?recipe=`` link, a PNG chunk, a stored share entry — bounds size, depth and number
length and refuses lone surrogates, with one ``RecipeError`` line naming the field.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import zlib

import pytest
from PIL import Image, PngImagePlugin

from composer import untrusted
from composer.__main__ import main as cli_main
from composer.recipe import RecipeError, parse
from composer.sharing.links import decode_recipe
from composer.sharing.pnginfo import RECIPE_CHUNK, read_recipe

GOOD = {"prompt": "a red circle", "experts": [{"model": "toy-warm"}], "sampler": {"steps": 2}}


def text_with(**sampler) -> str:
    return json.dumps({**GOOD, "sampler": {**GOOD["sampler"], **sampler}})


HOSTILE = {
    # a 5,000-digit seed: json.loads itself raises ValueError("Exceeds the limit") without bounds
    "huge_number": (
        text_with().replace('"steps": 2', '"steps": 2, "seed": ' + "9" * 5000),
        r"recipe: a number of 5000 characters",
    ),
    # nesting 10,000 deep: RecursionError inside json.loads without the scan
    "deep_nesting": ('{"prompt": ' + "[" * 10_000 + "]" * 10_000 + "}", r"nested deeper than 32"),
    # a lone surrogate decodes from JSON but is not text; the tokenizer fails on it later
    "lone_surrogate": (
        json.dumps({**GOOD, "prompt": "a \ud800 circle"}),
        r"prompt: contains a lone surrogate \(\\ud800\)",
    ),
    "nan_literal": (text_with().replace('"steps": 2', '"steps": NaN'), r"NaN is not a JSON number"),
    "oversized": (
        json.dumps({**GOOD, "prompt": "x" * (untrusted.MAX_BYTES + 1)}),
        r"bytes.*; at most 262144",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_every_door_refuses_hostile_json_with_one_line(case, tmp_path, monkeypatch, capsys):
    text, message = HOSTILE[case]
    with pytest.raises(RecipeError, match=message):
        parse(text)
    with pytest.raises(RecipeError, match=message):
        parse(text.encode())

    # the PNG chunk another tool (or an attacker) wrote
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_CHUNK, text)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG", pnginfo=info)
    png.seek(0)
    with pytest.raises(RecipeError, match=message):
        read_recipe(png)

    # a ?recipe= link (short enough only for the small cases)
    value = base64.urlsafe_b64encode(zlib.compress(text.encode(), 9)).decode().rstrip("=")
    if len(value) <= 4000:
        with pytest.raises(RecipeError, match=message):
            decode_recipe(value)

    # the CLI: exit 2, one line, no traceback, nothing written
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    out = tmp_path / "out"
    assert cli_main(["generate", "-", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()


def test_python_callers_pass_the_same_door():
    with pytest.raises(RecipeError, match=r"^experts\[0\]\.prompt: contains a lone surrogate"):
        parse({**GOOD, "experts": [{"model": "toy-warm", "prompt": "\udfff"}]})
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(RecipeError, match=r"nested deeper than 32"):
        parse({**GOOD, "prompt": deep})
    with pytest.raises(RecipeError, match=r"^sampler\.seed: a number longer than 40 digits"):
        parse({**GOOD, "sampler": {"seed": 10**200}})


def test_ordinary_recipes_are_untouched_by_the_bounds():
    assert parse(text_with(seed=2**32 - 1)).sampler.seed == 2**32 - 1
    assert parse(json.dumps({**GOOD, "prompt": "ünïcödé ✓ 🎨"})).prompt == "ünïcödé ✓ 🎨"


SAVER = """
import sys
from composer.sharing.store import Store
store = Store(sys.argv[1])
png = open(sys.argv[2], "rb").read()
recipe = '{"prompt": "a", "experts": [{"model": "toy-warm"}]}'
store.save(recipe, [png] * 4)  # one acknowledged save before the kill can land
print("ready", flush=True)
while True:
    store.save(recipe, [png] * 4)
"""


def test_kill_9_during_saves_leaves_nothing_after_the_next_start(tmp_path):
    """Processes killed mid-save leave staging folders; the next start removes them, and every
    entry the index holds still opens."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    import numpy as np

    from composer.sharing.store import Store

    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    png = tmp_path / "noise.png"
    Image.fromarray(noise).save(png)
    root = tmp_path / "data"
    repo = Path(__file__).resolve().parent.parent
    left: list = []
    for i in range(20):  # until a kill has landed mid-save (usually within a few)
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(root), str(png)],
            cwd=repo,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        assert saver.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.03 * (i % 5))
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait()
        left = list((root / "staging").iterdir())
        if left and i >= 2:
            break
    assert left, "no kill landed during a save: the test proves nothing"
    store = Store.__new__(Store)  # as a fresh process would: sweep on start
    Store.__init__(store, root)
    store.sweep()
    assert not list((root / "staging").iterdir()), left
    with store._connect() as db:
        ids = [row[0] for row in db.execute("SELECT id FROM shares")]
    assert ids  # the savers got some saves through
    for share_id in ids:
        assert len(store.open(share_id).pngs) == 4


def test_eight_concurrent_first_requests_equal_the_same_requests_one_by_one():
    """Eight requests at once on a cold cache (what COMPOSER_CONCURRENCY=8 lets the page do):
    loads patch global state and once corrupted the process ("Tensor on device meta"); now each
    image equals the same request run alone, and the cache serves the next request."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from composer import engine, registry

    def recipe(i: int):
        model = ("toy-base", "toy-warm", "toy-cool")[i % 3]
        loras = [{"path": "toy-purple", "weight": 1.0}] if i % 2 else []
        return parse(
            {
                "prompt": "a red circle",
                "experts": [{"model": model, "loras": loras}],
                "sampler": {"steps": 2, "seed": i, "num_images": 1},
            }
        )

    def pixels(result):
        return np.asarray(result.images[0], dtype=np.int16)

    alone = [pixels(engine.generate(recipe(i), cache=registry.ModelCache())) for i in range(8)]
    cache = registry.ModelCache()
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda i: pixels(engine.generate(recipe(i), cache=cache)), range(8))
        )
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(a, b), f"request {i} differs when run concurrently"
    assert cache.loads == 3  # each model loaded once, however many asked at once
    again = pixels(engine.generate(recipe(1), cache=cache))
    assert np.array_equal(again, alone[1])


def test_hosted_mode_names_only_the_zoo_the_hub_and_this_visitors_uploads(
    tiny_sd1, tiny_lora, tmp_path, monkeypatch, capsys
):
    from composer import hosted, registry

    monkeypatch.setenv("COMPOSER_HOSTED", "1")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really")
    existing = [tiny_sd1, str(weights), "/etc/passwd", "/root", "../../etc/hosts", tiny_lora]
    missing = ["/etc/nope", str(tmp_path / "none.safetensors"), "./nothing-here"]
    messages = set()
    for reference in existing + missing:
        for resolve in (registry.resolve_model, registry.resolve_lora):
            with pytest.raises(RecipeError) as info:
                resolve(reference, "experts[0].model")
            messages.add(str(info.value).replace(repr(reference), "REF").split(";")[0])
        with pytest.raises(RecipeError) as info:
            registry.resolve_aggregator(reference, "aggregate.aggregator")
        messages.add(str(info.value).replace(repr(reference), "REF").split(";")[0])
    # one sentence for all of them, whether the path exists, is a folder or a file
    assert messages == {
        "experts[0].model: REF is not available on this server",
        "aggregate.aggregator: REF is not available on this server",
    }
    assert registry.resolve_model("toy-warm").kind == "bundled"
    assert registry.resolve_model("owner/some-model").kind == "hub"
    assert registry.resolve_aggregator("toy-warm-cool").endswith("toy-warm-cool")

    # a file this visitor uploaded is read
    token = hosted.UPLOADS.set(frozenset({str(weights.resolve())}))
    try:
        with pytest.raises(RecipeError, match=r"is not a readable \.safetensors file"):
            registry.resolve_model(str(weights), "experts[0].model")
    finally:
        hosted.UPLOADS.reset(token)

    # the CLI says the same, in one line
    monkeypatch.setattr(
        sys, "stdin", io.StringIO(json.dumps({**GOOD, "experts": [{"model": "/etc/passwd"}]}))
    )
    assert cli_main(["generate", "-", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: experts[0].model: '/etc/passwd' is not available on this server; "
        "expected a bundled model (toy-base, toy-cool, toy-warm) or a Hub id (owner/name)\n"
    )


def bad_models(tmp_path, tiny_sd1) -> dict:
    import shutil

    import torch
    from safetensors.torch import save_file

    made = {}
    made["metadata_only"] = tmp_path / "meta.safetensors"
    save_file({}, str(made["metadata_only"]), metadata={"modelspec.title": "nothing"})
    made["unrelated_keys"] = tmp_path / "unrelated.safetensors"
    save_file({"foo.bar": torch.zeros(3)}, str(made["unrelated_keys"]))
    made["no_such_class"] = tmp_path / "folder"
    shutil.copytree(tiny_sd1, made["no_such_class"])
    index = json.loads((made["no_such_class"] / "model_index.json").read_text())
    index["unet"] = ["diffusers", "NoSuchUNetModel"]
    (made["no_such_class"] / "model_index.json").write_text(json.dumps(index))
    return made


def test_broken_model_files_are_one_clear_error_and_leave_no_cache_entry(tiny_sd1, tmp_path):
    from composer import engine, registry

    cache = registry.ModelCache()
    for name, path in bad_models(tmp_path, tiny_sd1).items():
        recipe = parse({**GOOD, "experts": [{"model": str(path)}]})
        with pytest.raises(RecipeError) as info:
            engine.generate(recipe, cache=cache)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, (name, message)
        assert str(path.resolve()) not in cache, name
    # the cache still serves a good model afterwards
    ok = parse({**GOOD, "experts": [{"model": tiny_sd1}], "sampler": {"steps": 1}})
    assert len(engine.generate(ok, cache=cache).images) == 1


def test_a_lora_with_an_empty_header_is_one_error_and_the_next_lora_still_applies(tmp_path):
    """Issue 20, item 1: ``set_adapters`` used to raise outside the ``try``, leaving a half-made
    adapter in the cached pipeline. Now the failure is one ``RecipeError`` naming the file, the
    adapter is gone, and a good LoRA on the same cached model works."""
    from safetensors.torch import save_file

    from composer import engine, registry

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"ss_network_module": "networks.lora"})
    cache = registry.ModelCache()
    base = {"prompt": "a purple star", "sampler": {"steps": 2, "seed": 1}}
    broken = parse({**base, "experts": [{"model": "toy-base", "loras": [{"path": str(empty)}]}]})
    for _ in range(2):  # the same clear error on a retry, not a different one
        with pytest.raises(RecipeError, match=r"empty\.safetensors") as info:
            engine.generate(broken, cache=cache)
        assert "\n" not in str(info.value)
    for entry in cache._entries.values():  # the file may be refused before the model loads
        assert entry.adapters == {}  # nothing half-applied stays
        assert not getattr(entry.pipe.unet, "peft_config", None)
    good = parse({**base, "experts": [{"model": "toy-base", "loras": [{"path": "toy-purple"}]}]})
    alone = engine.generate(good, cache=registry.ModelCache()).images[0]
    after = engine.generate(good, cache=cache).images[0]
    assert after.tobytes() == alone.tobytes()


def test_old_output_folders_are_swept_and_young_ones_kept(tmp_path, monkeypatch):
    """Issue 20, item 7: ``composer-outputs`` no longer grows with every generation."""
    import os

    from ui import handlers

    monkeypatch.setattr(handlers, "OUTPUT_DIR", tmp_path)
    monkeypatch.setattr(handlers, "OUTPUT_KEEP_FOLDERS", 3)
    monkeypatch.setattr(handlers, "_swept", [0.0])
    now = 1_000_000.0
    ages = {"old": handlers.OUTPUT_KEEP_S + 10, **{f"young{k}": 10 * k for k in range(5)}}
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    assert handlers.sweep_outputs(now) == 3  # the old one, and the two oldest beyond 3
    assert sorted(f.name for f in tmp_path.iterdir()) == ["young0", "young1", "young2"]
    assert handlers.sweep_outputs(now + 1) == 0  # at most once a minute


def test_two_hundred_fuzzed_recipes_each_exit_2_with_one_line_from_the_cli(
    tiny_sd1, tiny_lora, tmp_path, monkeypatch, capsys
):
    """Issue 20's judged fuzz: every malformed recipe of ``tests/test_recipe_fuzz.py`` (wrong
    types, NaN, ±inf, huge, missing, path tricks, truncated and scrambled JSON) given to
    ``python -m composer generate``: exit status 2, one ``error:`` line, no traceback, no output.
    A scramble that is still a valid recipe must then generate (exit 0) — it is not counted."""
    from tests.test_recipe_fuzz import malformed_cases

    refused = 0
    for name, data in malformed_cases(tiny_sd1, tiny_lora):
        text = data if isinstance(data, str) else json.dumps(data)
        if name.startswith("scrambled"):
            try:
                parse(text)
                continue  # a valid recipe by chance: not a malformed case
            except RecipeError:
                pass
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        out = tmp_path / "out"
        assert cli_main(["generate", "-", "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert "Traceback" not in err and not out.exists(), name
        refused += 1
    assert refused >= 200
