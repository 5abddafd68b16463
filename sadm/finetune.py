"""Fine-tuning a DiT: new label sets and parameter-efficient training (DiffFit, LoRA), merged back into a plain DiT.

- **New label sets.** diffusers' `DiTTransformer2DModel` keeps one label table per block
  (`transformer_blocks[i].norm1.emb.class_embedder.embedding_table`, K0 class rows + the null row K0). `relabel_dit`
  gives every table K class rows + the null row K (copied from the old null row):
  `random` (new rows ~ N(0, σ²), σ the std of the old class rows of that table), `mean` (every new row = the mean of the
  old class rows), `map` (new class → old row, unmapped classes → the mean).
- **DiffFit** (Xie et al. 2023, arXiv 2304.06648): train the biases, the norms' affine parameters, the label tables and a
  learnable per-channel scale γ (init 1) on each block's attention and MLP residual branches; freeze the rest:
  x ← x + γ_attn ⊙ gate_msa ⊙ Attn(·),   x ← x + γ_mlp ⊙ gate_mlp ⊙ MLP(·).
  γ multiplies the output of the branch's last linear layer (`attn1.to_out.0`, `ff.net.2`), so it folds exactly into
  that layer: γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b.
- **LoRA** (Hu et al. 2021) via `peft`: W x + (α/r) B A x on the attention projections and MLP linears, A, B trained
  (plus the label tables, which must learn new classes); merged W' = W + (α/r) B A.

`merged_dit` turns any of these back into a standard `DiTTransformer2DModel` (same config, same keys), so exports load
with `DiffusionPipeline.from_pretrained` without peft or sadm-specific code.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from sadm.models.dit import disable_label_dropout

LABEL_INITS = ("random", "mean", "map")
TRAINABLE_MODES = ("full", "difffit", "lora")
# attention q/k/v/out and the two MLP linears of every block (peft matches module-name suffixes)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
DIFFFIT_GAMMA = "difffit_gamma"  # parameter name of γ on the branch's output linear


# ---------------------------------------------------------------------------------------------------- new label sets
def label_tables(model: DiTTransformer2DModel) -> list[LabelEmbedding]:
    """Every label embedding of the model (one per block in diffusers' DiT)."""
    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def is_label_table_parameter(name: str) -> bool:
    """Whether a parameter name is one of the label tables (`...norm1.emb.class_embedder.embedding_table.weight`)."""
    return "class_embedder" in name


def label_spread(model: DiTTransformer2DModel) -> float:
    """How far apart the class rows are: the std over class rows per coordinate, averaged over coordinates and blocks."""
    return torch.stack([t.embedding_table.weight[:-1].std(0).mean() for t in label_tables(model)]).mean().item()


def parse_label_map(spec: str) -> dict[str, str]:
    """`--label_map`: a JSON file `{"new name": old id or old name, ...}` or inline `new=old,new=old`."""
    if os.path.isfile(spec):
        with open(spec) as f:
            try:
                mapping = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"--label_map {spec} is not valid JSON: {error}") from error
        if not isinstance(mapping, dict):
            raise ValueError(f"--label_map {spec} must hold a JSON object {{new class name: old class id}}.")
        return {str(k): str(v) for k, v in mapping.items()}
    mapping = {}
    for item in spec.split(","):
        new, sep, old = item.partition("=")
        if not sep or not new.strip() or not old.strip():
            raise ValueError(
                f"--label_map entry {item!r} is not `new_name=old_id` (or pass a JSON file; got {spec!r})."
            )
        mapping[new.strip()] = old.strip()
    return mapping


def resolve_label_map(
    mapping: dict[str, str], new_id2label: dict[int, str], old_num_classes: int, old_id2label: dict | None = None
) -> dict[int, int]:
    """Names → ids: new class names must be classes of the data; old classes are ids in [0, K0) or old class names."""
    new_ids = {name: i for i, name in new_id2label.items()}
    unknown = [name for name in mapping if name not in new_ids]
    if unknown:
        raise ValueError(
            f"--label_map names classes that are not in the data: {unknown}; the data's classes are {sorted(new_ids)}."
        )
    old_ids = {str(name): int(i) for i, name in (old_id2label or {}).items()}
    resolved = {}
    for name, old in mapping.items():
        if old in old_ids:
            old_id = old_ids[old]
        elif old.lstrip("-").isdigit():
            old_id = int(old)
        else:
            raise ValueError(
                f"--label_map {name}={old}: {old!r} is neither a class id of the pretrained model nor one of its "
                f"class names {sorted(old_ids)}."
            )
        if not 0 <= old_id < old_num_classes:
            raise ValueError(
                f"--label_map {name}={old}: the pretrained model has classes 0..{old_num_classes - 1} (null row excluded)."
            )
        resolved[new_ids[name]] = old_id
    return resolved


