"""diffusers models (ModelMixin, ConfigMixin), one file each."""

from .dit import DIT_PRESETS, build_dit, check_dit_fits, disable_label_dropout
from .dit_trunk import DiTStructureEncoder, DiTTimestepDiscriminator, freeze_dit_trunk, load_dit_trunk

__all__ = [
    "DIT_PRESETS",
    "DiTStructureEncoder",
    "DiTTimestepDiscriminator",
    "build_dit",
    "check_dit_fits",
    "disable_label_dropout",
    "freeze_dit_trunk",
    "load_dit_trunk",
]
