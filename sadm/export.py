"""What a run writes for people: the exported pipeline folder (atomically), its model card, the `pipeline.py` that
loads it without sadm, and image grids."""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .checkpointing import fsync_tree


def atomic_save_pretrained(output_dir: str, write) -> None:
    """Run `write(tmp_dir)` and move each written entry into output_dir, replacing older ones only once all is written.

    `output_dir` also holds the checkpoints, so the export cannot be one rename: the entries are moved one by one, with
    `model_index.json` (what `DiffusionPipeline.from_pretrained` reads first) removed before and moved in last. A process
    killed during the moves leaves a folder without `model_index.json` (fails to load, loudly), never one that loads a
    mix of old and new weights; killed during `write`, the previous export is untouched.
    """
    root = Path(output_dir)
    tmp = root / ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(str(tmp))
    fsync_tree(tmp)
    index = root / "model_index.json"
    if (tmp / "model_index.json").exists() and index.exists():
        os.remove(index)
    for entry in sorted(tmp.iterdir(), key=lambda p: (p.name == "model_index.json", p.name)):
        target = root / entry.name
        if target.is_dir():
            old = root / f".old-{entry.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp)


def write_model_card(
    output_dir: str,
    title: str,
    lines: list[str],
    loads_without_sadm: bool = True,
    base_model: str | None = None,
    tags: tuple[str, ...] = ("sadm", "dit", "diffusion-transformer"),
) -> None:
    """README.md of an export: what was trained, how to load it, and the command that produced it.

    The metadata block is huggingface_hub's `ModelCardData` (valid YAML the Hub reads: `library_name: diffusers`,
    `base_model` for a fine-tune of a Hub model, the tags) completed by diffusers' `populate_model_card`. Not diffusers'
    `load_or_create_model_card`: it first looks the card up on the Hub, which fails offline and on a local folder.

    Args:
        output_dir (`str`): the export folder.
        title (`str`): the card's heading.
        lines (`list[str]`): markdown lines describing the run (data, model, objective).
        loads_without_sadm (`bool`): the folder holds a `pipeline.py`, so diffusers loads it with `trust_remote_code`.
        base_model (`str`, *optional*): the model fine-tuned; recorded in the metadata when it is a Hub repository id
            (a local folder is named in `lines` instead, since the Hub cannot resolve it).
        tags (`tuple[str, ...]`): Hub tags.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    command = " ".join(["accelerate launch"] + [a if " " not in a else repr(a) for a in sys.argv])
    body = [
        f"# {title}",
        "",
        *lines,
        "",
        "## Load",
        "```python",
        "import sadm  # registers the pipeline classes on diffusers",
        "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained('PATH')",
        "```",
        "Without installing sadm: `DiffusionPipeline.from_pretrained('PATH', custom_pipeline='pipeline', trust_remote_code=True)`."
        if loads_without_sadm
        else "Loading needs sadm installed (the model class lives in sadm).",
        "",
        "## Command",
        "```",
        command,
        "```",
    ]
    hub_base = base_model if base_model is not None and not os.path.exists(base_model) else None
    data = ModelCardData(library_name="diffusers", base_model=hub_base)
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body) + "\n"), tags=list(tags))
    card.save(os.path.join(output_dir, "README.md"))


def copy_pipeline_file(source_file: str, output_dir: str) -> None:
    """A `pipeline.py` in the folder lets diffusers load it without sadm installed (custom_pipeline + trust_remote_code)."""
    shutil.copyfile(source_file, os.path.join(output_dir, "pipeline.py"))


def image_grid(images: np.ndarray, rows: int | None = None, padding: int = 1) -> Image.Image:
    """Float NHWC images in [0, 1] -> one PIL grid with `padding` mid-grey pixels between cells.

    Not `diffusers.utils.make_image_grid`: that one butts the cells together, and 8x8 digits are unreadable without the
    grey lines between them (it also needs rows x cols == n, where this fills the last row partially)."""
    n, h, w, c = images.shape
    rows = rows or int(math.ceil(math.sqrt(n)))
    cols = int(math.ceil(n / rows))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 0.5, dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    array = (grid * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0], mode="L") if c == 1 else Image.fromarray(array)
