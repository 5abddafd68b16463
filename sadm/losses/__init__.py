"""Pure loss functions of tensors; each returns a per-sample loss `[B]` that the caller weights and reduces."""

from .denoising import denoising_loss, predict_x0, snr, training_target, vlb_loss

__all__ = ["denoising_loss", "predict_x0", "snr", "training_target", "vlb_loss"]
