"""Superposition of diffusion models at sampling time (SuperDiff, Skreta et al., ICLR 2025)."""

from pipelines.superposition.pipeline import (
    PIPELINE_MODES,
    SuperpositionPipeline,
    SuperpositionPipelineOutput,
    check_same_latent_space,
)
from pipelines.superposition.sampler import (
    MODES,
    Denoise,
    and_system,
    and_weights,
    average_weights,
    euler_maruyama_step,
    guided,
    ito_log_density_increment,
    or_weights,
    sample_superposition,
    step_coefficients,
)

__all__ = [
    "MODES",
    "PIPELINE_MODES",
    "Denoise",
    "SuperpositionPipeline",
    "SuperpositionPipelineOutput",
    "and_system",
    "and_weights",
    "average_weights",
    "check_same_latent_space",
    "euler_maruyama_step",
    "guided",
    "ito_log_density_increment",
    "or_weights",
    "sample_superposition",
    "step_coefficients",
]
