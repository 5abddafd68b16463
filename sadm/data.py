"""Every image source -> (image tensor in [-1, 1], class label or none).

Three ways in, one dataset class out:
- `--dataset_name`: a 🤗 datasets dataset (hub name, a `save_to_disk` folder, or anything `load_dataset` reads);
- `--train_data_dir`: an image folder with class subfolders, or with a `metadata.csv` / `metadata.jsonl` naming files and labels;
- neither: the embedded default, scikit-learn's `load_digits()` (1797 real 8x8 handwritten digits, 10 classes), written once
  as an image folder into a cache directory and then read through the same image-folder path.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# PIL modes that carry a single intensity channel; everything else is read as RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def default_cache_dir() -> Path:
    """`$SADM_CACHE` or `~/.cache/sadm`: where the embedded dataset and the digit classifier are written once."""
    return Path(os.environ.get("SADM_CACHE", Path.home() / ".cache" / "sadm"))


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """scikit-learn digits have 17 grey levels (0..16); map them to uint8 the one way every part of sadm uses."""
    return np.round(images * 255.0 / 16.0).astype(np.uint8)


def digits_image_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write scikit-learn's digits once as `<cache>/digits/<label>/<index>.png` (8x8, mode "L") and return the folder.

    Written to a temporary folder and renamed into place, so an interrupted first run never leaves a half-written dataset.
    """
    from sklearn.datasets import load_digits

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "digits"
    if (folder / "DONE").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"digits.tmp-{os.getpid()}"
    digits = load_digits()
    pixels = digits_to_uint8(digits.images)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        label_dir = tmp / str(int(label))
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(label_dir / f"{index:04d}.png")
    (tmp / "DONE").write_text("scikit-learn load_digits, 1797 images, 8x8, labels 0-9\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        if not (folder / "DONE").exists():
            raise
    return folder


# Regions (left, top, right, bottom) of scikit-learn's two sample photographs (640x427) that make the classes of
# `sample_crops_image_folder`: a fine-tuning target unlike the digits that ships with an installed package.
SAMPLE_CROP_REGIONS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "building": ("china.jpg", (90, 80, 330, 340)),  # the pagoda
    "leaves": ("flower.jpg", (0, 0, 160, 420)),  # the dark, blurred foliage left of the dahlia
    "petals": ("flower.jpg", (210, 130, 390, 310)),  # inside the dahlia
    "sky": ("china.jpg", (370, 0, 620, 130)),  # hazy sky right of the pagoda
}


def sample_crops_image_folder(
    output_dir: str | os.PathLike, per_class: int = 100, size: int = 16, seed: int = 0
) -> Path:
    """Write greyscale `size`x`size` crops of scikit-learn's sample photographs as `<output_dir>/<class>/<i>.png`.

    Each crop is a random square window of 32-64 px inside the class's region (`SAMPLE_CROP_REGIONS`), resized to
    `size` with a box filter. Deterministic for a given `seed`; refuses a non-empty `output_dir`.
    """
    from sklearn.datasets import load_sample_images

    root = Path(output_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; choose a new folder for the crops.")
    photos = load_sample_images()
    images = {
        Path(name).name: Image.fromarray(array).convert("L") for name, array in zip(photos.filenames, photos.images)
    }
    rng = np.random.default_rng(seed)
    for name, (photo, (left, top, right, bottom)) in SAMPLE_CROP_REGIONS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            window = int(rng.integers(32, min(64, right - left, bottom - top) + 1))
            x = int(rng.integers(left, right - window + 1))
            y = int(rng.integers(top, bottom - window + 1))
            crop = images[photo].crop((x, y, x + window, y + window)).resize((size, size), Image.Resampling.BOX)
            crop.save(root / name / f"{i:04d}.png")
    return root


def _label_table(raw_labels: list) -> tuple[list[int], dict[int, str]]:
    """Map raw labels (ints or names) to ids 0..K-1. Integer labels keep their value; names are sorted."""
    if all(
        isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
        for v in raw_labels
    ):
        ints = [int(v) for v in raw_labels]
        if min(ints) < 0:
            raise ValueError(f"Label {min(ints)} is out of range: integer labels must be >= 0.")
        num_classes = max(ints) + 1
        return ints, {i: str(i) for i in range(num_classes)}
    names = sorted({str(v) for v in raw_labels})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in raw_labels], dict(enumerate(names))


