"""Every image source -> (image tensor in [-1, 1], class label or none).

`DataConfig` holds the data options (validated once); `load_train_dataset(config)` picks the source and returns one
`ImageLabelDataset`:
- `HFDatasetSource` (`dataset_name`): a 🤗 datasets dataset (hub name, a `save_to_disk` folder, or anything
  `load_dataset` reads);
- `ImageFolderSource` (`train_data_dir`): an image folder with class subfolders, or with a `metadata.csv` /
  `metadata.jsonl` naming files and labels;
- `DigitsSource` (neither): the embedded default, scikit-learn's `load_digits()` (1797 real 8x8 handwritten digits, 10
  classes), written once as an image folder into a cache directory and then read as an image folder.
A source only reads images and labels; `Augmentation` is the one place images become tensors (resize, crop, flip).
"""

from __future__ import annotations

import abc
import csv
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .preemption import ignore_preemption_signals

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# PIL modes that carry a single intensity channel; everything else is read as RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they become tensors (the `--` flags of `sadm.cli.add_data_args`).

    Args:
        dataset_name (`str`, *optional*): a 🤗 datasets name or a local dataset folder.
        dataset_config_name (`str`, *optional*): the dataset's config name.
        train_data_dir (`str`, *optional*): an image folder (class subfolders, or metadata.csv/metadata.jsonl). Neither
            this nor `dataset_name`: the embedded digits.
        image_column (`str`): image column of a 🤗 dataset.
        label_column (`str`, *optional*): the label column of a 🤗 dataset or metadata file. The default "label" is used
            when present and otherwise the data is unlabeled; any other name must exist.
        resolution (`int`): training resolution (images are resized and cropped to it).
        center_crop (`bool`): centre crop instead of a random crop.
        random_flip (`bool`): random horizontal flips.
        max_train_samples (`int`, *optional*): keep a random subset of N samples, the same for every run
            (`subset_indices`).
        num_channels (`int`, *optional*): 1 or 3; by default taken from the first image.
        cache_dir (`str`, *optional*): cache of 🤗 datasets and of the embedded digits folder.
        unconditional (`bool`): ignore labels even when the data has them.
        on_bad_image (`str`): "error" stops on an unreadable or truncated image file, or a row without a label, naming
            it; "skip" drops them with one warning giving their count and a few names. Image files are decoded once up
            front; 🤗 dataset rows are checked for labels only (their images decode lazily).
        small_images (`str`): images smaller than `resolution` on their short side are "upscale"d (with one warning
            giving their count) or stop the run naming the first ("refuse", checked up front for every image).
        scan_cache_dir (`str`, *optional*): where the decoding pass over an image folder (`scan_images`) is recorded,
            keyed by the file list with sizes and modification times, so that the other processes of a run (and later
            runs) read the record instead of decoding every file again. `None`: every process decodes every file.
    """

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    resolution: int = 16
    center_crop: bool = False
    random_flip: bool = False
    max_train_samples: int | None = None
    num_channels: int | None = None
    cache_dir: str | None = None
    unconditional: bool = False
    on_bad_image: str = "error"
    small_images: str = "upscale"
    scan_cache_dir: str | None = None

    def __post_init__(self):
        if self.on_bad_image not in ("error", "skip"):
            raise ValueError(f"--on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}.")
        if self.small_images not in ("upscale", "refuse"):
            raise ValueError(f"--small_images must be 'upscale' or 'refuse', got {self.small_images!r}.")
        if self.dataset_name is not None and self.train_data_dir is not None:
            raise ValueError("Give either --dataset_name or --train_data_dir, not both.")
        if self.resolution < 1:
            raise ValueError(f"--resolution must be positive, got {self.resolution}.")
        if self.num_channels not in (None, 1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}.")

    @property
    def is_digits(self) -> bool:
        """True for the embedded digits (no `dataset_name`, no `train_data_dir`)."""
        return self.dataset_name is None and self.train_data_dir is None

    @property
    def labels_from(self) -> str | None:
        """The label column to read, `None` when `unconditional`."""
        return None if self.unconditional else self.label_column


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


def scan_images_once(
    paths: list[Path], on_bad_image: str = "error", record_dir: str | os.PathLike | None = None
) -> dict[int, tuple[int, int]]:
    """`scan_images`, recorded in `record_dir/image-scan-<key>.json`: the key hashes the paths with their sizes and
    modification times and `on_bad_image`, so a changed, added or removed file scans the folder again, and a record is
    only ever written for a scan that passed. A run whose main process scans first (`main_process_first`) decodes every
    file once instead of once per process. The "skip" warning is repeated from the record.
    """
    if record_dir is None:
        return scan_images(paths, on_bad_image)
    digest = hashlib.sha256(on_bad_image.encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    record = Path(record_dir) / f"image-scan-{digest.hexdigest()[:16]}.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["num_files"] == len(paths):
            if saved["bad"]:
                warnings.warn(
                    f"--on_bad_image skip: dropped {len(saved['bad'])} of {len(paths)} image(s) that cannot be read, "
                    f"e.g. {saved['bad'][:3]} (recorded in {record}).",
                    stacklevel=2,
                )
            return {int(index): tuple(size) for index, size in saved["sizes"]}
    sizes = scan_images(paths, on_bad_image)  # raises (nothing recorded) at a bad file with "error"
    bad = [str(paths[i]) for i in range(len(paths)) if i not in sizes]
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".tmp-{record.name}-{os.getpid()}")
        tmp.write_text(json.dumps({"num_files": len(paths), "sizes": list(sizes.items()), "bad": bad}))
        os.replace(tmp, record)
    except OSError as error:  # a read-only cache only costs the other processes a scan of their own
        logger.warning(f"Could not record the image scan in {record}: {error}")
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


SUBSET_SEED = 0  # the --max_train_samples subset is part of the setting, not of the run's seed


def subset_indices(num_samples: int, max_samples: int) -> list[int]:
    """The `--max_train_samples` subset: `max_samples` of `num_samples` indices drawn uniformly without replacement
    with the fixed seed `SUBSET_SEED` (the same subset for every run and seed), in their original order.

    A random subset rather than the first N, because folders list their files class by class: the first 200 of the
    digits are 178 zeros and 22 ones. (diffusers' training scripts likewise shuffle with a seed before they select.)
    """
    if max_samples >= num_samples:
        return list(range(num_samples))
    keep = np.random.default_rng(SUBSET_SEED).choice(num_samples, size=max_samples, replace=False)
    return sorted(int(i) for i in keep)


class ImageSource(abc.ABC):
    """The images of a data source, by index, with their labels; no transforms (that is `Augmentation`).

    Attributes:
        labels (`list[int]`, *optional*): label ids 0..K-1 per image; `None` for unlabeled data.
        id2label (`dict[int, str]`, *optional*): class names.
        warn_small_images (`bool`): warn once when images are smaller than the resolution.
    """

    labels: list[int] | None = None
    id2label: dict[int, str] | None = None
    warn_small_images = True

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int) -> Image.Image:
        """Image `index` as PIL opened it (any mode)."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """How an error names image `index` (a path, or `dataset[index]`)."""

    def size(self, index: int) -> tuple[int, int]:
        """`(width, height)` of image `index`."""
        return self.load(index).size

    def indices_to_size_up_front(self, refuse_small: bool) -> range:
        """The images whose size is checked before training (all of them where that costs no decoding)."""
        return range(len(self))


class ImageFolderSource(ImageSource):
    """An image folder: class subfolders, `metadata.csv` / `metadata.jsonl`, or flat (see `scan_image_folder`).

    Every file is decoded once here (`scan_images`), so a bad file is named before training starts.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        label_column: str | None = "label",
        on_bad_image: str = "error",
        max_samples: int | None = None,
        scan_cache_dir: str | os.PathLike | None = None,
    ):
        files, labels, self.id2label = scan_image_folder(folder, label_column, on_bad_image)
        if max_samples is not None:
            keep = subset_indices(len(files), max_samples)
            files = [files[i] for i in keep]
            labels = [labels[i] for i in keep] if labels is not None else None
        # one decoding pass (or its record): {index: size} of the readable files
        readable = scan_images_once(files, on_bad_image, scan_cache_dir)
        self.files = [files[i] for i in readable]  # ids and id2label stay those of the full scan
        self.labels = [labels[i] for i in readable] if labels is not None else None
        self.sizes = list(readable.values())

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            image.load()
            return image

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]


