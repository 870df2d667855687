"""Hugging Face Spaces: the app started as a Space starts it (``spaces`` installed, ``SPACE_ID``
set) still generates on CPU; on ZeroGPU the sampling goes through ``spaces.GPU`` with a duration
that follows the work; without ``spaces`` it runs unchanged. Each case runs in its own process,
since ``spaces`` is imported once, when ``app`` is."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from composer.methods.merge import GPU_SECONDS_PER_MERGED_EXPERT
from composer.recipe import parse
from composer.sharing.store import Store
from ui import run

ROOT = Path(__file__).resolve().parent.parent
TOY = {
    "prompt": "a red circle",
    "experts": [{"model": "toy-warm"}],
    "sampler": {"steps": 3, "num_images": 2},
}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_seconds_grow_with_steps_experts_and_images():
    def seconds(method="single", experts=1, **sampler):
        return run.gpu_seconds(
            parse(
                {
                    "prompt": "a",
                    "method": method,
                    "experts": [{"model": "m"}] * experts,
                    "sampler": {"steps": 20, "num_images": 1, **sampler},
                }
            )
        )

    def work(n: int) -> float:  # seconds for n times the U-Net calls of ``single``
        return run.GPU_SECONDS_BASE + n * (single - run.GPU_SECONDS_BASE)

    single = seconds()
    assert isinstance(single, int) and single > run.GPU_SECONDS_BASE
    assert seconds(steps=40) == pytest.approx(work(2), abs=1)  # rounded up to whole seconds
    assert seconds(num_images=4) == pytest.approx(work(4), abs=1)
    assert seconds("superpose", 3) == pytest.approx(work(3), abs=1)
    assert seconds("superpose", 3, steps=40, num_images=4) == pytest.approx(work(24), abs=1)
    assert seconds("aggregate", 2) == seconds("superpose", 2)
    assert seconds("merge", 3) == single + 3 * GPU_SECONDS_PER_MERGED_EXPERT
    assert seconds(width=512, height=512) < single  # the native size is assumed to be 1024²
    assert seconds("superpose", 8, steps=150, num_images=16) == run.GPU_SECONDS_MAX


def test_on_zerogpu_sampling_runs_inside_spaces_gpu_with_its_duration(tmp_path):
    fake = tmp_path / "fake" / "spaces"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        textwrap.dedent(
            """
            ASKED = []

            def GPU(task=None, *, duration=None, size=None):
                def on_gpu(*args, **kwargs):
                    ASKED.append(duration(*args, **kwargs))
                    return task(*args, **kwargs)
                return on_gpu
            """
        )
    )
    done = run_python(
        f"""
        import json, sys
        sys.path.insert(0, {str(fake.parent)!r})
        import spaces
        from ui import handlers
        gallery = handlers.run_recipe({json.dumps(TOY)!r})["gallery"]
        print(json.dumps({{"asked": spaces.ASKED, "images": len(gallery)}}))
        """
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"asked": [run.gpu_seconds(parse(TOY))], "images": 2}


def test_without_the_spaces_package_the_app_runs_unchanged():
    done = run_python(
        f"""
        import json, sys
        sys.modules["spaces"] = None  # import spaces now raises ImportError
        from ui import handlers, run
        assert run.spaces is None and run.on_gpu(print) is print
        gallery = handlers.run_recipe({json.dumps(TOY)!r})["gallery"]
        print(len(gallery))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_started_as_on_a_space_generates_on_cpu_and_links_to_the_space(tmp_path):
    pytest.importorskip("spaces", reason="the spaces package is not installed")
    from gradio_client import Client

    port = free_port()
    env = {
        **os.environ,
        "SYSTEM": "spaces",
        "SPACE_ID": "someone/diffusion-composer",
        "SPACE_HOST": "someone-diffusion-composer.hf.space",
        "COMPOSER_DATA": str(tmp_path),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
    }
    env.pop("SPACES_ZERO_GPU", None)
    server = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = None
        deadline = time.monotonic() + 180
        while client is None:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the app did not start within 180 s"
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(1)
        gallery, _, status, _ = client.predict(json.dumps(TOY), api_name="/generate")
        link, _ = client.predict(False, api_name="/share")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(gallery) == 2 and "on cpu" in status
    prefix = "https://huggingface.co/spaces/someone/diffusion-composer?id="
    assert link.startswith(prefix)
    stored = Store(tmp_path).open(link.removeprefix(prefix)).recipe
    assert stored == parse({**TOY, "sampler": {**TOY["sampler"], "batch_size": 2}})


def test_preload_puts_every_bundled_model_in_the_cache(monkeypatch):
    from composer import registry

    cache = registry.ModelCache()
    monkeypatch.setattr(registry, "CACHE", cache)
    run.preload()
    models = registry.bundled("models")
    assert models and all(str(folder) in cache for folder in models.values())
