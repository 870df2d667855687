"""The ``Composer`` deployment's options. The application (the page as ingress over it) is
built by ``ui.serve.build`` (``APPLICATION``), since only ``ui`` builds pages; ``serve run
ui.serve:build``, the config YAML (``composer/serve/config.yaml``) and ``python -m composer
serve`` all use it.

Its arguments (the YAML's ``args:``, ``key=value`` after ``serve run``, all optional):
``replicas`` (else the YAML's ``deployments:`` decide, 1 by default), ``gpus_per_replica``
(``auto``: 1 where the cluster has GPUs, else 0 and one CPU per replica) and
``page_concurrency``. A ``deployments:`` section in the YAML overrides what this sets
(``num_replicas``, ``autoscaling_config``, ``ray_actor_options``).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from composer.serve.replica import Composer

APPLICATION = "ui.serve:build"
"""The application builder's import path, as ``serve run`` and the config YAML name it."""
PAGE_CONCURRENCY = 16
"""Generations the page forwards at once. Each waits on a handle, not on a device, so this only
needs to exceed the replicas' total; Serve queues the rest in front of the replicas."""


def composer_options(args: dict[str, Any]) -> dict[str, Any]:
    """The ``Composer`` deployment's options from the builder's arguments: replicas and what
    each holds (a GPU where the cluster has them, a CPU otherwise)."""
    gpus = args.get("gpus_per_replica", "auto")
    if gpus == "auto":
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    gpus = float(gpus)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": 1} if gpus else {"num_cpus": 1}
    }
    if "replicas" in args:  # else the YAML's num_replicas or autoscaling_config decides
        options["num_replicas"] = int(args["replicas"])
    return options


def composer_deployment(args: dict[str, Any]) -> Application:
    """The ``Composer`` deployment, bound, with the options ``args`` ask for."""
    return Composer.options(**composer_options(args)).bind()