@torch.no_grad()
def relabel_dit(
    model: DiTTransformer2DModel,
    num_classes: int,
    label_init: str,
    label_map: dict[int, int] | None = None,
    seed: int = 0,
) -> DiTTransformer2DModel:
    """Give every label table of `model` `num_classes` class rows plus the null row (id `num_classes`), in place.

    Args:
        model (`DiTTransformer2DModel`): a class-conditional DiT with K0 = `config.num_embeds_ada_norm` classes; its tables
            have K0 + 1 rows, the last being the null (unconditional) row.
        num_classes (`int`): K, the new class count (>= 1). An unconditional fine-tune uses K = 1 with `label_init="mean"`
            replaced by the null row: see `unconditional_dit`.
        label_init (`str`): `random`, `mean` or `map` (see the module docstring).
        label_map (`dict[int, int]`, *optional*): new class id → old class id (for `map`; unmapped classes get the mean).
        seed (`int`): seed of the `random` rows (a private generator; the global RNG is untouched).
    """
    if label_init not in LABEL_INITS:
        raise ValueError(f"--label_init must be one of {LABEL_INITS}, got {label_init!r}.")
    if num_classes < 1:
        raise ValueError(f"A relabelled DiT needs at least one class, got {num_classes}.")
    old_classes = model.config.num_embeds_ada_norm
    generator = torch.Generator().manual_seed(seed)
    for table in label_tables(model):
        old = table.embedding_table.weight
        if old.shape[0] != old_classes + 1:
            raise ValueError(
                f"A label table has {old.shape[0]} rows; expected {old_classes} classes + the null row (a DiT built "
                "with label dropout > 0, as diffusers does)."
            )
        rows, null_row = old[:old_classes], old[old_classes]
        mean = rows.mean(0)
        if label_init == "random":
            std = rows.std() if old_classes > 1 else old.std()
            new_rows = torch.randn(num_classes, old.shape[1], generator=generator).to(old) * std
        else:
            new_rows = mean.expand(num_classes, -1).clone()
            for new_id, old_id in (label_map or {}).items():
                new_rows[new_id] = rows[old_id]
        embedding = torch.nn.Embedding(num_classes + 1, old.shape[1], device=old.device, dtype=old.dtype)
        embedding.weight.copy_(torch.cat([new_rows, null_row[None]]))
        embedding.weight.requires_grad_(old.requires_grad)
        table.embedding_table, table.num_classes = embedding, num_classes
    model.register_to_config(num_embeds_ada_norm=num_classes)
    return disable_label_dropout(model)


@torch.no_grad()
def unconditional_dit(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Unconditional fine-tuning of a class-conditional DiT: a single class 0 (sadm's unconditional convention, always
    passed) whose row starts as the old null row, so every sample starts from the model's unconditional prediction."""
    relabel_dit(model, 1, "mean")
    for table in label_tables(model):
        table.embedding_table.weight[0] = table.embedding_table.weight[1]  # the old null row (kept last)
    return model


# ---------------------------------------------------------------------------------------------------- DiffFit, LoRA
def _scale_by_gamma(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output * getattr(module, DIFFFIT_GAMMA)


def difffit_branch_outputs(model: DiTTransformer2DModel) -> list[torch.nn.Linear]:
    """The last linear layer of each block's attention and MLP branches: where DiffFit's γ acts."""
    layers = []
    for block in model.transformer_blocks:
        layers += [block.attn1.to_out[0], block.ff.net[-1]]
    if not all(isinstance(layer, torch.nn.Linear) for layer in layers):
        raise TypeError("DiffFit expects diffusers' DiT blocks (attn1.to_out[0] and ff.net[-1] linear).")
    return layers


def add_difffit_scales(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Register γ (ones, one per output channel) on every branch output linear and multiply its output by γ."""
    for layer in difffit_branch_outputs(model):
        gamma = torch.nn.Parameter(
            torch.ones(layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
        )
        layer.register_parameter(DIFFFIT_GAMMA, gamma)
        layer.register_forward_hook(_scale_by_gamma)
    return model


def is_difffit_parameter(name: str, param: torch.nn.Parameter, model: torch.nn.Module) -> bool:
    """DiffFit's trainable set: biases, γ, norm affine parameters, label tables."""
    if name.endswith(".bias") or name.endswith(DIFFFIT_GAMMA) or is_label_table_parameter(name):
        return True
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm))


def add_lora(
    model: DiTTransformer2DModel, rank: int, alpha: float, target_modules: list[str] | tuple[str, ...]
) -> DiTTransformer2DModel:
    """Inject peft LoRA adapters (A ~ Kaiming, B = 0: the model is unchanged at the start)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("--trainable lora needs peft: `pip install peft`.") from error
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    try:
        return inject_adapter_in_model(config, model)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"--lora_target_modules {list(target_modules)}: {error}") from error


def setup_trainable(
    model: DiTTransformer2DModel,
    mode: str,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_target_modules: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
) -> DiTTransformer2DModel:
    """Prepare `model` for `--trainable full|difffit|lora` and set `requires_grad` on exactly the trained parameters.

    LoRA trains the adapters and the label tables (new classes need trained rows). `lora_alpha` defaults to the rank
    (scale α/r = 1)."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"--trainable must be one of {TRAINABLE_MODES}, got {mode!r}.")
    if mode == "full":
        return model.requires_grad_(True)
    if mode == "difffit":
        add_difffit_scales(model)
        for name, param in model.named_parameters():
            param.requires_grad_(is_difffit_parameter(name, param, model))
        return model
    add_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank, lora_target_modules)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or is_label_table_parameter(name))
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_param_groups(model: torch.nn.Module, label_learning_rate: float | None = None) -> list[dict]:
    """The trainable parameters as optimizer groups; with `label_learning_rate` the label tables get their own LR.

    A new label set starts from random or mean rows, every class alike; at the full-tuning LR (1e-4) Adam moves each
    coordinate by at most ~lr per step, so a few hundred steps barely separate the classes (docs/FINETUNING.md).
    A separate, larger LR for the tables alone (a few thousand parameters) lets the classes separate without
    raising the LR of the pretrained weights.
    """
    if label_learning_rate is None:
        return [{"params": trainable_parameters(model)}]
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in params if not is_label_table_parameter(name)]},
        {"params": [p for name, p in params if is_label_table_parameter(name)], "lr": label_learning_rate},
    ]
    return [group for group in groups if group["params"]]


