"""Bad data: unreadable or truncated files, rows without labels, tiny datasets, unusual PIL modes (`--on_bad_image`)."""

import argparse
import logging

import numpy as np
import pytest
import torch
from helpers import run_script, write_class_folder
from PIL import Image

from sadm.cli import add_data_args, data_config_from_args
from sadm.data import DataConfig, collate_fn, digits_image_folder, load_train_dataset, make_dataloader, scan_images


def readable_indices(paths, on_bad_image="error"):
    return list(scan_images(paths, on_bad_image))


def truncate(path, fraction=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def noisy_image(path, size=32, seed=0):
    """An incompressible RGB image, so that cutting the file really cuts pixel data."""
    array = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


@pytest.fixture
def folder_with_bad_files(tmp_path):
    """Classes a, b, c with 3 good images each, plus a truncated PNG, a truncated JPEG and a non-image in class b."""
    root = write_class_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=3, size=8)
    truncate(noisy_image(root / "b" / "cut.png"))
    truncate(noisy_image(root / "b" / "cut.jpg"))
    (root / "b" / "text.png").write_bytes(b"this is not an image")
    return root


def test_error_mode_names_the_bad_file(folder_with_bad_files):
    with pytest.raises(ValueError, match=r"Cannot read image .*cut\.(png|jpg).*--on_bad_image skip"):
        load_train_dataset(DataConfig(train_data_dir=str(folder_with_bad_files), resolution=8))


def test_skip_mode_drops_bad_files_with_one_warning(folder_with_bad_files):
    with pytest.warns(UserWarning, match=r"dropped 3 of 12 image\(s\)") as record:
        ds = load_train_dataset(
            DataConfig(train_data_dir=str(folder_with_bad_files), resolution=8, on_bad_image="skip")
        )
    assert len([w for w in record if "--on_bad_image" in str(w.message)]) == 1
    message = str(record[0].message)
    assert "cut.png" in message and "cut.jpg" in message and "text.png" in message
    # labels and class ids are those of the full scan; every remaining item decodes
    assert len(ds) == 9 and ds.id2label == {0: "a", 1: "b", 2: "c"}
    assert sorted(ds[i]["class_labels"].item() for i in range(len(ds))) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert collate_fn([ds[i] for i in range(len(ds))])["pixel_values"].shape == (9, 3, 8, 8)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_are_detected(tmp_path, suffix):
    """`verify()` alone passes a JPEG cut in its entropy-coded data; the full decode catches it."""
    good = noisy_image(tmp_path / f"good{suffix}")
    cut = noisy_image(tmp_path / f"cut{suffix}", seed=1)
    truncate(cut, 0.9)
    with pytest.warns(UserWarning, match=f"cut{suffix}"):
        assert readable_indices([good, cut], on_bad_image="skip") == [0]
    with pytest.raises(ValueError, match=f"cut{suffix}"):
        readable_indices([good, cut])


def test_png_without_its_end_chunk_is_detected(tmp_path):
    path = noisy_image(tmp_path / "noend.png")
    path.write_bytes(path.read_bytes()[:-12])  # drop the IEND chunk: load() alone accepts this file
    with pytest.raises(ValueError, match="noend.png"):
        readable_indices([path])


def test_readability_check_accepts_every_digit(sadm_cache):
    # (its speed is not asserted here: timed tests fail on a loaded machine; it took ~0.1 s on 2 idle cores)
    files = sorted(digits_image_folder(sadm_cache).rglob("*.png"))
    assert len(files) == 1797
    assert len(readable_indices(files)) == 1797


def test_all_files_bad_is_an_error_even_with_skip(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="None of the 1 images"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, on_bad_image="skip"))


def test_unknown_on_bad_image_value_is_named(tmp_path):
    write_class_folder(tmp_path)
    with pytest.raises(ValueError, match="--on_bad_image must be 'error' or 'skip', got 'ignore'"):
        load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, on_bad_image="ignore"))


def write_metadata_folder(root, labels):
    for i in range(len(labels)):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8), mode="L").save(root / f"{i}.png")
    (root / "metadata.csv").write_text("file_name,label\n" + "".join(f"{i}.png,{v}\n" for i, v in enumerate(labels)))
    return root


def test_metadata_rows_without_label(tmp_path):
    root = write_metadata_folder(tmp_path, ["cat", "", "dog", ""])
    with pytest.raises(ValueError, match=r"row 3 \(1.png\): missing value in label column 'label'"):
        load_train_dataset(DataConfig(train_data_dir=str(root), resolution=8))
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\).*1.png.*3.png"):
        ds = load_train_dataset(DataConfig(train_data_dir=str(root), resolution=8, on_bad_image="skip"))
    assert len(ds) == 2 and ds.id2label == {0: "cat", 1: "dog"}
    assert [ds[i]["class_labels"].item() for i in range(2)] == [0, 1]
    assert ds[1]["pixel_values"][0, 0, 0].item() == pytest.approx(30 * 2 / 255 * 2 - 1, abs=1e-6)  # row 2.png


