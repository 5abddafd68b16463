"""Pretrained timm / transformers trunks for the discriminators, read from local files only, checked before training.

Both discriminators (`StructureDiscriminator` with backbone `timm` / `transformers`, `TimestepDiscriminator` with trunk
`projected`) build their backbone here, so the same rules and messages hold in both training scripts:

- the weights come from a local file (timm: a `.safetensors` file or a torch state dict read with `weights_only=True`)
  or a local `save_pretrained` folder (transformers); nothing is downloaded;
- the file must hold every weight of the named architecture with the shapes that architecture has (a classifier it was
  trained with is dropped); anything else is an error naming the file, the key and the shapes;
- the first convolution (the *stem*) is where the file's input channels can differ from the discriminator input's
  (1-channel digits vs an RGB file, 4-channel latents vs any image file). `input_adapter` says what happens:

  - `"adapt"` (default): timm's `adapt_input_conv` of the pretrained stem. From RGB to 1 channel it sums the colour
    filters (exact for grey images); to any other count (e.g. 4 latent channels) it repeats the RGB filters cyclically
    and rescales them by 3/C. That is a heuristic, not a pretrained latent stem: the features of latents through it
    are those of an image network fed channels it was never trained on.
  - `"strict"`: a channel mismatch is an error.
  - `"reinit"`: the stem is freshly initialised for the input's channels (untrained) and, when the backbone is frozen,
    stays trainable so that it can learn the mapping into the frozen features.

  The other adapter for latents is to decode them (`train_sadm.py --disc_input pixel`): the pretrained stem then sees
  the pixels it was trained on.
"""

from __future__ import annotations

import os

import torch
from torch import nn

INPUT_ADAPTERS = ("adapt", "strict", "reinit")


def check_input_adapter(input_adapter: str) -> None:
    if input_adapter not in INPUT_ADAPTERS:
        raise ValueError(f"`input_adapter` must be one of {', '.join(INPUT_ADAPTERS)}, got {input_adapter!r}.")