def is_plain_dit(model: torch.nn.Module) -> bool:
    """No DiffFit scales and no LoRA layers: the model saves and loads as a standard `DiTTransformer2DModel`."""
    return not any(name.endswith(DIFFFIT_GAMMA) or "lora_" in name for name, _ in model.named_parameters())


@torch.no_grad()
def merged_dit(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A standard `DiTTransformer2DModel` computing the same function: γ folded into the branch outputs, LoRA merged.

    `model` is left untouched (the work happens on a copy). A plain DiT is returned as is.
    """
    if is_plain_dit(model):
        return model
    work = copy.deepcopy(model)
    for module in work.modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, DIFFFIT_GAMMA):
            gamma = getattr(module, DIFFFIT_GAMMA)
            module.weight.mul_(gamma[:, None])  # γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b
            if module.bias is not None:
                module.bias.mul_(gamma)
            delattr(module, DIFFFIT_GAMMA)
    lora_layers = [(name, m) for name, m in work.named_modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]
    for name, layer in lora_layers:
        layer.merge()  # W ← W + (α/r) B A
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, layer.get_base_layer())
    plain = DiTTransformer2DModel.from_config(model.config)
    plain.load_state_dict(work.state_dict(), strict=True)
    return disable_label_dropout(plain.to(next(model.parameters()).device).train(model.training))


def pretrained_id2label(pretrained_model_name_or_path: str | None) -> dict[int, str] | None:
    """The class names stored in a pretrained pipeline's `model_index.json` (`id2label`), or None."""
    if pretrained_model_name_or_path is None:
        return None
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path)
    except (OSError, ValueError):
        return None
    id2label = config.get("id2label")
    return {int(k): str(v) for k, v in id2label.items()} if id2label else None


def relabel_for_data(
    model: DiTTransformer2DModel,
    num_classes: int,
    id2label: dict[int, str] | None,
    label_init: str | None,
    label_map: str | None = None,
    old_id2label: dict[int, str] | None = None,
    seed: int = 0,
    source: str = "the model",
) -> DiTTransformer2DModel:
    """Fit a loaded DiT's label tables to the data: K classes (`num_classes`, 0 = unconditional data).

    Same class count and no `label_init`: unchanged. A different count needs `label_init`. Unconditional data on a
    class-conditional model: one class whose row starts as the old null row (`unconditional_dit`).
    """
    old_classes = model.config.num_embeds_ada_norm
    if num_classes == 0:
        return unconditional_dit(model) if old_classes > 1 else model
    if label_init is None:
        if old_classes != num_classes:
            raise ValueError(
                f"{source} has {old_classes} classes but the data has {num_classes}; pass --label_init random|mean|map "
                "to give it a new label table."
            )
        return model
    mapping = None
    if label_init == "map":
        mapping = resolve_label_map(parse_label_map(label_map), id2label, old_classes, old_id2label)
    return relabel_dit(model, num_classes, label_init, mapping, seed)