def _read_metadata(
    folder: Path, label_column: str | None, on_bad_image: str = "error"
) -> tuple[list[Path], list | None]:
    """Files and raw labels from `metadata.csv` or `metadata.jsonl` (column `file_name`, as 🤗 imagefolder uses).

    A row without a label stops the run naming it (`on_bad_image="error"`) or is dropped with one warning ("skip").
    """
    csv_path, jsonl_path = folder / "metadata.csv", folder / "metadata.jsonl"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows, source = list(csv.DictReader(f)), csv_path
    else:
        with open(jsonl_path) as f:
            rows, source = [json.loads(line) for line in f if line.strip()], jsonl_path
    if not rows:
        raise ValueError(f"{source} has no rows.")
    columns = list(rows[0].keys())
    if "file_name" not in columns:
        raise ValueError(f"{source} needs a `file_name` column; it has {columns}.")
    files = [folder / row["file_name"] for row in rows]
    if label_column is None or (label_column == "label" and label_column not in columns):
        return files, None
    if label_column not in columns:
        raise ValueError(f"--label_column '{label_column}' is not a column of {source}; columns are {columns}.")
    kept_files, labels, unlabeled = [], [], []
    for line, (path, row) in enumerate(zip(files, rows), start=2 if source == csv_path else 1):
        value = row.get(label_column)
        if value is None or value == "":
            description = f"{source}, row {line} ({row['file_name']})"
            if on_bad_image == "error":
                raise ValueError(
                    f"{description}: missing value in label column '{label_column}' "
                    "(--on_bad_image skip drops such rows)."
                )
            unlabeled.append(description)
            continue
        kept_files.append(path)
        labels.append(value)
    if unlabeled:
        warnings.warn(
            f"--on_bad_image skip: dropped {len(unlabeled)} row(s) without a value in label column '{label_column}', "
            f"e.g. {unlabeled[:3]}.",
            stacklevel=3,
        )
    if not kept_files:
        raise ValueError(f"{source}: no row has a value in label column '{label_column}'.")
    return kept_files, labels


