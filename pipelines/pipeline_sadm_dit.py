"""Sampling pipeline for DiTs trained with sadm: pixel or latent, class-conditional or unconditional, any diffusers scheduler.

Inference only; imports torch and diffusers and nothing from the training code, so this file also works as a single-file
custom pipeline (`DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)`).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401  (any diffusers scheduler works)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


class SADMDiTPipeline(DiffusionPipeline):
    r"""
    Class-conditional or unconditional DiT sampling with classifier-free guidance whose null class comes from the model.

    Unlike diffusers' `DiTPipeline`, the null class id is the model's class count (`transformer.config.num_embeds_ada_norm`),
    never a hard-coded 1000, the VAE is optional (pixel-space DiTs), and a learned variance is used when the scheduler
    asks for it (`variance_type="learned_range"`).

    Guidance policy: the guided output is applied to all channels of ε (not DiT's first-3-of-4 latent channels).

    Args:
        transformer ([`DiTTransformer2DModel`]): the denoiser.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler, e.g. `DDPMScheduler` or `DDIMScheduler`.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images; `None` for pixel-space models.
        id2label (`dict[int, str]`, *optional*): class names; `None` for an unconditional model.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self.labels = {name: index for index, name in id2label.items()} if id2label else {}

    @property
    def is_conditional(self) -> bool:
        return self.config.id2label is not None

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm if self.is_conditional else 0

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names -> ids, as `DiTPipeline.get_label_ids`."""
        names = [label] if isinstance(label, str) else label
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"{unknown} are not class names of this model; names are {sorted(self.labels)}.")
        return [self.labels[n] for n in names]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | int | torch.Tensor | None = None,
        batch_size: int = 1,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`list[int]`, *optional*): one class id per image. For a conditional model without labels,
                `batch_size` labels are drawn uniformly with `generator`. Must be `None` for an unconditional model.
            batch_size (`int`): number of images when `class_labels` is not given.
            guidance_scale (`float`): classifier-free guidance scale w, ε = ε_null + w·(ε_cond − ε_null); 1 disables it.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            num_inference_steps (`int`): denoising steps of the scheduler.
            output_type (`str`): `"pil"`, `"np"` (float NHWC in [0, 1]) or `"pt"` (float NCHW in [0, 1]).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got '{output_type}'.")
        config = self.transformer.config
        device = self._execution_device
        if self.is_conditional:
            if class_labels is None:
                gen = generator[0] if isinstance(generator, list) else generator
                class_labels = torch.randint(
                    0, self.num_classes, (batch_size,), generator=gen, device=gen.device if gen else "cpu"
                )
            class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= self.num_classes):
                raise ValueError(f"class_labels must be in [0, {self.num_classes - 1}], got {class_labels.tolist()}.")
        else:
            if class_labels is not None:
                raise ValueError("This model is unconditional; pass batch_size instead of class_labels.")
            class_labels = torch.zeros(batch_size, dtype=torch.long)  # the single class of an unconditional DiT
        batch_size = class_labels.shape[0]
        class_labels = class_labels.to(device)
        use_guidance = guidance_scale != 1.0 and self.is_conditional

        channels = config.in_channels
        latents = randn_tensor(
            (batch_size, channels, config.sample_size, config.sample_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        latents = latents * self.scheduler.init_noise_sigma
        if use_guidance:
            null = torch.full_like(class_labels, config.num_embeds_ada_norm)  # null id = class count
            labels_in = torch.cat([class_labels, null])
        else:
            labels_in = class_labels
        learned_variance = self.scheduler.config.get("variance_type", None) in ("learned", "learned_range")

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if use_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]).to(device)
            output = self.transformer(
                model_input, timestep=timesteps, class_labels=labels_in
            ).sample  # [B', C or 2C, H, W]
            eps, rest = output[:, :channels], output[:, channels:]
            if use_guidance:
                eps_cond, eps_null = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
                rest = rest[:batch_size]
            model_output = torch.cat([eps, rest], dim=1) if learned_variance and rest.shape[1] else eps
            latents = self.scheduler.step(model_output, t, latents, generator=generator).prev_sample

        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            images = self.vae.decode(latents.to(self.vae.dtype)).sample
        else:
            images = latents
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()

        if output_type == "pt":
            output_images = images.cpu()
        else:
            output_images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                output_images = numpy_to_pil(output_images)
        if not return_dict:
            return (output_images,)
        return ImagePipelineOutput(images=output_images)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float NHWC in [0, 1] -> PIL images ("L" for one channel, "RGB" for three)."""
    uint8 = (images * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in uint8]
    return [Image.fromarray(image) for image in uint8]
