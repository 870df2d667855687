"""One model (with its LoRAs): the plain diffusers pipeline of that model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from composer.methods.method import Control, Form, Method, Values

if TYPE_CHECKING:
    from composer.methods.sampling import Job, Result

LORA_SLOTS = 3


def run(job: Job) -> Result:
    job.leases[job.sources[0].location].use_loras(job.loras[0])
    return sample(job, job.pipe(0))


def sample(job: Job, shared_pipe, components: dict | None = None) -> Result:
    """``shared_pipe`` with a request-local scheduler (schedulers are not thread-safe) and, for a
    merge, the merged ``components`` in place of its own."""
    from composer.embeddings import apply as apply_embeddings
    from composer.methods.batches import each_batch
    from composer.methods.sampling import pipe_arguments, recorder
    from composer.schedulers import make_scheduler

    s = job.recipe.sampler
    pipe = type(shared_pipe).from_pipe(
        shared_pipe,
        scheduler=make_scheduler(s.scheduler, shared_pipe.scheduler.config),
        **(components or {}),
    )
    pipe.set_progress_bar_config(disable=True)
    apply_embeddings(pipe, job)
    prompt = job.recipe.expert_prompt(0)

    def batch(seeds: list[int], on_step):
        steps, record = recorder(on_step)
        images = pipe(prompt=prompt, **pipe_arguments(job, pipe, seeds, record)).images
        return images, [list(steps) for _ in seeds]

    return each_batch(job, str(pipe.device), batch, pipe)


def default_model() -> str:
    from composer import registry

    models = registry.bundled("models")
    return registry.DEFAULT_MODEL if registry.DEFAULT_MODEL in models else next(iter(models), "")


def read(values: Values) -> dict:
    loras = [{"path": r["lora"], "weight": r["strength"]} for r in values["rows"] if r["lora"]]
    return {"experts": [{"model": values["model"], "loras": loras, "prompt": None, "weight": 1.0}]}


def write(recipe) -> Values | None:
    expert = recipe.experts[0]
    if len(expert.loras) > LORA_SLOTS:
        return None
    slots = [*expert.loras, *[None] * LORA_SLOTS][:LORA_SLOTS]
    return {
        "model": expert.model,
        "rows": [
            {"lora": lo.path if lo else None, "strength": lo.weight if lo else 1.0} for lo in slots
        ],
    }


def _export(recipe, out, dtype: str = "fp16") -> dict:
    from composer.export import export

    return export(recipe, out, dtype)


METHOD = Method(
    name="single",
    summary="one model and its LoRAs",
    experts=(1, 1),
    run=run,
    export=_export,
    form=Form(
        tab="Single model",
        intro="",
        read=read,
        write=write,
        controls=(
            Control(
                "model",
                "model",
                "Model",
                default=default_model,
                info="A bundled model, a local diffusers folder or .safetensors file, or a Hub id",
            ),
        ),
        row=(
            Control("lora", "lora", "LoRA"),
            Control("strength", "slider", "Strength", 1.0, low=-2, high=2, step=0.05),
        ),
        rows=LORA_SLOTS,
        min_rows=LORA_SLOTS,
        rows_title="LoRAs",
    ),
)