def test_metadata_file_that_does_not_exist(tmp_path):
    root = write_metadata_folder(tmp_path, ["0", "1", "1"])
    (root / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1.png"):
        load_train_dataset(DataConfig(train_data_dir=str(root), resolution=8))
    with pytest.warns(UserWarning, match=r"dropped 1 file\(s\).*1.png"):
        ds = load_train_dataset(DataConfig(train_data_dir=str(root), resolution=8, on_bad_image="skip"))
    assert len(ds) == 2 and [ds[i]["class_labels"].item() for i in range(2)] == [0, 1]


def test_hf_dataset_rows_without_label(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8, 3), i * 30, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"image": images, "label": [0, None, 1, None]}, features=features)
    data.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"rows \[1, 3\] have no value in 'label'"):
        load_train_dataset(DataConfig(dataset_name=str(tmp_path / "ds"), resolution=8))
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\)"):
        ds = load_train_dataset(DataConfig(dataset_name=str(tmp_path / "ds"), resolution=8, on_bad_image="skip"))
    assert len(ds) == 2 and [ds[i]["class_labels"].item() for i in range(2)] == [0, 1]
    assert ds[1]["pixel_values"][0, 0, 0].item() == pytest.approx(60 / 255 * 2 - 1, abs=1e-6)  # the row with i = 2


def test_flag_default_and_skip_from_the_command_line(tmp_path, folder_with_bad_files):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    assert parser.parse_args([]).on_bad_image == "error"
    args = parser.parse_args(
        ["--train_data_dir", str(folder_with_bad_files), "--resolution", "8", "--on_bad_image", "skip"]
    )
    with pytest.warns(UserWarning, match="dropped 3"):
        assert len(load_train_dataset(data_config_from_args(args))) == 9
    args.on_bad_image = "error"
    with pytest.raises(ValueError, match="Cannot read image"):
        load_train_dataset(data_config_from_args(args))


def test_dataset_smaller_than_a_batch_gives_partial_batches(tmp_path, caplog):
    write_class_folder(tmp_path, classes=("a",), per_class=3, size=8)
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8))
    with caplog.at_level(logging.WARNING, logger="sadm.data"):
        loader = make_dataloader(ds, batch_size=8, seed=0, num_workers=0, collate_fn=collate_fn)
    assert "fewer than one batch of 8" in caplog.text
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["pixel_values"].shape == (3, 3, 8, 8)


@pytest.mark.slow
def test_three_image_folder_trains_with_batch_8(tmp_path):
    data = write_class_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=1, size=8, mode="L")
    out = tmp_path / "run"
    result = run_script(
        "train_sadm.py", "--model", "tiny", "--resolution", "8", "--train_batch_size", "8", "--validation_steps", "0",
        "--report_to", "none", "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "2",
        "--on_bad_image", "skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fewer than one batch of 8" in result.stdout + result.stderr
    assert (out / "model_index.json").exists() and (out / "checkpoint-2" / "train_state.json").exists()


# ------------------------------------------------------------------------------------------------- PIL modes from files
def expected(values):
    return torch.tensor(values, dtype=torch.float32) / 255 * 2 - 1


@pytest.mark.parametrize(
    "mode, suffix, channels, pixel",
    [
        ("L", ".png", 1, [77]),
        ("LA", ".png", 1, [77]),  # alpha dropped
        ("P", ".png", 3, [200, 100, 50]),  # palette looked up
        ("RGBA", ".png", 3, [200, 100, 50]),  # alpha dropped, colour kept (no compositing)
        ("CMYK", ".jpg", 3, [200, 100, 50]),  # lossy: checked to a few levels
        ("I;16", ".png", 1, [round(60000 / 65535 * 255)]),  # 16 bit rescaled, not clipped
    ],
)
def test_image_modes_from_files(tmp_path, mode, suffix, channels, pixel):
    colour = (200, 100, 50)
    if mode == "I;16":
        image = Image.new("I;16", (8, 8), 60000)
    elif mode in ("L", "LA"):
        image = Image.new("L", (8, 8), 77).convert(mode)
    elif mode == "P":
        image = Image.new("RGB", (8, 8), colour).quantize(colors=4)
    else:
        image = Image.new("RGB", (8, 8), colour).convert(mode)
        if mode == "RGBA":
            image.putalpha(128)
    (tmp_path / "a").mkdir()
    image.save(tmp_path / "a" / f"0{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
    assert Image.open(tmp_path / "a" / f"0{suffix}").mode == mode
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8))
    assert ds.num_channels == channels
    x = ds[0]["pixel_values"]
    assert x.shape == (channels, 8, 8)
    tolerance = 6 / 255 * 2 if suffix == ".jpg" else 1 / 255 * 2
    torch.testing.assert_close(x[:, 4, 4], expected(pixel), atol=tolerance, rtol=0)
    # forcing the other channel count works for every mode
    other = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8, num_channels=4 - channels))
    assert other[0]["pixel_values"].shape == (4 - channels, 8, 8)


def test_dark_16_bit_image_stays_dark(tmp_path):
    """A 16-bit image whose values are all below 256 is nearly black, not a full-range 8-bit image."""
    Image.new("I;16", (8, 8), 200).save(tmp_path / "dark.png")
    ds = load_train_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=8))
    assert ds[0]["pixel_values"].max().item() == pytest.approx(-1.0, abs=2 / 255)
