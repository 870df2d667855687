"""The Ray Serve application: the ``Page`` deployment (the Gradio page as Serve's ingress)
over ``composer.serve``'s ``Composer`` replicas, which it calls through a handle. The Serve twin
of ``app.py``; it lives in ``ui`` because it builds the page (``composer`` never imports ``ui``).
``build`` is the application builder that ``serve run ui.serve:build``, the config YAML
(``composer/serve/config.yaml``) and ``python -m composer serve`` all use.

Why not ``ray.serve.gradio_integrations.GradioServer``: with gradio 6.31 it never runs Gradio's
startup events (the page answers 500 and predictions hang). Mounting the page on a FastAPI app
with ``gr.mount_gradio_app`` runs them as the app's lifespan, which Serve does start.

One replica: Gradio's sessions, queue and the Share button's state live in one process. The page
owns the share store (``composer.sharing.store``, under ``COMPOSER_DATA`` on the page's node):
replicas return images, and only the page writes shares, so every user sees the same store.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from composer.serve import client
from composer.serve.app import PAGE_CONCURRENCY, composer_deployment


@serve.deployment(name="Page", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Page:
    def __init__(self, composer: DeploymentHandle, concurrency: int = PAGE_CONCURRENCY):
        self.composer = composer
        self.concurrency = concurrency

    def __serve_build_asgi_app__(self):
        """Build the page in the replica (a Gradio app does not pickle), with its runs sent to
        the ``Composer`` deployment (``ui.run.REMOTE``)."""
        import gradio as gr
        from fastapi import FastAPI

        from composer import registry
        from ui import run
        from ui.handlers import OUTPUT_DIR
        from ui.page import build, launch_options

        registry.quiet_libraries()
        run.REMOTE = client.remote(self.composer)
        demo = build().demo
        demo.queue(default_concurrency_limit=self.concurrency)
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        return gr.mount_gradio_app(FastAPI(), demo, path="", **launch_options())


def build(args: dict[str, Any] | None = None) -> Application:
    """The application from the builder's arguments (``composer.serve.app``): the page over
    the ``Composer`` deployment."""
    args = dict(args or {})
    page_concurrency = int(args.get("page_concurrency", PAGE_CONCURRENCY))
    return Page.bind(composer_deployment(args), page_concurrency)