def scan_image_folder(
    folder: str | os.PathLike, label_column: str | None = "label", on_bad_image: str = "error"
) -> tuple[list[Path], list[int] | None, dict[int, str] | None]:
    """Files, label ids and `id2label` of an image folder.

    Layouts: `metadata.csv`/`metadata.jsonl` with a `file_name` column (labels from `label_column`), or class subfolders
    (`folder/<class name>/<image>`), or a flat folder of images (unlabeled). Metadata rows without a label and files
    named in the metadata that do not exist stop the scan (`on_bad_image="error"`) or are dropped with a warning ("skip").
    """
    check_on_bad_image(on_bad_image)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--train_data_dir {folder} does not exist or is not a folder.")
    if any((folder / name).exists() for name in METADATA_FILES):
        files, raw = _read_metadata(folder, label_column, on_bad_image)
    else:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs:
            files, raw = [], []
            for sub in subdirs:
                for path in sorted(sub.rglob("*")):
                    if path.suffix.lower() in IMAGE_EXTENSIONS:
                        files.append(path)
                        raw.append(sub.name)
            if label_column is None:
                raw = None
        else:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            raw = None
    if not files:
        raise ValueError(f"--train_data_dir {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
    missing = [i for i, p in enumerate(files) if not p.exists()]
    if missing and on_bad_image == "error":
        raise FileNotFoundError(
            f"Files named in the metadata of {folder} do not exist: {[str(files[i]) for i in missing[:5]]}"
        )
    if missing:
        warnings.warn(
            f"--on_bad_image skip: dropped {len(missing)} file(s) named in the metadata of {folder} that do not exist, "
            f"e.g. {[str(files[i]) for i in missing[:3]]}.",
            stacklevel=2,
        )
        gone = set(missing)
        files = [p for i, p in enumerate(files) if i not in gone]
        raw = [v for i, v in enumerate(raw) if i not in gone] if raw is not None else None
        if not files:
            raise FileNotFoundError(f"None of the files named in the metadata of {folder} exist.")
    if raw is None:
        return files, None, None
    labels, id2label = _label_table(raw)
    return files, labels, id2label


def check_on_bad_image(on_bad_image: str) -> None:
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")


def probe_image(path: str | os.PathLike) -> tuple[tuple[int, int] | None, str | None]:
    """`(size, None)` when `path` decodes completely, else `(None, why it cannot be used as a training image)`.

    `verify()` checks the container (PNG chunk CRCs, a missing IEND) but not every truncation of the pixel data, and
    `load()` decodes the pixels but stops before the trailing chunks: both are run (about 0.1 ms for a small PNG).
    """
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            return image.size, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"


def scan_images(paths: list[Path], on_bad_image: str = "error") -> dict[int, tuple[int, int]]:
    """Decode every image once, before training starts, so a bad file is named up front; returns `{index: (width,
    height)}` of the readable images, in order (so no later check has to open the files again).

    Args:
        paths (`list[Path]`): the image files.
        on_bad_image (`str`): "error" stops at the first unreadable or truncated file, naming it; "skip" drops such files
            and warns once with their count and a few of their names.
    """
    check_on_bad_image(on_bad_image)
    sizes, bad = {}, []
    for index, path in enumerate(paths):
        size, error = probe_image(path)
        if error is None:
            sizes[index] = size
        elif on_bad_image == "error":
            raise ValueError(f"Cannot read image {path}: {error} (--on_bad_image skip drops unreadable files).")
        else:
            bad.append(f"{path} ({error})")
    if bad:
        warnings.warn(
            f"--on_bad_image skip: dropped {len(bad)} of {len(paths)} image(s) that cannot be read, e.g. {bad[:3]}.",
            stacklevel=2,
        )
    if not sizes:
        raise ValueError(f"None of the {len(paths)} images can be read (first: {bad[0]}).")
    return sizes


def image_channels(image: Image.Image) -> int:
    return 1 if image.mode in GRAYSCALE_MODES else 3


def to_mode(image: Image.Image, num_channels: int) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to "L" or "RGB"."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / 32-bit / float greyscale: rescale to 8 bit instead of clipping at 255. I;16 is always a 16-bit range
        # (a dark 16-bit image stays dark); mode I (older decoders' 16-bit PNGs) is taken as 16-bit once it exceeds 255.
        array = np.asarray(image, dtype=np.float64)
        sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and array.max() > 255)
        scale = 65535.0 if sixteen_bit else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode == "LA" or image.mode == "RGBA":
        image = image.convert("RGBA").convert("RGB") if num_channels == 3 else image.convert("L")
    target = "L" if num_channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