class DigitsSource(ImageFolderSource):
    """The embedded default: scikit-learn's digits as an image folder in the cache (`digits_image_folder`), upscaled from
    8x8 by design (no warning)."""

    warn_small_images = False

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        label_column: str | None = "label",
        on_bad_image: str = "error",
        max_samples: int | None = None,
        scan_cache_dir: str | os.PathLike | None = None,
    ):
        super().__init__(digits_image_folder(cache_dir), label_column, on_bad_image, max_samples, scan_cache_dir)


class HFDatasetSource(ImageSource):
    """A 🤗 datasets dataset (its `train` split). Rows decode lazily: only their labels are checked up front."""

    def __init__(
        self,
        dataset_name: str,
        dataset_config_name: str | None = None,
        image_column: str = "image",
        label_column: str | None = "label",
        on_bad_image: str = "error",
        max_samples: int | None = None,
        cache_dir: str | None = None,
    ):
        data = _hf_dataset(dataset_name, dataset_config_name, cache_dir)
        if image_column not in data.column_names:
            raise ValueError(
                f"--image_column '{image_column}' is not a column of {dataset_name}; columns are {data.column_names}."
            )
        if label_column is not None and (label_column in data.column_names or label_column != "label"):
            data = self._read_labels(data, dataset_name, label_column, on_bad_image)
        if max_samples is not None:
            keep = subset_indices(len(data), max_samples)
            data = data.select(keep)
            self.labels = [self.labels[i] for i in keep] if self.labels is not None else None
        self.name, self.image_column = dataset_name, image_column
        self.rows = data.with_format(None)

    def _read_labels(self, data, dataset_name: str, label_column: str, on_bad_image: str):
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
                stacklevel=3,
            )
            gone = set(missing)
            data = data.select([i for i in range(len(raw)) if i not in gone])
            raw = data[label_column]
        feature = data.features[label_column]
        if hasattr(feature, "names"):  # datasets.ClassLabel
            self.labels, self.id2label = [int(v) for v in raw], dict(enumerate(feature.names))
            bad = [v for v in self.labels if not 0 <= v < len(feature.names)]
            if bad:
                raise ValueError(
                    f"Label {bad[0]} in '{label_column}' is out of range for {len(feature.names)} classes."
                )
        else:
            self.labels, self.id2label = _label_table(list(raw))
        return data

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> Image.Image:
        image = self.rows[index][self.image_column]
        if isinstance(image, Image.Image):
            return image
        return Image.open(image["path"] if isinstance(image, dict) else image)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def indices_to_size_up_front(self, refuse_small: bool) -> range:
        # 🤗 rows decode lazily: only "refuse" pays for opening every image up front
        return range(len(self)) if refuse_small else range(min(len(self), 1))


