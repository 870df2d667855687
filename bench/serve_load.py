"""Many users on the Serve application (issue 22): C concurrent clients send R requests over M
model sets of the toy zoo to 1 and then 2 ``Composer`` replicas (one CPU each), in one run.

    python -m bench.serve_load [--clients 4] [--requests 32] [--model-sets 3] [--steps 8,30]

For each sampler step count (8: a request of ~0.1 s of sampling, where Ray's own work per
request shows; 30: sampling dominates, as on a GPU with full-size models) and replica count it
reports throughput, p50/p95 latency (submit to answer), the multiplex
hit share (requests answered by a replica that already held their model set) beside the share
that random routing would get on the same sequence, and checks every image against its serial
twin (the same recipe run alone in this process, with one thread like a one-CPU replica).
Writes ``bench/results/serve-load-cpu.json``. The first requests of each run load their model
sets; that cost is part of what routing saves, so it is measured, not warmed away.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from bench import RESULTS
from composer import engine, registry
from composer.recipe import Recipe, parse

MODEL_SETS = {
    "toy-warm": [
        {"prompt": "a red circle", "experts": [{"model": "toy-warm"}]},
        {
            "prompt": "a purple circle",
            "experts": [{"model": "toy-warm", "loras": [{"path": "toy-purple"}]}],
        },
    ],
    "superpose toy-warm + toy-cool": [
        {
            "prompt": "",
            "method": "superpose",
            "experts": [
                {"model": "toy-warm", "prompt": "a red circle"},
                {"model": "toy-cool", "prompt": "a blue square"},
            ],
            "superpose": {"mode": "or"},
        }
    ],
    "merge toy-warm, toy-cool over toy-base": [
        {
            "prompt": "a red circle",
            "method": "merge",
            "experts": [
                {"model": "toy-warm"},
                {"model": "toy-cool", "loras": [{"path": "toy-star"}]},
            ],
            "merge": {"method": "ties", "base": "toy-base", "density": 0.2, "lambda": 1.0},
        }
    ],
    "toy-base": [
        {
            "prompt": "a purple star",
            "experts": [
                {"model": "toy-base", "loras": [{"path": "toy-purple"}, {"path": "toy-star"}]}
            ],
        }
    ],
    "toy-cool": [{"prompt": "a blue square", "experts": [{"model": "toy-cool"}]}],
}
"""Recipes by model set: a LoRA, a superposition, a merge (with a LoRA on one expert), ..."""


def recipes(model_sets: int, steps: int) -> list[Recipe]:
    """Every recipe of the first ``model_sets`` sets, each with its own seed."""
    chosen = [r for name in list(MODEL_SETS)[:model_sets] for r in MODEL_SETS[name]]
    return [
        parse({**r, "sampler": {"steps": steps, "seed": i + 1}}, check=registry.check_reference)
        for i, r in enumerate(chosen)
    ]


def alone(recipe: Recipe) -> engine.Result:
    """``recipe`` run alone, in this process, on a cache of its own and one thread, as a replica
    of one CPU runs it (Ray sets ``OMP_NUM_THREADS`` to an actor's CPUs; on a CPU the thread
    count moves a pixel by 1/255 now and then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return engine.generate(recipe, cache=registry.ModelCache())
    finally:
        torch.set_num_threads(threads)


def same_pixels(a, b) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def random_routing_hit_share(
    model_ids: list[str], replicas: int, per_replica: int, trials: int = 2000
) -> float:
    """The hit share that sending each request to a replica picked at random would get on
    ``model_ids`` (in order), each replica keeping its last ``per_replica`` model sets."""
    rng, hits = random.Random(0), 0
    for _ in range(trials):
        held = [OrderedDict() for _ in range(replicas)]
        for model_id in model_ids:
            cache = held[rng.randrange(replicas)]
            hits += model_id in cache
            cache[model_id] = True
            cache.move_to_end(model_id)
            if len(cache) > per_replica:
                cache.popitem(last=False)
    return hits / (trials * len(model_ids))


def schedule(count: int, kinds: int, seed: int = 1) -> list[int]:
    """``count`` recipe indices, each of ``kinds`` about equally often, in a shuffled order."""
    order = [i % kinds for i in range(count)]
    random.Random(seed).shuffle(order)
    return order


def load(handle, made: list[Recipe], order: list[int], clients: int) -> list[tuple]:
    """Send ``made[i]`` for each ``i`` of ``order`` from ``clients`` threads; each answer with
    its latency in seconds."""
    from composer.serve import client

    def one(i: int):
        start = time.perf_counter()
        served = client.call(handle, made[i])
        return served, time.perf_counter() - start

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, order))


