"""diffusers pipelines of sadm (installed as `sadm.pipelines`). Inference only: nothing here imports training code."""

from .pipeline_diffusion_gan import DiffusionGANPipeline
from .pipeline_sadm_dit import SADMDiTPipeline

__all__ = ["DiffusionGANPipeline", "SADMDiTPipeline"]