def image_source(config: DataConfig) -> ImageSource:
    """The source `config` names: a 🤗 dataset, an image folder, or the embedded digits."""
    if config.dataset_name is not None:
        return HFDatasetSource(
            config.dataset_name,
            config.dataset_config_name,
            config.image_column,
            config.labels_from,
            config.on_bad_image,
            config.max_train_samples,
            config.cache_dir,
        )
    if config.train_data_dir is not None:
        return ImageFolderSource(
            config.train_data_dir,
            config.labels_from,
            config.on_bad_image,
            config.max_train_samples,
            config.scan_cache_dir,
        )
    return DigitsSource(
        config.cache_dir, config.labels_from, config.on_bad_image, config.max_train_samples, config.scan_cache_dir
    )


def augment_generator(seed: int, key: int) -> torch.Generator:
    """The generator of one sample's crop and flip draws, fixed by the seed and the sampler key."""
    return torch.Generator().manual_seed(seed * 1_000_003 + key)


@dataclass(frozen=True)
class Augmentation:
    """PIL image -> `[C, H, W]` float tensor in [-1, 1]: the one place images are resized, cropped and flipped.

    The short side is resized to `resolution` (bilinear, antialiased); then a centre crop, or a random crop drawn from the
    sample's generator; then a horizontal flip with probability 1/2 when `random_flip`, drawn from the same generator.

    Args:
        resolution (`int`): output height and width.
        num_channels (`int`): 1 ("L") or 3 ("RGB").
        center_crop (`bool`): centre crop instead of a random one.
        random_flip (`bool`): random horizontal flips.
    """

    resolution: int
    num_channels: int
    center_crop: bool = False
    random_flip: bool = False

    def _resize(self, image: Image.Image) -> Image.Image:
        return transforms.functional.resize(
            image, self.resolution, interpolation=InterpolationMode.BILINEAR, antialias=True
        )

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        return transforms.functional.to_tensor(image) * 2 - 1  # [C, H, W] in [-1, 1]

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """The augmented image; random draws (crop top, crop left, flip) come from `generator` only."""
        image = self._resize(image)
        width, height = image.size
        if self.center_crop:
            image = transforms.functional.center_crop(image, [self.resolution, self.resolution])
        elif (width, height) != (self.resolution, self.resolution):
            top = int(torch.randint(0, height - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - self.resolution + 1, (1,), generator=generator))
            image = transforms.functional.crop(image, top, left, self.resolution, self.resolution)
        pixel_values = self._to_tensor(image)
        if self.random_flip and self.draw_flip(generator):
            pixel_values = pixel_values.flip(-1)
        return pixel_values

    @staticmethod
    def draw_flip(generator: torch.Generator) -> bool:
        return bool(torch.rand((), generator=generator) < 0.5)

    def without_random_draws(self, image: Image.Image, description: str) -> torch.Tensor:
        """Resized and cropped, never flipped; an image that would be cropped at random raises (a cache cannot replay it)."""
        image = self._resize(image)
        if self.center_crop:
            image = transforms.functional.center_crop(image, [self.resolution, self.resolution])
        elif image.size != (self.resolution, self.resolution):
            raise ValueError(
                f"Image {description} is {image.size[0]}x{image.size[1]} after resizing to --resolution "
                f"{self.resolution} and would be cropped at random, which a latent cache cannot replay: pass "
                "--center_crop with --cache_latents."
            )
        return self._to_tensor(image)


