"""The sharded latent cache (sadm/latents.py): per-process shards equal a one-process cache bit for bit, shards are
memory-mapped, float16/bfloat16 storage, unfinished and foreign shards, build memory independent of the dataset size,
and the image-folder scan recorded once for every process (sadm/data.py)."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from helpers import write_class_folder
from PIL import Image

import sadm.data
import sadm.latents
from sadm.data import DataConfig, collate_fn, load_train_dataset, make_dataloader
from sadm.latents import ShardedMoments, build_latent_cache, collate_latents, load_latent_cache, shard_range


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    config = dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16)
    down, up = ["DownEncoderBlock2D"] * 2, ["UpDecoderBlock2D"] * 2
    return AutoencoderKL(down_block_types=down, up_block_types=up, **config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = write_class_folder(tmp_path_factory.mktemp("data"), classes=("0", "1", "2"), per_class=3, size=16)
    dataset = load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16, random_flip=True))
    dataset.augment_seed = 5
    return dataset


def build(images, vae, folder, world_size=1, ranks=None, **kwargs):
    for rank in range(world_size) if ranks is None else ranks:
        path = build_latent_cache(
            images, vae, folder, batch_size=4, disable_progress=True, rank=rank, world_size=world_size, **kwargs
        )
    return path


def items(cache) -> torch.Tensor:
    return torch.stack([cache[key]["latent_moments"] for key in range(2 * len(cache))])  # two epochs of flips


def test_shard_ranges_are_whole_batches_that_tile_the_data():
    for n, batch, world in [(9, 4, 2), (10, 4, 3), (3, 4, 2), (100, 8, 7)]:
        ranges = [shard_range(n, batch, rank, world) for rank in range(world)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert all(r.start % batch == 0 for r in ranges if r)


def test_two_shards_equal_one_and_are_memory_mapped(tmp_path, images, vae):
    one = build(images, vae, tmp_path / "one")
    two = build(images, vae, tmp_path / "two", world_size=2)
    assert one.name == two.name  # the folder is named by the fingerprint, not by the process count
    assert len(list(two.glob("shard-*.npy"))) == 2 and len(list(two.glob("shard-*.json"))) == 2
    cache_one, cache_two = load_latent_cache(one, images), load_latent_cache(two, images)
    assert isinstance(cache_two.moments, ShardedMoments) and len(cache_two) == len(images) == 9
    assert torch.equal(items(cache_one), items(cache_two))  # every encoder call saw the same batch
    assert all(isinstance(array, np.memmap) for array in cache_two.moments.arrays)  # mapped, not read
    assert [len(array) for array in cache_two.moments.arrays] == [4, 5]
    # a finished cache is reused by any number of processes, and the other world size's shards are never rewritten
    stamps = {p: p.stat().st_mtime_ns for p in two.iterdir()}
    assert build(images, vae, tmp_path / "two", world_size=3) == two
    assert {p: p.stat().st_mtime_ns for p in two.iterdir()} == stamps


def test_flips_and_labels_match_the_pixel_dataset(tmp_path, images, vae):
    cache = load_latent_cache(build(images, vae, tmp_path / "c", world_size=2), images)
    flips = []
    for key in range(2 * len(images)):
        expected = sadm.latents.encode_moments(vae, images[key]["pixel_values"][None])[0]
        torch.testing.assert_close(cache[key]["latent_moments"], expected, atol=1e-5, rtol=0)
        assert cache[key]["class_labels"] == images[key]["class_labels"]
        flips.append(images.draw_flip(key))
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_round_trips_and_trains_on_the_same_batches(tmp_path, images, vae, dtype):
    full = load_latent_cache(build(images, vae, tmp_path / "full"), images)
    half = load_latent_cache(build(images, vae, tmp_path / "half", world_size=2, dtype=dtype), images)
    npy = next((tmp_path / "half").glob("latents-*/shard-*.npy"))
    assert np.load(npy, mmap_mode="r").dtype.itemsize == 2  # half the bytes on disk
    expected = items(full)
    rounded = expected.to(getattr(torch, dtype)).float()  # exactly the storage's rounding
    assert torch.equal(items(half), rounded) and half[0]["latent_moments"].dtype == torch.float32
    assert not torch.equal(rounded, expected)
    batches = [
        next(iter(make_dataloader(cache, 4, seed=1, num_workers=0, collate_fn=collate_latents)))
        for cache in (full, half)
    ]
    tolerance = {"float16": 1e-3, "bfloat16": 8e-3}[dtype]
    torch.testing.assert_close(batches[1]["latent_moments"], batches[0]["latent_moments"], rtol=tolerance, atol=1e-3)
    assert torch.equal(batches[1]["class_labels"], batches[0]["class_labels"])


def test_a_cache_with_other_settings_is_named_and_kept(tmp_path, images, vae):
    folder = build(images, vae, tmp_path / "c", world_size=2, dtype="float16")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=r"shard-.*\.json was written with other settings: dtype='float16' \(this "
                       r"run: 'float32'\)\. Nothing was removed: pass --latent_cache_dtype float16"):  # fmt: skip
        build(images, vae, tmp_path / "c")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # a manifest of another fingerprint (a copied or renamed folder) is named too
    manifest = next(folder.glob("shard-*.json"))
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(ValueError, match=rf"{manifest.name} was written with other settings: fingerprint="):
        build(images, vae, tmp_path / "c", dtype="float16")
    with pytest.raises(ValueError, match=rf"{manifest.name} was written with other settings: fingerprint="):
        load_latent_cache(folder, images)


def test_unfinished_and_damaged_shards_are_never_used(tmp_path, images, vae):
    folder = build(images, vae, tmp_path / "c", world_size=2, ranks=[0])  # the second process never finished
    with pytest.raises(ValueError, match=rf"latent cache {folder} is incomplete: .*\[\(0, 4\)\] of 0\.\.8"):
        load_latent_cache(folder, images)
    # killed after renaming its data file, before the manifest: rebuilt, not used
    (folder / "shard-000000004-000000009.npy").write_bytes(b"garbage")
    build(images, vae, tmp_path / "c", world_size=2, ranks=[1])
    expected = items(load_latent_cache(build(images, vae, tmp_path / "one"), images))
    assert torch.equal(items(load_latent_cache(folder, images)), expected)
    assert not list(folder.glob(".tmp-*"))
    # a finished shard whose data file was truncated afterwards
    data = folder / "shard-000000004-000000009.npy"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard-000000004-000000009\.npy does not match its manifest .*damaged"):
        load_latent_cache(folder, images)
    (folder / "shard-000000004-000000009.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest .*shard-000000004-000000009\.json cannot be read .*damaged"):
        build(images, vae, tmp_path / "c")


def test_a_failed_build_leaves_no_shard(tmp_path, vae):
    data = write_class_folder(tmp_path / "wide", classes=("0",), per_class=5, size=16)
    Image.new("RGB", (24, 16)).save(data / "0" / "9.png")  # the last image: the first batch is already written
    dataset = load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16))
    with pytest.raises(ValueError, match=r"9\.png is 24x16 after resizing.*--center_crop"):
        build(dataset, vae, tmp_path / "c")
    (folder,) = (tmp_path / "c").iterdir()
    assert list(folder.iterdir()) == []


def live_tensor_bytes(exclude: set[int]) -> int:
    import gc

    gc.collect()  # only what is still referenced
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # fake/functional tensors an earlier torch.compile left alive
                continue
            if pointer not in exclude:
                storages[pointer] = storage.nbytes()
    return sum(storages.values())


def test_build_memory_does_not_grow_with_the_dataset(tmp_path, vae, monkeypatch):
    vae_storages = {t.untyped_storage().data_ptr() for t in vae.state_dict().values()}
    peaks, real = {}, sadm.latents.encode_moments
    for n in (8, 32):
        data = write_class_folder(tmp_path / f"d{n}", classes=("0",), per_class=n, size=16)
        dataset = load_train_dataset(DataConfig(train_data_dir=str(data), resolution=16))
        held = []

        def counting(vae, pixels, held=held):
            held.append(live_tensor_bytes(vae_storages))  # everything the build holds when it encodes a batch
            return real(vae, pixels)

        monkeypatch.setattr(sadm.latents, "encode_moments", counting)
        build(dataset, vae, tmp_path / f"c{n}")
        assert len(held) == n // 4
        peaks[n] = max(held)
    per_image = 2 * 8 * 8 * 8 * 4  # the moments of one image and its flip
    assert peaks[32] == peaks[8], peaks  # the tensors of one batch only, not a growing list of them
    assert peaks[8] < 8 * per_image + 3 * 4 * 2 * 3 * 16 * 16 * 4


def test_image_scan_is_recorded_once_and_redone_when_a_file_changes(tmp_path, monkeypatch):
    data = write_class_folder(tmp_path / "d", classes=("a", "b"), per_class=3, size=8)
    probed = []
    real = sadm.data.probe_image
    monkeypatch.setattr(sadm.data, "probe_image", lambda path: probed.append(path) or real(path))
    config = DataConfig(train_data_dir=str(data), resolution=8, scan_cache_dir=str(tmp_path / "scan"))
    first = load_train_dataset(config)
    assert len(probed) == 6 and len(list((tmp_path / "scan").glob("image-scan-*.json"))) == 1
    second = load_train_dataset(config)  # another process of the same run: reads the record
    assert len(probed) == 6 and second.source.sizes == first.source.sizes and second.labels == first.labels
    Image.new("RGB", (10, 8)).save(data / "a" / "0.png")  # a changed file: scanned again
    third = load_train_dataset(config)
    assert len(probed) == 12 and third.source.sizes[0] == (10, 8)
    # a bad file still stops the run naming it, and no record of a failed scan is written
    (data / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Cannot read image .*bad\.png"):
        load_train_dataset(config)
    assert len(list((tmp_path / "scan").glob("image-scan-*.json"))) == 2
    skip = DataConfig(**{**config.__dict__, "on_bad_image": "skip"})
    with pytest.warns(UserWarning, match=r"dropped 1 of 7 image"):
        assert len(load_train_dataset(skip)) == 6
    with pytest.warns(UserWarning, match=r"dropped 1 of 7 image.*bad\.png.*recorded in"):
        assert len(load_train_dataset(skip)) == 6
    assert collate_fn([first[0]])["pixel_values"].shape == (1, 3, 8, 8)


def test_default_dataloader_workers(monkeypatch, tmp_path, images, vae):
    from sadm.data import resolve_num_workers

    cache = load_latent_cache(build(images, vae, tmp_path / "c"), images)
    monkeypatch.setattr(sadm.data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_num_workers(None, cache) == 0 and resolve_num_workers(None, images) == 2
    assert resolve_num_workers(3, cache) == 3
    monkeypatch.setattr(sadm.data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_num_workers(None, images) == 0  # this 2-core machine: the measured best
    with pytest.raises(ValueError, match=r"--dataloader_num_workers must be >= 0, got -1"):
        resolve_num_workers(-1, images)


def test_an_earlier_one_file_cache_still_loads(tmp_path, images, vae):
    sharded = load_latent_cache(build(images, vae, tmp_path / "c"), images)
    moments = torch.stack([torch.stack([sharded.moments[i, 0], sharded.moments[i, 1]]) for i in range(len(images))])
    torch.save(moments, tmp_path / "latents-0123456789abcdef.pt")
    legacy = load_latent_cache(tmp_path / "latents-0123456789abcdef.pt", images)
    assert torch.equal(items(legacy), items(sharded))


def test_shards_of_several_process_counts_tile_the_cache():
    from sadm.latents import _tiling

    def spans(shards):
        tiling = _tiling([{"start": a, "stop": b} for a, b in shards], 12)
        return None if tiling is None else [(s["start"], s["stop"]) for s in tiling]

    assert spans([(0, 8), (0, 4), (4, 12)]) == [(0, 4), (4, 12)]  # the longer first shard leads nowhere
    assert spans([(0, 4), (4, 8), (4, 12), (8, 12)]) == [(0, 4), (4, 12)]
    assert spans([(0, 8), (0, 4)]) is None and spans([]) is None
