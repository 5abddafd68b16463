import json

import numpy as np
import pytest
import torch
from helpers import write_class_folder
from PIL import Image

from sadm.data import DataConfig, collate_fn, digits_image_folder, load_train_dataset, to_mode


def test_class_subfolders_give_labels_and_names(tmp_path):
    write_class_folder(tmp_path, classes=("cat", "dog", "emu"), per_class=3, size=12)
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8))
    assert len(ds) == 9 and ds.num_classes == 3 and ds.num_channels == 3
    assert ds.id2label == {0: "cat", 1: "dog", 2: "emu"}
    item = ds[4]
    assert item["pixel_values"].shape == (3, 8, 8)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["class_labels"].item() == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_metadata_file_with_label_column(tmp_path, fmt):
    rows = []
    for i, label in enumerate(["b", "a", "b", "c"]):
        Image.fromarray(np.full((8, 8), i * 40, dtype=np.uint8), mode="L").save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "kind": label})
    if fmt == "csv":
        (tmp_path / "metadata.csv").write_text(
            "file_name,kind\n" + "".join(f"{r['file_name']},{r['kind']}\n" for r in rows)
        )
    else:
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), label_column="kind", resolution=8))
    assert ds.id2label == {0: "a", 1: "b", 2: "c"}
    assert [ds[i]["class_labels"].item() for i in range(4)] == [1, 0, 1, 2]
    assert ds.num_channels == 1
    with pytest.raises(ValueError, match="--label_column 'nope'"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path), label_column="nope", resolution=8))


def test_metadata_row_without_label_is_named(tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(tmp_path / "0.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(tmp_path / "1.png")
    (tmp_path / "metadata.csv").write_text("file_name,label\n0.png,3\n1.png,\n")
    with pytest.raises(ValueError, match="1.png"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8))


def test_flat_folder_is_unlabeled_and_collates_without_labels(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8))
    assert ds.id2label is None and ds.num_classes == 0
    batch = collate_fn([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["class_labels"] is None


def test_unconditional_flag_drops_labels(tmp_path):
    write_class_folder(tmp_path)
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, unconditional=True))
    assert ds.num_classes == 0 and "class_labels" not in ds[0]


def test_digits_default(sadm_cache):
    ds = load_train_dataset(DataConfig(resolution=16, cache_dir=str(sadm_cache)))
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.num_channels == 1
    assert ds.id2label[7] == "7"
    x = ds[0]["pixel_values"]
    assert x.shape == (1, 16, 16) and x.min() >= -1.0 and x.max() <= 1.0
    # the folder is written once and reused
    folder = digits_image_folder(sadm_cache)
    assert (folder / "DONE").exists() and len(list(folder.rglob("*.png"))) == 1797
    # the first digit is a 0 and its 8x8 image matches scikit-learn's pixels exactly
    from sklearn.datasets import load_digits

    digits = load_digits()
    png = np.asarray(Image.open(sorted((folder / str(digits.target[0])).glob("*.png"))[0]))
    np.testing.assert_array_equal(png, np.round(digits.images[0] * 255 / 16).astype(np.uint8))


def test_num_channels_forces_conversion(tmp_path):
    write_class_folder(tmp_path, mode="L")
    assert (
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, num_channels=3))[0][
            "pixel_values"
        ].shape[0]
        == 3
    )
    write_class_folder(tmp_path / "rgb", mode="RGB")
    assert (
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path / "rgb"), resolution=8, num_channels=1))[0][
            "pixel_values"
        ].shape[0]
        == 1
    )


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_modes_convert(mode):
    image = (
        Image.new("RGB", (4, 4), (200, 100, 50)).convert(mode) if mode != "I;16" else Image.new("I;16", (4, 4), 60000)
    )
    assert to_mode(image, 3).mode == "RGB" and to_mode(image, 1).mode == "L"
    if mode == "I;16":
        assert np.asarray(to_mode(image, 1)).max() > 200  # 16-bit values are rescaled, not clipped to black/white


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8, 3), i * 30, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"img": images, "y": [0, 1, 1, 0]}, features=features)
    data.save_to_disk(str(tmp_path / "ds"))
    ds = load_train_dataset(
        DataConfig(dataset_name=str(tmp_path / "ds"), image_column="img", label_column="y", resolution=8)
    )
    assert len(ds) == 4 and ds.id2label == {0: "a", 1: "b"} and ds[2]["class_labels"].item() == 1
    with pytest.raises(ValueError, match="--image_column 'image'"):
        load_train_dataset(DataConfig(dataset_name=str(tmp_path / "ds"), resolution=8))
    ds = load_train_dataset(
        DataConfig(
            dataset_name=str(tmp_path / "ds"), image_column="img", label_column="y", resolution=8, max_train_samples=2
        )
    )
    assert len(ds) == 2


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path / "empty")))
    write_class_folder(tmp_path / "bad")
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path / "bad"), resolution=8))


def test_random_flip_depends_only_on_the_key(tmp_path):
    array = np.zeros((8, 8), dtype=np.uint8)
    array[:, :4] = 255
    (tmp_path / "a").mkdir()
    Image.fromarray(array, mode="L").save(tmp_path / "a" / "0.png")
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, random_flip=True))
    flipped = [bool(ds[key]["pixel_values"][0, 0, 0] < 0) for key in range(40)]  # key = epoch * len + index
    assert 5 < sum(flipped) < 35
    torch.manual_seed(123)  # the global RNG plays no part: a resumed run sees the same augmentation
    assert [bool(ds[key]["pixel_values"][0, 0, 0] < 0) for key in range(40)] == flipped


def test_data_flags_defaults_are_the_config_defaults(tmp_path):
    import argparse

    from sadm.cli import add_data_args, data_config_from_args

    parser = argparse.ArgumentParser()
    add_data_args(parser)
    assert data_config_from_args(parser.parse_args([])) == DataConfig()
    with pytest.raises(SystemExit):  # a bad value stops through the parser, naming the flags
        data_config_from_args(parser.parse_args(["--dataset_name", "a", "--train_data_dir", "b"]), parser)
    with pytest.raises(ValueError, match="--resolution must be positive, got 0"):
        DataConfig(resolution=0)


def test_deterministic_view_turns_flips_off_and_crops_the_centre(tmp_path):
    from sadm.evaluation import deterministic_view

    write_class_folder(tmp_path, per_class=2, size=12)
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, random_flip=True))
    view = deterministic_view(ds)
    assert (view.random_flip, view.center_crop) == (False, True) and (ds.random_flip, ds.center_crop) == (True, False)
    assert view.labels == ds.labels and len(view) == len(ds)
    for key in range(3 * len(ds)):  # the same tensor for every epoch and augmentation seed
        torch.testing.assert_close(view[key]["pixel_values"], view.pixels(key % len(ds)))


def test_max_train_samples_is_a_fixed_random_subset_of_every_class(tmp_path):
    """The first 200 files of the digits folder are 178 zeros and 22 ones; the subset must cover the classes, and be
    the same for every load (it is part of the setting, not of the run's seed)."""
    config = DataConfig(cache_dir=str(tmp_path / "cache"), resolution=8, max_train_samples=200)
    first, second = load_train_dataset(config), load_train_dataset(config)
    labels = [first[i]["class_labels"].item() for i in range(len(first))]
    assert len(first) == 200 and first.source.files == second.source.files
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 10, counts