class ImageLabelDataset(Dataset):
    """The images of a source, augmented, with optional integer labels.

    Items are `{"pixel_values": Tensor[C, H, W], "class_labels": LongTensor[], "sample_keys": LongTensor[]}`; the label
    key only when the data is labeled. `sample_keys` is the key the item was read with (see `__getitem__`): the training
    scripts can seed per-sample noise with it (`--per_sample_noise`).

    Args:
        source (`ImageSource`): the images and labels.
        augmentation (`Augmentation`): how an image becomes a tensor.
        small_images (`str`): "refuse" stops at an image smaller than the resolution, naming it; "upscale" resizes it up.
    """

    def __init__(self, source: ImageSource, augmentation: Augmentation, small_images: str = "upscale"):
        self.source = source
        self.augmentation = augmentation
        self.small_images = small_images
        self.labels, self.id2label = source.labels, source.id2label
        self.num_classes = len(self.id2label) if self.id2label else 0
        self.augment_seed = 0  # set by `make_dataloader` to the run's seed

    @property
    def num_channels(self) -> int:
        return self.augmentation.num_channels

    @property
    def resolution(self) -> int:
        return self.augmentation.resolution

    @property
    def center_crop(self) -> bool:
        return self.augmentation.center_crop

    @property
    def random_flip(self) -> bool:
        return self.augmentation.random_flip

    def with_augmentation(self, augmentation: Augmentation) -> ImageLabelDataset:
        """The same images and labels under another augmentation (e.g. flips off for reference statistics)."""
        dataset = ImageLabelDataset(self.source, augmentation, self.small_images)
        dataset.augment_seed = self.augment_seed
        return dataset

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def load(self, index: int) -> Image.Image:
        """Image `index` in mode "L" or "RGB"; with `small_images="refuse"`, one smaller than the resolution stops the run."""
        try:
            image = to_mode(self.source.load(index), self.num_channels)
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
        return self.augmentation.draw_flip(augment_generator(seed, key))

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` resized and cropped to `[C, H, W]` in [-1, 1] without random augmentation (for caching).

        A random crop cannot be replayed from a cache: an image that `__getitem__` would crop at random raises."""
        return self.augmentation.without_random_draws(self.load(index), self.describe(index))

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        """`key` is an index, or `epoch * len(self) + index` as `EpochShuffleSampler` yields it.

        Random crops and flips draw from a generator seeded by (augment_seed, key), never from the global RNG, so the
        augmentation of every sample is fixed by the epoch and index: a resumed run sees the same images, with any
        number of workers.
        """
        index = key % len(self)
        pixel_values = self.augmentation(self.load(index), augment_generator(self.augment_seed, key))
        item = {"pixel_values": pixel_values, "sample_keys": torch.tensor(key, dtype=torch.long)}
        if self.labels is not None:
            item["class_labels"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


def resolve_num_workers(num_workers: int | None, dataset) -> int:
    """`--dataloader_num_workers`, or by default what helped in docs/PERFORMANCE.md ("DataLoader workers"): none for
    datasets whose items are cheap (`items_are_cheap`, the memory-mapped latent cache: a worker's inter-process copy
    costs more than the read), and for images a quarter of this process's share of the CPU cores (`LOCAL_WORLD_SIZE`
    processes per machine), i.e. none on a machine with fewer than 4 cores per process, where workers only slowed the
    image path down by taking cores from the training process.
    """
    if num_workers is not None:
        if num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {num_workers}.")
        return num_workers
    if getattr(dataset, "items_are_cheap", False):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) // 4


def collate_fn(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    pixel_values = torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format)
    labels = torch.stack([e["class_labels"] for e in examples]) if "class_labels" in examples[0] else None
    keys = torch.stack([e["sample_keys"] for e in examples]) if "sample_keys" in examples[0] else None
    return {"pixel_values": pixel_values, "class_labels": labels, "sample_keys": keys}


def load_train_dataset(config: DataConfig) -> ImageLabelDataset:
    """The training set `config` describes (see the module docstring); bad or small images are named up front."""
    source = image_source(config)
    if len(source) == 0:
        raise ValueError("The training set is empty (check --max_train_samples and the data source).")
    num_channels = config.num_channels or image_channels(source.load(0))
    resolution = config.resolution
    sized = source.indices_to_size_up_front(refuse_small=config.small_images == "refuse")
    small = [(index, size) for index in sized if min(size := source.size(index)) < resolution]
    if small and config.small_images == "refuse":
        index, (width, height) = small[0]
        raise ValueError(
            f"{len(small)} image(s) are smaller than --resolution {resolution}, e.g. {source.describe(index)} is "
            f"{width}x{height} (--small_images refuse; 'upscale' resizes them up)."
        )
    if small and source.warn_small_images:
        index, (width, height) = small[0]
        warnings.warn(
            f"{len(small)} image(s) are smaller than --resolution {resolution} (e.g. {source.describe(index)} is "
            f"{width}x{height}); they are upscaled (--small_images refuse stops instead).",
            stacklevel=2,
        )
    augmentation = Augmentation(resolution, num_channels, config.center_crop, config.random_flip)
    return ImageLabelDataset(source, augmentation, config.small_images)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with its own generator seeded by (seed, epoch): the data order depends only on the epoch, so a resumed run
    sees the same batches as an uninterrupted one and no global RNG is consumed by the data order.

    It yields `epoch * num_items + index`; `ImageLabelDataset` takes the index modulo its length and seeds the sample's
    augmentation with the whole key."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        offset = self.epoch * self.num_items
        return iter((torch.randperm(self.num_items, generator=generator) + offset).tolist())

    def __len__(self) -> int:
        return self.num_items


def make_dataloader(
    dataset, batch_size: int, seed: int, num_workers: int | None, collate_fn
) -> torch.utils.data.DataLoader:
    """A training DataLoader whose order is reproducible and resumable (see `EpochShuffleSampler`); `num_workers=None`
    picks the default of `sadm.data.resolve_num_workers`."""
    dataset.augment_seed = seed
    num_workers = resolve_num_workers(num_workers, dataset)
    if len(dataset) < batch_size:
        logger.warning(
            f"The dataset has {len(dataset)} samples, fewer than one batch of {batch_size}; batches are partial."
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=len(dataset) >= batch_size,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # worker seeds never draw from the global RNG
        persistent_workers=False,
        worker_init_fn=ignore_preemption_signals,  # the cluster's SIGTERM must reach only the main process's handler
    )
