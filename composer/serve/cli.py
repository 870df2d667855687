"""``python -m composer serve``: start the Serve application (``composer.serve.app``) on a Ray
cluster and keep it up until Ctrl-C.

It joins the cluster that ``ray start --head`` started on this machine (or ``--address``, or
``RAY_ADDRESS``) and otherwise starts one of its own. ``serve run composer/serve/config.yaml`` does
the same from the config file, which is what KubeRay's RayService takes.
"""

from __future__ import annotations

import argparse
import sys
import time

from composer.serve.app import APPLICATION, PAGE_CONCURRENCY

APP = "composer"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m composer serve",
        description="Serve the page to many users: Composer replicas on a Ray cluster, "
        "multiplexed by model set (needs `pip install 'ray[serve]'`).",
    )
    p.add_argument("--address", help="Ray cluster to join (default: this machine's, or a new one)")
    p.add_argument("--replicas", type=int, default=1, help="Composer replicas (1)")
    p.add_argument(
        "--gpus-per-replica",
        default="auto",
        help="GPUs per replica: auto (1 where the cluster has GPUs, else 0: one CPU each) or a "
        "number",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--page-concurrency", type=int, default=PAGE_CONCURRENCY)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: serving needs Ray: pip install 'ray[serve]==2.60.0'", file=sys.stderr)
        return 2
    import importlib

    # the builder by its import path, as `serve run ui.serve:build` names it (composer does not
    # import ui: the page is the application's, the engine is composer's)
    module, _, name = APPLICATION.partition(":")
    build = getattr(importlib.import_module(module), name)
    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build(
            {
                "replicas": args.replicas,
                "gpus_per_replica": args.gpus_per_replica,
                "page_concurrency": args.page_concurrency,
            }
        ),
        name=APP,
        route_prefix="/",
    )
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP)
        return 0
