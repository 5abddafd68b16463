"""diffusers models (ModelMixin, ConfigMixin), one file each."""

from .dit import DIT_PRESETS, build_dit, check_dit_fits, disable_label_dropout

__all__ = ["DIT_PRESETS", "build_dit", "check_dit_fits", "disable_label_dropout"]
