"""Feature networks: `torch.nn.Module`s mapping images `[N, C, H, W]` in [-1, 1] to features `[N, D]`, each with an
`.identity` string that statistics files record, so that numbers of two different networks never compare silently.

`InceptionFeatures` (the FID Inception-v3, weights from a local file only), `TimmFeatures` (any timm backbone),
`ModuleFeatures` (any module), `RandomConvFeatures` (tests and sanity checks) and `DigitsFeatures` (the digit classifier
of `sadm.evaluation.digits`). `build_feature_network` turns a flag value into one of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .digits import load_or_train_digit_classifier

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_NAME
)
# what `build_feature_network` builds by name, besides timm:<model name>
FEATURE_NETWORK_NAMES = ("digits", "inception", "pixels", "random")


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    """First 8 hex digits of a sha256 over the module's state dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 8 hex digits of a file's sha256 (the convention of torch hub file names such as `...-6726825d.pth`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def images_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """`[N, 1 or 3, H, W]` -> `[N, 3, H, W]` by repeating a single channel."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures(torch.nn.Module):
    """The FID Inception-v3 (TensorFlow graph of 2015-12-05) through torch-fidelity's `FeatureExtractorInceptionV3`.

    The weights are never downloaded: pass the local path of `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's file;
    torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` is the same file). Needs torch-fidelity
    (`pip install torch-fidelity`, or sadm's `inception` extra). The extractor's public forward returns the pool3
    features and the unbiased logits of the Inception Score in one pass.

    Args:
        weights_path (`str`): local path of the weights file.
        antialias (`bool`): resize to 299x299 with antialiased bilinear interpolation (torchmetrics' default), rounded back
            to uint8, instead of the TensorFlow-1 bilinear resize of the original FID code. Default False, so numbers are
            comparable with papers.

    Call: `images [N, C, H, W]` float in [-1, 1] -> pool3 features `[N, 2048]` (quantised to uint8 first, as FID does).
    """

    def __init__(self, weights_path: str | os.PathLike, antialias: bool = False):
        super().__init__()
        weights_path = Path(weights_path) if weights_path is not None else None
        if weights_path is None or not weights_path.is_file():
            raise FileNotFoundError(
                f"--inception_weights {weights_path} does not exist. FID needs the FID Inception-v3 weights "
                f"{INCEPTION_WEIGHTS_NAME}; sadm never downloads them. Fetch the file on a machine with internet access "
                f"({INCEPTION_WEIGHTS_URL}), copy it here and pass its path."
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ModuleNotFoundError(
                f"InceptionFeatures needs torch-fidelity: pip install torch-fidelity ({error})"
            ) from error
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
        ).eval()
        self.model.requires_grad_(False)
        self.antialias = antialias
        self.identity = f"inception_v3_fid_{file_fingerprint(weights_path)}" + ("_antialias" if antialias else "")

    def train(self, mode: bool = True) -> InceptionFeatures:
        super().train(mode)
        self.model.eval()  # batch norm stays in inference mode: the network is a fixed measuring instrument
        return self

    def _to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        images = ((images_to_rgb(images).float().clamp(-1, 1) + 1) * 127.5).round()  # [N, 3, H, W] in 0..255
        if self.antialias:
            size = self.model.INPUT_IMAGE_SIZE
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            images = images.round().clamp(0, 255)  # the TF-1 resize inside the extractor is then the identity
        return images.to(torch.uint8)

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool features `[N, 2048]` and the 1008 unbiased logits `[N, 1008]` used by the Inception Score."""
        device = next(self.model.parameters()).device
        features, logits = self.model(self._to_uint8(images).to(device))
        return features.reshape(images.shape[0], -1).float(), logits.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class TimmFeatures(torch.nn.Module):
    """Pooled features of a `timm` backbone (e.g. `vit_small_patch14_dinov2`); pretrained weights only from a local file.

    Args:
        model_name (`str`): a `timm.create_model` name.
        weights_path (`str`, *optional*): a local checkpoint in timm's format (`.safetensors` or `.pth`); the classifier head
            is dropped, every other weight must match. Without it the network is randomly initialised from `seed` (useful for
            tests and as a sanity baseline only; its identity says so).
        image_size (`int`, *optional*): resize inputs to this size (models with a fixed input size, such as ViTs, are
            built for it with `img_size=`); default the model's own input size.
        seed (`int`): initialisation seed when `weights_path` is not given.

    Call: `images [N, C, H, W]` float in [-1, 1] -> `[N, D]` (resized, 1 -> 3 channels, normalised with the model's mean/std).
    """

    def __init__(
        self,
        model_name: str,
        weights_path: str | os.PathLike | None = None,
        image_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        import timm

        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"--timm_weights {weights_path} does not exist (weights are never downloaded).")
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if pretrained_cfg is None:
            raise ValueError(f"--feature_network timm:{model_name}: timm knows no model of that name.")
        # models with a fixed input size (ViTs: position embeddings) are built for the size; CNNs take any size
        kwargs = {"img_size": image_size} if image_size is not None and pretrained_cfg.fixed_input_size else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if weights_path is not None:
            state_dict = timm.models.load_state_dict(str(weights_path))
            head = self.model.pretrained_cfg.get("classifier")
            heads = (head,) if isinstance(head, str) else tuple(head or ())
            state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(h + ".") for h in heads)}
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"--timm_weights {weights_path} does not fit timm model '{model_name}': missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}."
                )
            self.identity = f"timm_{model_name}_{file_fingerprint(weights_path)}"
        else:
            self.identity = f"timm_{model_name}_random_seed{seed}"
        self.model.eval().requires_grad_(False)
        data_config = timm.data.resolve_model_data_config(self.model)
        self.image_size = image_size or data_config["input_size"][-1]
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)
        if image_size is not None:
            self.identity += f"_{image_size}px"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images_to_rgb(images).to(self.mean.device, torch.float32)
        images = (images + 1) / 2  # [-1, 1] -> [0, 1]
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        features = self.model((images.clamp(0, 1) - self.mean) / self.std)
        return features.reshape(features.shape[0], -1)  # [N, D]


