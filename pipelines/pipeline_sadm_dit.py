"""Sampling pipeline for DiTs trained with sadm: pixel or latent, class-conditional or unconditional, any diffusers scheduler.

Inference only; imports torch and diffusers and nothing from the training code, so this file also works as a single-file
custom pipeline (`DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)`).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401  (any diffusers scheduler works)
from diffusers.utils.torch_utils import randn_tensor


class SADMDiTPipeline(DiffusionPipeline):
    r"""
    Class-conditional or unconditional DiT sampling with classifier-free guidance whose null class comes from the model.

    Unlike diffusers' `DiTPipeline`, the null class id is the model's class count (`transformer.config.num_embeds_ada_norm`),
    never a hard-coded 1000, the VAE is optional (pixel-space DiTs), and a learned σ is used: a learned-σ transformer
    (`out_channels == 2 * in_channels`) with a `DDPMScheduler` steps with `variance_type="learned_range"`, whichever
    fixed variance type the saved scheduler names (sadm exports save `"fixed_small"`, which diffusers' `DiTPipeline`
    steps as it is after dropping the σ channels). Other schedulers get the σ channels only when they take a
    `variance_type` and it is `"learned"` or `"learned_range"`, and ε alone otherwise (DDIM, DPM-Solver, Euler, ...).

    Guidance policy: by default the guided output is applied to all channels of ε at every step (as diffusers'
    `DiTPipeline`); `guidance_channels=3` applies it to the first 3 of 4 latent channels as the original DiT code, and
    `guidance_interval` limits it to a part of the trajectory (Kynkäänniemi et al., 2024).

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
        guidance_interval: tuple[float, float] | None = None,
        guidance_channels: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`list[int]`, *optional*): one class id per image. For a conditional model without labels,
                `batch_size` labels are drawn uniformly with `generator`. Must be `None` for an unconditional model.
            batch_size (`int`): number of images when `class_labels` is not given.
            guidance_scale (`float`): classifier-free guidance scale w, ε = ε_null + w·(ε_cond − ε_null); 1 disables it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling deterministic; a list
                holds one generator per image (the initial noise and the scheduler's per-step noise of image i come
                from `generator[i]`, so an image does not depend on the batch it is sampled in).
            num_inference_steps (`int`): denoising steps of the scheduler.
            output_type (`str`): `"pil"`, `"np"` (float NHWC in [0, 1]) or `"pt"` (float NCHW in [0, 1]).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a tuple.
            guidance_interval (`tuple[float, float]`, *optional*): `(low, high)` with 0 <= low < high <= 1: guidance is
                applied only at steps whose t / T (T = `scheduler.config.num_train_timesteps`; 1 is noise, 0 is clean)
                lies in [low, high]; the other steps evaluate the conditional model alone. `None`: every step.
            guidance_channels (`int`, *optional*): guide only the first `guidance_channels` channels of ε and take the
                conditional ε for the others (the original DiT code guides 3 of 4 latent channels). `None`: all.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got '{output_type}'.")
        config = self.transformer.config
        device = self._execution_device
        channels = config.in_channels
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] < guidance_interval[1] <= 1.0:
                raise ValueError(
                    f"guidance_interval must be (low, high) with 0 <= low < high <= 1, got {tuple(guidance_interval)}."
                )
        if guidance_channels is not None and not 1 <= guidance_channels <= channels:
            raise ValueError(
                f"guidance_channels must be in [1, {channels}] (ε has {channels}), got {guidance_channels}."
            )
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
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {batch_size} images; give one each."
            )
        class_labels = class_labels.to(device)
        use_guidance = guidance_scale != 1.0 and self.is_conditional

        latents = randn_tensor(
            (batch_size, channels, config.sample_size, config.sample_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        scheduler = self.scheduler
        if config.out_channels == 2 * channels and isinstance(scheduler, DDPMScheduler):  # a learned-σ DiT
            if not scheduler.variance_type.startswith("learned"):  # sadm saves "fixed_small" for DiTPipeline's sake
                scheduler = DDPMScheduler.from_config(scheduler.config, variance_type="learned_range")
        latents = latents * scheduler.init_noise_sigma
        null = torch.full_like(class_labels, config.num_embeds_ada_norm)  # null id = class count
        # from_config carries a DDPM config's variance_type into schedulers that have none (DDIM, ...): ask the class
        takes_variance = "variance_type" in inspect.signature(type(scheduler).__init__).parameters
        learned_variance = takes_variance and scheduler.config.variance_type in ("learned", "learned_range")
        # diffusers' convention: only schedulers whose step draws noise take a generator (Heun, UniPC, ... do not)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        num_train_timesteps = scheduler.config.num_train_timesteps

        scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(scheduler.timesteps):
            guide = use_guidance and (
                guidance_interval is None
                or guidance_interval[0] <= float(t) / num_train_timesteps <= guidance_interval[1]
            )
            model_input = torch.cat([latents, latents]) if guide else latents
            labels_in = torch.cat([class_labels, null]) if guide else class_labels
            model_input = scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]).to(device)
            output = self.transformer(
                model_input, timestep=timesteps, class_labels=labels_in
            ).sample  # [B or 2B, C or 2C, H, W]
            eps, rest = output[:, :channels], output[:, channels:]
            if guide:
                eps_cond, eps_null = eps.chunk(2)  # [B, C, H, W] each
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
                if guidance_channels is not None:  # DiT: the guided first k channels, the conditional rest
                    eps = torch.cat([eps[:, :guidance_channels], eps_cond[:, guidance_channels:]], dim=1)
                rest = rest[:batch_size]
            model_output = torch.cat([eps, rest], dim=1) if learned_variance and rest.shape[1] else eps
            latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample

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
                output_images = self.numpy_to_pil(output_images)
        if not return_dict:
            return (output_images,)
        return ImagePipelineOutput(images=output_images)