class ImageLabelDataset(Dataset):
    """Images (any source) with optional integer labels, transformed to `[C, H, W]` float tensors in [-1, 1].

    Items are `{"pixel_values": Tensor[C, H, W], "class_labels": LongTensor[], "sample_keys": LongTensor[]}`; the label
    key only when the data is labeled. `sample_keys` is the key the item was read with (see `__getitem__`): the training
    scripts can seed per-sample noise with it (`--per_sample_noise`).
    """

    def __init__(
        self,
        load_image: Callable[[int], Image.Image],
        num_items: int,
        labels: list[int] | None,
        id2label: dict[int, str] | None,
        num_channels: int,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        describe: Callable[[int], str] = str,
        small_images: str = "upscale",
    ):
        self.load_image = load_image
        self.num_items = num_items
        self.labels = labels
        self.id2label = id2label
        self.num_classes = len(id2label) if id2label else 0
        self.num_channels = num_channels
        self.resolution = resolution
        self.describe = describe
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.augment_seed = 0
        self.small_images = small_images
        self.resize = transforms.Resize(resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        self.normalize = transforms.Normalize([0.5] * num_channels, [0.5] * num_channels)

    def __len__(self) -> int:
        return self.num_items

    def load(self, index: int) -> Image.Image:
        """Image `index` in mode "L" or "RGB"; with `small_images="refuse"`, one smaller than the resolution stops the run."""
        try:
            image = to_mode(self.load_image(index), self.num_channels)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Cannot read image {self.describe(index)}: {error}") from error
        if self.small_images == "refuse" and min(image.size) < self.resolution:
            raise ValueError(
                f"Image {self.describe(index)} is {image.size[0]}x{image.size[1]}, smaller than --resolution "
                f"{self.resolution} (--small_images refuse; 'upscale' resizes it up)."
            )
        return image

    def draw_flip(self, key: int, seed: int | None = None) -> bool:
        """The flip `__getitem__` applies to `key` when no random crop is drawn first (the latent cache replays it)."""
        seed = self.augment_seed if seed is None else seed
        return bool(torch.rand((), generator=augment_generator(seed, key)) < 0.5)

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` resized and cropped to `[C, H, W]` in [-1, 1] without random augmentation (for caching).

        A random crop cannot be replayed from a cache: an image that `__getitem__` would crop at random raises."""
        image = self.resize(self.load(index))
        if self.center_crop:
            image = transforms.functional.center_crop(image, [self.resolution, self.resolution])
        elif image.size != (self.resolution, self.resolution):
            raise ValueError(
                f"Image {self.describe(index)} is {image.size[0]}x{image.size[1]} after resizing to --resolution "
                f"{self.resolution} and would be cropped at random, which a latent cache cannot replay: pass "
                "--center_crop with --cache_latents."
            )
        return self.normalize(transforms.functional.to_tensor(image))

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        """`key` is an index, or `epoch * len(self) + index` as `EpochShuffleSampler` yields it.

        Random crops and flips draw from a generator seeded by (augment_seed, key), never from the global RNG, so the
        augmentation of every sample is fixed by the epoch and index: a resumed run sees the same images, with any
        number of workers.
        """
        index = key % self.num_items
        image = self.load(index)
        generator = augment_generator(self.augment_seed, key)
        image = self.resize(image)
        width, height = image.size
        if self.center_crop:
            image = transforms.functional.center_crop(image, [self.resolution, self.resolution])
        elif (width, height) != (self.resolution, self.resolution):
            top = int(torch.randint(0, height - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - self.resolution + 1, (1,), generator=generator))
            image = transforms.functional.crop(image, top, left, self.resolution, self.resolution)
        pixel_values = self.normalize(transforms.functional.to_tensor(image))  # [C, H, W] in [-1, 1]
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            pixel_values = pixel_values.flip(-1)
        item = {"pixel_values": pixel_values, "sample_keys": torch.tensor(key, dtype=torch.long)}
        if self.labels is not None:
            item["class_labels"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


def augment_generator(seed: int, key: int) -> torch.Generator:
    """The generator of one sample's crop and flip draws, fixed by the seed and the sampler key."""
    return torch.Generator().manual_seed(seed * 1_000_003 + key)


def collate_fn(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    pixel_values = torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format)
    labels = torch.stack([e["class_labels"] for e in examples]) if "class_labels" in examples[0] else None
    keys = torch.stack([e["sample_keys"] for e in examples]) if "sample_keys" in examples[0] else None
    return {"pixel_values": pixel_values, "class_labels": labels, "sample_keys": keys}


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def _hf_dataset(dataset_name: str, dataset_config_name: str | None, cache_dir: str | None):
    import datasets

    if os.path.isdir(dataset_name) and any(
        os.path.exists(os.path.join(dataset_name, name))
        for name in ("dataset_dict.json", "state.json", "dataset_info.json")
    ):
        try:
            data = datasets.load_from_disk(dataset_name)
        except FileNotFoundError:
            data = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        data = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"--dataset_name {dataset_name} has no 'train' split; splits are {list(data.keys())}.")
        data = data["train"]
    return data


def load_train_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    resolution: int = 16,
    center_crop: bool = False,
    random_flip: bool = False,
    max_train_samples: int | None = None,
    num_channels: int | None = None,
    cache_dir: str | None = None,
    unconditional: bool = False,
    on_bad_image: str = "error",
    small_images: str = "upscale",
) -> ImageLabelDataset:
    """Build the training set from whichever source is given (see the module docstring).

    Args:
        label_column (`str`, *optional*): the label column of a 🤗 dataset or metadata file. The default "label" is used when
            present and otherwise the data is unlabeled; any other name must exist.
        num_channels (`int`, *optional*): 1 or 3; by default taken from the first image.
        unconditional (`bool`): ignore labels even when the data has them.
        on_bad_image (`str`): "error" (default) stops on an unreadable or truncated image file, or a row without a label,
            naming it; "skip" drops them with one warning giving their count and a few names. Image files are decoded
            once up front; 🤗 dataset rows are checked for labels only (their images decode lazily).
        small_images (`str`): images smaller than `resolution` on their short side are "upscale"d (with one warning
            giving their count) or stop the run naming the first ("refuse", checked up front for every image).
    """
    check_on_bad_image(on_bad_image)
    if small_images not in ("upscale", "refuse"):
        raise ValueError(f"--small_images must be 'upscale' or 'refuse', got {small_images!r}.")
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("Give either --dataset_name or --train_data_dir, not both.")
    if resolution < 1:
        raise ValueError(f"--resolution must be positive, got {resolution}.")
    if num_channels not in (None, 1, 3):
        raise ValueError(f"--num_channels must be 1 or 3, got {num_channels}.")
    if unconditional:
        label_column = None

    if dataset_name is not None:
        data = _hf_dataset(dataset_name, dataset_config_name, cache_dir)
        if image_column not in data.column_names:
            raise ValueError(
                f"--image_column '{image_column}' is not a column of {dataset_name}; columns are {data.column_names}."
            )
        labels, id2label = None, None
        if label_column is not None and (label_column in data.column_names or label_column != "label"):
            if label_column not in data.column_names:
                raise ValueError(
                    f"--label_column '{label_column}' is not a column of {dataset_name}; columns are {data.column_names}."
                )
            raw = data[label_column]
            missing = [i for i, v in enumerate(raw) if v is None]
            if missing and on_bad_image == "error":
                raise ValueError(
                    f"--dataset_name {dataset_name}: rows {missing[:5]} have no value in '{label_column}' "
                    "(--on_bad_image skip drops them)."
                )
            if missing:
                warnings.warn(
                    f"--on_bad_image skip: dropped {len(missing)} row(s) of {dataset_name} without a value in "
                    f"'{label_column}', e.g. rows {missing[:3]}.",
                    stacklevel=2,
                )
                gone = set(missing)
                data = data.select([i for i in range(len(raw)) if i not in gone])
                raw = data[label_column]
            feature = data.features[label_column]
            if hasattr(feature, "names"):  # datasets.ClassLabel
                labels, id2label = [int(v) for v in raw], dict(enumerate(feature.names))
                bad = [v for v in labels if not 0 <= v < len(feature.names)]
                if bad:
                    raise ValueError(
                        f"Label {bad[0]} in '{label_column}' is out of range for {len(feature.names)} classes."
                    )
            else:
                labels, id2label = _label_table(list(raw))
        if max_train_samples is not None:
            data = data.select(range(min(max_train_samples, len(data))))
            labels = labels[: len(data)] if labels is not None else None
        images = data.with_format(None)

        def load_image(index: int) -> Image.Image:
            image = images[index][image_column]
            return (
                image
                if isinstance(image, Image.Image)
                else Image.open(image["path"] if isinstance(image, dict) else image)
            )

        describe = lambda index: f"{dataset_name}[{index}]"  # noqa: E731
        num_items = len(data)
        # 🤗 rows decode lazily: only "refuse" pays for opening every image up front
        image_size = lambda index: load_image(index).size  # noqa: E731
        sized = range(num_items) if small_images == "refuse" else range(min(num_items, 1))
    else:
        folder = Path(train_data_dir) if train_data_dir is not None else digits_image_folder(cache_dir)
        files, labels, id2label = scan_image_folder(folder, label_column, on_bad_image)
        if max_train_samples is not None:
            files = files[:max_train_samples]
            labels = labels[:max_train_samples] if labels is not None else None
        readable = scan_images(files, on_bad_image)  # one decoding pass: {index: size} of the readable files
        files = [files[i] for i in readable]  # ids and id2label stay those of the full scan
        labels = [labels[i] for i in readable] if labels is not None else None
        sizes = list(readable.values())

        def load_image(index: int) -> Image.Image:
            return _open(files[index])

        image_size = sizes.__getitem__

        describe = lambda index: str(files[index])  # noqa: E731
        num_items = len(files)
        sized = range(num_items)

    if num_items == 0:
        raise ValueError("The training set is empty (check --max_train_samples and the data source).")
    first = load_image(0)
    if num_channels is None:
        num_channels = image_channels(first)
    small = [(index, size) for index in sized if min(size := image_size(index)) < resolution]
    if small and small_images == "refuse":
        index, (width, height) = small[0]
        raise ValueError(
            f"{len(small)} image(s) are smaller than --resolution {resolution}, e.g. {describe(index)} is "
            f"{width}x{height} (--small_images refuse; 'upscale' resizes them up)."
        )
    # the embedded 8x8 digits are upscaled by design; other small images warn once
    if small and (train_data_dir is not None or dataset_name is not None):
        index, (width, height) = small[0]
        warnings.warn(
            f"{len(small)} image(s) are smaller than --resolution {resolution} (e.g. {describe(index)} is "
            f"{width}x{height}); they are upscaled (--small_images refuse stops instead).",
            stacklevel=2,
        )
    return ImageLabelDataset(
        load_image, num_items, labels, id2label, num_channels, resolution, center_crop, random_flip, describe,
        small_images,
    )  # fmt: skip


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data flags shared by every script, named as in diffusers' training examples."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None, help="A 🤗 datasets name or a local dataset folder.")
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config name.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="An image folder (class subfolders, or metadata.csv/metadata.jsonl). Neither this nor --dataset_name: the digits default.",
    )
    group.add_argument("--image_column", type=str, default="image", help="Image column of the dataset.")
    group.add_argument(
        "--label_column",
        type=str,
        default="label",
        help="Label column; the default 'label' is optional, other names must exist.",
    )
    group.add_argument("--unconditional", action="store_true", help="Ignore labels and train an unconditional model.")
    group.add_argument(
        "--resolution", type=int, default=16, help="Training resolution (images are resized and cropped to it)."
    )
    group.add_argument("--center_crop", action="store_true", help="Center crop instead of a random crop.")
    group.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep only the first N training samples.")
    group.add_argument(
        "--num_channels", type=int, default=None, choices=[1, 3], help="Force greyscale (1) or RGB (3)."
    )
    group.add_argument(
        "--on_bad_image",
        type=str,
        default="error",
        choices=["error", "skip"],
        help="Unreadable/truncated image files and rows without a label: stop naming the first (error) or drop them "
        "with one warning (skip).",
    )
    group.add_argument(
        "--small_images",
        type=str,
        default="upscale",
        choices=["upscale", "refuse"],
        help="Images smaller than --resolution: resize them up with one warning (upscale) or stop naming one (refuse).",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    group.add_argument(
        "--data_cache_dir", type=str, default=None, help="Cache for datasets and the embedded digits folder."
    )


def load_train_dataset_from_args(args: argparse.Namespace) -> ImageLabelDataset:
    return load_train_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        label_column=args.label_column,
        resolution=args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        max_train_samples=args.max_train_samples,
        num_channels=args.num_channels,
        cache_dir=args.data_cache_dir,
        unconditional=args.unconditional,
        on_bad_image=getattr(args, "on_bad_image", "error"),  # scripts built without the flag keep the strict default
        small_images=getattr(args, "small_images", "upscale"),
    )
