"""Sampling pipeline for one-step generators trained with sadm's Diffusion-GAN trainer (`scripts/train_diffusion_gan.py`).

Inference only; imports torch, diffusers, numpy and PIL and nothing from sadm. The pipeline code works with any
`ModelMixin` generator whose config has `latent_dim` and `num_classes` and whose forward is
`gan(z [B, latent_dim], class_labels [B] or None).sample -> [B, C, H, W] in [-1, 1]`.

Loading an exported folder:
- with sadm installed: `import sadm` then `DiffusionPipeline.from_pretrained(folder)` (or
  `DiffusionGANPipeline.from_pretrained(folder)`). The generator's class is `sadm.models.generator.GANGenerator`, which
  `model_index.json` records under its module path; diffusers resolves that module from `sys.modules`, and
  `import sadm` imports it.
- without sadm: this file alone is not enough, because diffusers cannot build the `gan` component without its class
  (it never imports a module named by a repository). `custom_pipeline="pipeline"` therefore fails at the `gan`
  component; install sadm (its generator module needs only torch and diffusers).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor


class DiffusionGANPipeline(DiffusionPipeline):
    r"""
    One forward pass of a GAN generator: z ~ N(0, I) (+ class labels) -> images.

    Args:
        gan ([`ModelMixin`]): the generator (sadm's `GANGenerator`); named `gan` so that it does not clash with the
            `generator` (`torch.Generator`) argument of `__call__`.
        id2label (`dict[int, str]`, *optional*): class names of a class-conditional generator.
    """

    model_cpu_offload_seq = "gan"

    def __init__(self, gan: ModelMixin, id2label: dict | None = None):
        super().__init__()
        self.register_modules(gan=gan)
        id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        if id2label is not None and gan.config.num_classes is None:
            raise ValueError("id2label was given but the generator is unconditional (num_classes=None).")
        self.register_to_config(id2label=id2label)
        self.labels = {name: index for index, name in id2label.items()} if id2label else {}

    @property
    def is_conditional(self) -> bool:
        return self.gan.config.num_classes is not None

    @property
    def num_classes(self) -> int:
        return self.gan.config.num_classes if self.is_conditional else 0

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
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`list[int]`, *optional*): one class id per image. For a conditional model without labels,
                `batch_size` labels are drawn uniformly with `generator`. Must be `None` for an unconditional model.
            batch_size (`int`): number of images when `class_labels` is not given.
            guidance_scale (`float`): must be 1 (a GAN generator has no classifier-free guidance); accepted so that
                callers written for diffusion pipelines (e.g. `scripts/sample.py`) work unchanged.
            generator (`torch.Generator`, *optional*): makes sampling deterministic (draws the labels, then z).
            num_inference_steps (`int`, *optional*): ignored: the generator is one step. Accepted for the same reason.
            output_type (`str`): `"pil"`, `"np"` (float NHWC in [0, 1]) or `"pt"` (float NCHW in [0, 1]).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got '{output_type}'.")
        if guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale}: a GAN generator has no classifier-free guidance; use 1."
            )
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
            batch_size = class_labels.shape[0]
            class_labels = class_labels.to(device)
        elif class_labels is not None:
            raise ValueError("This model is unconditional; pass batch_size instead of class_labels.")

        z = randn_tensor(
            (batch_size, self.gan.config.latent_dim), generator=generator, device=device, dtype=self.gan.dtype
        )
        images = self.gan(z, class_labels=class_labels).sample  # [B, C, H, W] in [-1, 1]
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