def stem_conv(backbone: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first `nn.Conv2d` of `backbone` in module order (its stem / patch embedding) and its name, or None."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def reinit_stem_name(backbone: nn.Module, pretrained: bool, input_adapter: str) -> str | None:
    """The module name of the stem of a pretrained `backbone` built with `input_adapter='reinit'` (an untrained stem,
    which trains even when the rest of the trunk is frozen), else None."""
    return stem_conv(backbone)[0] if pretrained and input_adapter == "reinit" else None


def freeze_trunk(backbone: nn.Module, trainable_stem: str | None, requires_grad: bool = True) -> None:
    """Freeze `backbone` except its stem `trainable_stem` (see `reinit_stem_name`), which follows `requires_grad`."""
    backbone.requires_grad_(False)
    if trainable_stem is not None:
        backbone.get_submodule(trainable_stem).requires_grad_(requires_grad)


def read_state_dict(path: str, source: str) -> dict[str, torch.Tensor]:
    """A state dict from a local `.safetensors` file or torch file (`weights_only=True`); `source` names the flag."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: '{path}' is not a file.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated, pickled objects, ...
        raise ValueError(f"{source}: '{path}' could not be read as a weights file: {error}") from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]  # training checkpoints that wrap the weights
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{source}: '{path}' does not hold a state dict of tensors.")
    return state_dict


def match_state_dict(
    reference: nn.Module,
    state_dict: dict[str, torch.Tensor],
    in_channels: int,
    input_adapter: str,
    source: str,
    architecture: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """The weights of `state_dict` for `reference` (an initialised model of the target architecture and input
    channels): every key of `reference`, with the stem adapted by `input_adapter`; extra keys under `ignored_prefixes`
    (a classifier) are dropped, any other extra, missing or mis-shaped key is a ValueError naming `source`."""
    check_input_adapter(input_adapter)
    target = reference.state_dict()
    missing = [key for key in target if key not in state_dict]
    if missing:
        raise ValueError(
            f"{source} does not hold the weights of {architecture}: {len(missing)} of {len(target)} missing, e.g. "
            f"{missing[:4]} (saved from another architecture?)."
        )
    extra = [key for key in state_dict if key not in target and not key.startswith(ignored_prefixes)]
    if extra:
        raise ValueError(
            f"{source} holds weights that {architecture} does not have, e.g. {extra[:4]} (saved from a larger or "
            "different architecture?)."
        )
    stem = stem_conv(reference)
    stem_key = f"{stem[0]}.weight" if stem is not None and stem[1].in_channels == in_channels else None
    matched = {}
    for key, value in target.items():
        weight = state_dict[key]
        if weight.shape != value.shape:
            channels_only = (
                weight.ndim == 4 and weight.shape[:1] + weight.shape[2:] == value.shape[:1] + value.shape[2:]
            )
            if key != stem_key or not channels_only:
                raise ValueError(
                    f"{source}: '{key}' has shape {tuple(weight.shape)} but {architecture} has {tuple(value.shape)}."
                )
            if input_adapter == "strict":
                raise ValueError(
                    f"{source} was trained on {weight.shape[1]}-channel inputs (its stem '{key}'), but the "
                    f"discriminator input has {in_channels} channel(s); choose an input adapter ('adapt': timm's "
                    "adapt_input_conv of the pretrained stem, 'reinit': an untrained stem) or decode latents to pixels."
                )
            if input_adapter == "adapt":
                from timm.models import adapt_input_conv

                weight = adapt_input_conv(in_channels, weight.float(), base_chans=weight.shape[1]).to(weight.dtype)
            else:  # reinit: keep the reference model's fresh initialisation
                weight = value
        matched[key] = weight.to(value.dtype)
    return matched


def create_timm_backbone(
    model_name: str,
    in_channels: int,
    pretrained_path: str | None = None,
    input_adapter: str = "adapt",
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    source: str = "timm_pretrained_path",
) -> nn.Module:
    """`timm.create_model(model_name, num_classes=0, in_chans=in_channels)` (pooled features), or its `features_only`
    variant (feature maps of the scales `out_indices`), random-init or with the weights of the local `pretrained_path`
    checked by `match_state_dict` (`source` names the flag in messages)."""
    import timm

    kwargs = {"num_classes": 0, "in_chans": in_channels}
    if features_only:
        kwargs["features_only"] = True
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
    if pretrained_path is None:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    check_input_adapter(input_adapter)
    state_dict = read_state_dict(pretrained_path, source)
    where = f"{source} '{pretrained_path}'"
    if features_only:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        if all(
            key in state_dict for key in model.state_dict()
        ):  # saved from this features_only model (or names agree)
            # keys of modules the feature model does not keep (later stages, the classifier) are dropped
            children = {name for name, _ in model.named_children()}
            foreign = tuple(f"{key.split('.')[0]}." for key in state_dict if key.split(".")[0] not in children)
            architecture = f"timm '{model_name}' (features_only)"
            model.load_state_dict(
                match_state_dict(model, state_dict, in_channels, input_adapter, where, architecture, foreign)
            )
            return model
    reference = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state_dict = match_state_dict(
        reference,
        state_dict,
        in_channels,
        input_adapter,
        where,
        f"timm '{model_name}'",
        ignored_prefixes=tuple(f"{name}." for name in classifier),
    )
    # timm loads the checked state dict into the model before wrapping it for `features_only` (whose module names
    # differ from the classifier model's); the stem already has `in_channels`, so timm adapts nothing more
    overlay = {"state_dict": state_dict, "source": "", "num_classes": 0, "input_size": (in_channels, 224, 224)}
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def load_transformers_backbone(path: str, in_channels: int, input_adapter: str = "adapt", source: str = "path"):
    """`AutoModel.from_pretrained(path)` of a local transformers vision model folder (e.g. ViT, Dinov2, ConvNext;
    any task head it was saved with is dropped, a pooler it lacks is left at its initialisation: unused here), its stem
    fitted to `in_channels` by `input_adapter`. Errors name `source` and the folder."""
    from transformers import AutoConfig, AutoModel

    check_input_adapter(input_adapter)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{source}: '{path}' is not a folder (a transformers `save_pretrained` folder).")
    where = f"{source} '{path}'"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as error:
        raise ValueError(f"{where} could not be loaded as a transformers model: {error}") from error
    missing = [key for key in info.get("missing_keys", ()) if not key.startswith("pooler.")]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ValueError(
            f"{where} does not hold all weights of its {config.model_type} architecture: missing {sorted(missing)[:4]}, "
            f"mismatched {mismatched[:4]}."
        )
    file_channels = getattr(config, "num_channels", None)
    if file_channels is None or file_channels == in_channels:
        return model
    new_config = AutoConfig.from_pretrained(path, local_files_only=True, num_channels=in_channels)
    reference = AutoModel.from_config(new_config)
    state_dict = match_state_dict(
        reference, model.state_dict(), in_channels, input_adapter, where, f"its {config.model_type} architecture"
    )
    reference.load_state_dict(state_dict)
    return reference


def check_trunk_input(forward, backbone: nn.Module, in_channels: int, sample_size: int, source: str) -> None:
    """Run `forward` once on zeros `[2, in_channels, sample_size, sample_size]` (no graph, backbone in eval mode) and
    turn a failure (too small or fixed input size, wrong channels) into a ValueError naming `source`. A backbone on
    the meta device (diffusers' `from_pretrained` builds empty modules, then loads) is not run."""
    parameter = next(backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if device.type == "meta":  # built empty by `from_pretrained`: it was checked when it was first built
        return
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            forward(torch.zeros(2, in_channels, sample_size, sample_size, device=device, dtype=parameter.dtype))
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:
        raise ValueError(
            f"{source} cannot take the discriminator input [B, {in_channels}, {sample_size}, {sample_size}]: {error}"
        ) from error
    finally:
        backbone.train(was_training)