def run(replicas: int, steps: int, made: list[Recipe], order: list[int], clients: int) -> dict:
    from ray import serve

    from composer.serve import wire
    from composer.serve.replica import MODEL_SETS_PER_REPLICA, Composer

    made = [
        parse({**r.to_dict(), "sampler": {**r.sampler.to_dict(), "steps": steps}}) for r in made
    ]
    twins = [alone(r) for r in made]
    composer = Composer.options(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    start = time.perf_counter()
    handle = serve.run(composer.bind(), name="serve-load", route_prefix=None)
    ready = time.perf_counter() - start
    start = time.perf_counter()
    answers = load(handle, made, order, clients)
    wall = time.perf_counter() - start
    serve.delete("serve-load")
    latencies = [seconds for _, seconds in answers]
    ids = [wire.model_set(made[i]) for i in order]
    identical = sum(
        all(same_pixels(a, b) for a, b in zip(s.result.images, twins[i].images, strict=True))
        for i, (s, _) in zip(order, answers, strict=True)
    )
    per_replica = Counter(s.replica for s, _ in answers)
    return {
        "replicas": replicas,
        "steps": steps,
        "seconds_to_ready": round(ready, 1),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(order) / wall, 3),
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_s": round(float(np.percentile(latencies, 95)), 3),
        "hit_share": round(sum(s.hit for s, _ in answers) / len(answers), 3),
        "random_routing_hit_share": round(
            random_routing_hit_share(ids, replicas, MODEL_SETS_PER_REPLICA), 3
        ),
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
        "retried": sum(s.attempts > 1 for s, _ in answers),
        "identical_to_serial_twin": f"{identical}/{len(order)}",
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--model-sets", type=int, default=3, choices=range(1, len(MODEL_SETS) + 1))
    p.add_argument("--steps", default="8,30", help="sampler step counts, one run each")
    p.add_argument("--replicas", default="1,2", help="replica counts, one run each")
    p.add_argument("--out", default=str(RESULTS / "serve-load-cpu.json"))
    args = p.parse_args(argv)

    import ray

    counts = [int(n) for n in args.replicas.split(",")]
    made = recipes(args.model_sets, steps=1)
    order = schedule(args.requests, len(made))
    ray.init(
        num_cpus=max(counts),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}},
    )
    try:
        runs = [
            run(n, int(steps), made, order, args.clients)
            for steps in args.steps.split(",")
            for n in counts
        ]
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    report = {
        "what": "Serve load on the toy zoo: C clients, R requests over M model sets, "
        "1 CPU and 1 torch thread per Composer replica",
        "cores": os.cpu_count(),
        "clients": args.clients,
        "requests": args.requests,
        "model_sets": list(MODEL_SETS)[: args.model_sets],
        "recipes": len(made),
        "runs": runs,
    }
    by_run = {(r["steps"], r["replicas"]): r["throughput_rps"] for r in runs}
    report["throughput_2_over_1"] = {
        f"{steps} steps": round(by_run[steps, 2] / by_run[steps, 1], 2)
        for steps, n in by_run
        if n == 1 and (steps, 2) in by_run
    }
    out = args.out
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