class ModuleFeatures(torch.nn.Module):
    """Any `nn.Module` as a feature network: `images [N, C, H, W]` in [-1, 1] -> `module(images)` flattened to `[N, D]`.

    Args:
        module (`torch.nn.Module`): receives the images unchanged (it does its own resizing or channel handling).
        identity (`str`, *optional*): recorded in statistics files; default the class name plus a fingerprint of the
            module's weights, so statistics of differently-trained modules never compare silently.
    """

    def __init__(self, module: torch.nn.Module, identity: str | None = None):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.identity = identity or f"{type(module).__name__}_{state_dict_fingerprint(module)}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.module(images)
        return features.reshape(features.shape[0], -1)  # [N, D]


class RandomConvFeatures(torch.nn.Module):
    """A fixed, randomly initialised conv layer + pooling as a feature network: cheap, offline, any image size.

    A sanity baseline and a stand-in for tests only: its numbers compare runs measured with the same seed, nothing else.
    Call: `images [N, 1 or 3, H, W]` in [-1, 1] -> `[N, 64]`.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # initialisation never touches the caller's RNG
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.requires_grad_(False)
        self.identity = f"random_conv_seed{seed}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images_to_rgb(images).to(self.conv.weight.device, torch.float32)
        features = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(images)), 2)  # [N, 16, 2, 2]
        return features.reshape(features.shape[0], -1)  # [N, 64]


class DigitsFeatures(torch.nn.Module):
    """The digit classifier as a feature network for `sadm.metrics` ("digits-FID") and a classifier (accuracy, digits-IS).

    Inputs `[N, 1 or 3, H, W]` in [-1, 1]; RGB is averaged to grey and other sizes are resized (bilinear, antialiased) to
    the classifier's resolution. The identity is `digit_classifier_r{R}_<weights fingerprint>`, so statistics saved with
    one trained classifier never compare silently against another.

    Args:
        resolution (`int`): classifier resolution (use the data resolution).
        cache_dir (`str`, *optional*): see `load_or_train_digit_classifier`.
        seed (`int`): see `load_or_train_digit_classifier`.
    """

    def __init__(self, resolution: int = 16, cache_dir: str | os.PathLike | None = None, seed: int = 0):
        super().__init__()
        self.classifier, self.heldout_accuracy = load_or_train_digit_classifier(resolution, cache_dir, seed)
        self.classifier.requires_grad_(False)
        self.resolution = resolution
        self.identity = f"digit_classifier_r{resolution}_{state_dict_fingerprint(self.classifier)}"

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}.")
        images = images.to(self.classifier.device, torch.float32)
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)  # [N, 1, H, W]
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return images

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features `[N, 128]` and logits `[N, 10]`."""
        output = self.classifier.eval()(self._prepare(images), return_dict=True)
        return output.features, output.logits

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


def check_feature_network_name(name: str, flag: str = "--feature_network") -> None:
    """Raise naming `flag` unless `name` is one of `FEATURE_NETWORK_NAMES` or `timm:<model name>`."""
    if not (name in FEATURE_NETWORK_NAMES or (name.startswith("timm:") and len(name) > len("timm:"))):
        raise ValueError(f"{flag} must be {', '.join(FEATURE_NETWORK_NAMES)} or timm:<name>, got '{name}'.")


def build_feature_network(
    name: str,
    resolution: int,
    accelerator: Accelerator,
    inception_weights: str | os.PathLike | None = None,
    timm_weights: str | os.PathLike | None = None,
    timm_image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """A feature network by name, with an `.identity`, on `accelerator.device`.

    Args:
        name (`str`): `digits` (the digit classifier at `resolution`, trained and cached in `cache_dir` on first use),
            `inception` (needs `inception_weights`), `pixels` (the raw pixels, C·H·W features: no learned network),
            `random` (a fixed random conv) or `timm:<model name>` (random init unless `timm_weights`).
    """
    check_feature_network_name(name)
    if name == "digits":
        with accelerator.main_process_first():  # the first run trains and caches the classifier once
            network = DigitsFeatures(resolution=resolution, cache_dir=cache_dir)
    elif name == "inception":
        network = InceptionFeatures(inception_weights)
    elif name == "pixels":
        network = ModuleFeatures(torch.nn.Flatten(), identity=f"pixels_r{resolution}")
    elif name == "random":
        network = RandomConvFeatures()
    else:
        network = TimmFeatures(name[len("timm:") :], timm_weights, image_size=timm_image_size)
    return network.to(accelerator.device)
