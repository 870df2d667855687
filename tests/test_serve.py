"""Serving many users (``composer.serve``): a local Ray cluster of 2 CPUs runs the Serve app
with 2 ``Composer`` replicas and the page as ingress; 4 clients send 24 requests over 3 model
sets (a LoRA, a superposition, a merge). Skipped where Ray is not installed."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from bench.serve_load import alone, random_routing_hit_share, recipes, same_pixels, schedule  # noqa: E402
from composer.recipe import parse  # noqa: E402
from composer.serve import client, wire  # noqa: E402
from composer.serve.replica import MODEL_SETS_PER_REPLICA, Composer  # noqa: E402
from ui.serve import Page  # noqa: E402

APP = "composer"
RECIPES = recipes(model_sets=3, steps=6)
"""4 recipes over 3 model sets: toy-warm alone and with a LoRA, a superposition, a merge."""


@pytest.fixture(scope="module")
def twins():
    return [alone(r) for r in RECIPES]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A local cluster (2 CPUs), the Serve app with 2 CPU replicas and the page; torn down
    with every Ray process it started."""
    data = tmp_path_factory.mktemp("shares")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "COMPOSER_DATA": str(data)}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        composer = Composer.options(
            num_replicas=2, ray_actor_options={"num_cpus": 1}, health_check_period_s=1
        ).bind()
        serve.run(Page.bind(composer), name=APP, route_prefix="/")
        yield (
            serve.get_deployment_handle("Composer", app_name=APP),
            f"http://127.0.0.1:{port}",
            data,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def test_24_requests_from_4_clients_match_their_serial_twins_and_stick_to_replicas(app, twins):
    handle, _, _ = app
    order = schedule(24, len(RECIPES))
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda i: client.call(handle, RECIPES[i]), order))

    assert len(served) == 24
    for i, answer in zip(order, served, strict=True):
        (image,) = answer.result.images
        assert same_pixels(image, twins[i].images[0]), RECIPES[i].to_json()
        assert answer.result.recipe.to_dict() == twins[i].recipe.to_dict()
    ids = [wire.model_set(RECIPES[i]) for i in order]
    assert len(set(ids)) == 3
    hit_share = sum(a.hit for a in served) / len(served)
    assert hit_share > random_routing_hit_share(ids, 2, MODEL_SETS_PER_REPLICA)
    assert len({a.replica for a in served}) == 2


def test_a_model_set_asked_again_goes_to_the_replica_that_holds_it(app):
    handle, _, _ = app
    for i in (0, 2, 3):  # one recipe of each model set
        first = client.call(handle, RECIPES[i])
        time.sleep(1.5)  # replicas report what they hold every 0.1 s, routers hear it within ~1 s
        again = client.call(handle, RECIPES[i])
        assert again.hit and again.replica == first.replica, RECIPES[i].to_json()


def test_the_page_generates_and_shares_through_the_ingress(app, twins):
    from gradio_client import Client
    from PIL import Image

    from composer.sharing.store import Store

    _, url, data = app
    page = Client(url, verbose=False)
    gallery, recipe_text, status, *_ = page.predict(RECIPES[1].to_json(), api_name="/generate")
    assert "1 image(s)" in status
    assert same_pixels(Image.open(gallery[0]["image"]), twins[1].images[0])
    link, _stateless = page.predict(False, api_name="/share")
    entry = Store(data).open(link.rsplit("id=", 1)[1])
    assert entry.recipe.to_dict() == parse(recipe_text).to_dict()
    assert len(entry.pngs) == 1


def test_what_a_replica_answers_is_picklable_and_unpacks_to_the_same_pixels(twins):
    import pickle

    result = twins[3]
    back = wire.unpack(pickle.loads(pickle.dumps(wire.pack(result))))
    assert same_pixels(back.images[0], result.images[0])
    assert back.recipe.to_dict() == result.recipe.to_dict() and back.seeds == result.seeds


class FakeHandle:
    """A ``Composer`` handle whose every request streams ``events`` (an exception: raised)."""

    def __init__(self, *events):
        self.events, self.requests = events, 0

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, _text):
        self.requests += 1
        for event in self.events:
            if isinstance(event, Exception):
                raise event
            yield event


@pytest.mark.parametrize(
    ("event", "error", "message"),
    [
        ({"refused": "experts[0].model: 'x' is not a model"}, "RecipeError", "is not a model"),
        ({"failed": "RuntimeError: out of memory"}, "ServeError", "out of memory"),
    ],
)
def test_a_replica_s_refusal_or_failure_reaches_the_caller_as_its_message(event, error, message):
    handle = FakeHandle({"replica": "r", "hit": False}, {"step": (1, 2)}, event)
    with pytest.raises(Exception, match=message) as raised:
        client.call(handle, RECIPES[0])
    assert type(raised.value).__name__ == error and handle.requests == 1


def test_replicas_that_keep_dying_end_in_a_clear_error_after_the_retries():
    from ray.exceptions import ActorDiedError

    handle = FakeHandle({"replica": "r", "hit": False}, ActorDiedError())
    with pytest.raises(client.ServeError, match="a Composer replica died under this request 3"):
        client.call(handle, RECIPES[0])
    assert handle.requests == 1 + client.RETRIES


def test_python_app_py_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, app; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_replica_killed_mid_request_is_replaced_and_the_request_retried(app, twins):
    handle, _, _ = app
    slow = parse({**RECIPES[0].to_dict(), "sampler": {"steps": 60, "seed": 1}})
    twin = alone(slow)
    killed = []

    def kill_every_replica(done: int, total: int) -> None:
        if killed:
            return
        for name in ray.util.list_named_actors(all_namespaces=True):
            if name["name"].startswith(f"SERVE_REPLICA::{APP}#Composer#"):
                ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
                killed.append(name["name"])

    answer: list = []

    def ask() -> None:
        try:
            answer.append(client.call(handle, slow, progress=kill_every_replica))
        except Exception as e:  # a clear error would do too, but not with these retries
            answer.append(e)

    run = threading.Thread(target=ask)
    run.start()
    run.join(timeout=90)
    assert not run.is_alive(), "the request hung on a dead replica"
    assert len(killed) == 2
    (served,) = answer
    assert not isinstance(served, Exception), served
    assert served.attempts >= 2 and served.replica not in killed
    assert same_pixels(served.result.images[0], twin.images[0])
