"""sadm: adversarial training and fine-tuning of diffusion transformers on Hugging Face diffusers.

Importing sadm registers its pipeline classes on the `diffusers` module, so `DiffusionPipeline.from_pretrained(folder)`
returns them for folders that sadm exported.
"""

import diffusers

from .data import DataConfig, load_train_dataset
from .losses import denoising_loss, predict_x0, training_target, vlb_loss
from .models import DIT_PRESETS, build_dit
from .models.generator import GANGenerator  # puts sadm.models.generator, named in model_index.json, in sys.modules
from .pipelines import DiffusionGANPipeline, SADMDiTPipeline

__version__ = "0.1.0"

for _pipeline_class in (SADMDiTPipeline, DiffusionGANPipeline):
    # DiffusionPipeline.from_pretrained resolves model_index.json's `_class_name` with getattr(diffusers, name)
    setattr(diffusers, _pipeline_class.__name__, _pipeline_class)

__all__ = [
    "DIT_PRESETS",
    "DataConfig",
    "DiffusionGANPipeline",
    "GANGenerator",
    "SADMDiTPipeline",
    "build_dit",
    "denoising_loss",
    "load_train_dataset",
    "predict_x0",
    "training_target",
    "vlb_loss",
]
