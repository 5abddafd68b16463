"""Fine-tuning: new label sets, DiffFit and LoRA (`sadm/finetune.py`, `--label_init` / `--trainable` of train_sadm.py)."""

import json
import re
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel
from helpers import REPO, run_script, write_class_folder
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline
from safetensors.torch import load_file

from sadm.finetune import (
    label_tables,
    merged_dit,
    optimizer_param_groups,
    parse_label_map,
    relabel_dit,
    relabel_for_data,
    resolve_label_map,
    setup_trainable,
    trainable_parameters,
)
from sadm.models.dit import build_dit

OLD = 10  # classes of the "pretrained" tiny DiT


def pretrained(seed=0, size=8):
    model = build_dit("tiny", size, 1, OLD, seed=seed)
    with torch.no_grad():  # distinct tables per block, as after real training
        for table in label_tables(model):
            table.embedding_table.weight.normal_()
    return model


def tables(model):
    return [t.embedding_table.weight.detach().clone() for t in label_tables(model)]


def test_relabel_mean_map_random_keep_the_null_row_per_block():
    old = tables(pretrained())
    assert len(old) == 4 and not torch.equal(old[0], old[1])  # one table per block

    mean = relabel_dit(pretrained(), 3, "mean")
    assert mean.config.num_embeds_ada_norm == 3
    for before, after in zip(old, tables(mean)):
        assert after.shape == (4, before.shape[1])
        assert torch.allclose(after[:3], before[:OLD].mean(0).expand(3, -1))
        assert torch.equal(after[3], before[OLD])  # the null row, id = K
    assert all(t.num_classes == 3 for t in label_tables(mean))

    mapped = relabel_dit(pretrained(), 3, "map", {0: 7, 2: 1})
    for before, after in zip(old, tables(mapped)):
        assert torch.equal(after[0], before[7]) and torch.equal(after[2], before[1])
        assert torch.allclose(after[1], before[:OLD].mean(0))  # unmapped: the mean
        assert torch.equal(after[3], before[OLD])

    random = tables(relabel_dit(pretrained(), 3, "random", seed=1))
    again = tables(relabel_dit(pretrained(), 3, "random", seed=1))
    assert all(torch.equal(a, b) for a, b in zip(random, again))  # seeded
    for before, after in zip(old, random):
        assert torch.equal(after[3], before[OLD])
        assert not torch.allclose(after[:3], before[:OLD].mean(0).expand(3, -1))
        assert 0.5 < after[:3].std() / before[:OLD].std() < 2  # the old rows' scale

    # unconditional data on a conditional model: one class whose row is the old null row
    uncond = relabel_for_data(pretrained(), 0, None, None)
    assert uncond.config.num_embeds_ada_norm == 1
    assert all(torch.equal(after[0], before[OLD]) for before, after in zip(old, tables(uncond)))


def test_relabelled_model_runs_and_exports_a_consistent_config(tmp_path):
    model = relabel_dit(pretrained(), 3, "mean").eval()
    out = model(torch.randn(2, 1, 8, 8), timestep=torch.tensor([1, 500]), class_labels=torch.tensor([2, 3])).sample
    assert out.shape == (2, 1, 8, 8)  # class 2 and the null id 3 are valid
    pipe = SADMDiTPipeline(transformer=model, scheduler=DDPMScheduler(), vae=None, id2label={0: "x", 1: "y", 2: "z"})
    pipe.save_pretrained(tmp_path / "p")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert loaded.transformer.config.num_embeds_ada_norm == 3 and loaded.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert torch.equal(tables(loaded.transformer)[0], tables(model)[0])


def test_label_map_syntax_names_and_bad_input(tmp_path):
    new = {0: "petals", 1: "sky"}
    assert resolve_label_map(parse_label_map("sky=3"), new, OLD) == {1: 3}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"petals": "seven", "sky": 2}))
    assert resolve_label_map(parse_label_map(str(path)), new, OLD, {7: "seven"}) == {0: 7, 1: 2}
    with pytest.raises(ValueError, match=r"not in the data.*'leaves'.*\['petals', 'sky'\]"):
        resolve_label_map(parse_label_map("leaves=1,sky=2"), new, OLD)
    with pytest.raises(ValueError, match="classes 0..9"):
        resolve_label_map(parse_label_map("sky=10"), new, OLD)
    with pytest.raises(ValueError, match="neither a class id"):
        resolve_label_map(parse_label_map("sky=cat"), new, OLD)
    with pytest.raises(ValueError, match="new_name=old_id"):
        parse_label_map("sky:3")
    with pytest.raises(ValueError, match="has 10 classes but the data has 2.*--label_init"):
        relabel_for_data(pretrained(), 2, new, None)


def train_a_few_steps(model, steps=3, lr=1e-2):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=lr)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8)
        out = model(x, timestep=torch.randint(0, 1000, (4,)), class_labels=torch.tensor([0, 1, 2, 3])).sample
        loss = (out - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("mode", ["full", "difffit", "lora"])
def test_only_the_intended_parameters_change_and_the_merged_export_matches(tmp_path, mode):
    model = setup_trainable(relabel_dit(pretrained(), 3, "mean"), mode, lora_rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_a_few_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    names = set(before)
    if mode == "full":
        assert changed == names
    elif mode == "difffit":
        intended = {n for n in names if n.endswith(".bias") or "difffit_gamma" in n or "class_embedder" in n}
        assert changed == intended  # DiT's LayerNorms have no affine parameters
        assert sum("difffit_gamma" in n for n in changed) == 8  # attention + MLP branch of 4 blocks
        assert all(n.endswith(("to_out.0.difffit_gamma", "ff.net.2.difffit_gamma")) for n in names if "gamma" in n)
    else:
        intended = {n for n in names if "lora_" in n or "class_embedder" in n}
        assert changed == intended and len(intended) == 4 * (6 * 2 + 1)  # A, B on q/k/v/out/MLP×2, + the table
        assert not any("lora_" in n for n in names if n.endswith(("norm1.linear.weight", "proj_out_1.weight")))

    # the export: a standard DiTTransformer2DModel with the same function, loadable without peft
    model.eval()
    merged = merged_dit(model)
    assert type(merged) is DiTTransformer2DModel and set(merged.state_dict()) == set(
        build_dit("tiny", 8, 1, 3).state_dict()
    )
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=y).sample
        assert torch.allclose(merged(x, timestep=t, class_labels=y).sample, expected, atol=1e-5)
        merged.save_pretrained(tmp_path / "m")
        reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "m").eval()
        assert torch.allclose(reloaded(x, timestep=t, class_labels=y).sample, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_label_learning_rate_moves_only_the_label_tables_faster(mode):
    model = setup_trainable(relabel_dit(pretrained(), 3, "random"), mode, lora_rank=4)
    assert len(optimizer_param_groups(model)) == 1
    groups = optimizer_param_groups(model, label_learning_rate=1e-2)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainable_parameters(model))  # each trained parameter once
    assert [g.get("lr") for g in groups] == [None, 1e-2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(groups, lr=1e-4)
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 3])
    model(x, timestep=t, class_labels=y).sample.square().mean().backward()
    optimizer.step()  # Adam's first step moves every coordinate with a gradient by ~lr
    steps = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    tables_moved = [v for n, v in steps.items() if "class_embedder" in n]
    others_moved = [v for n, v in steps.items() if "class_embedder" not in n and v > 0]
    assert tables_moved and all(9e-3 < v < 1.1e-2 for v in tables_moved)
    assert others_moved and all(v < 1.1e-4 for v in others_moved)


# ------------------------------------------------------------------------------------------------ the training script
TINY = ["--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0", "--report_to", "none"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 'pretrained' 10-class tiny pixel DiT export and a 3-class target folder."""
    root = tmp_path_factory.mktemp("finetune")
    pipe = SADMDiTPipeline(
        transformer=pretrained(), scheduler=DDPMScheduler(), vae=None, id2label={i: str(i) for i in range(OLD)}
    )
    pipe.save_pretrained(root / "base")
    data = write_class_folder(root / "data", classes=("a", "b", "c"), per_class=3, size=8, mode="L")
    return root / "base", data


def test_lora_checkpoints_hold_only_adapters_and_resume_exactly(tmp_path, base):
    """N steps straight == k steps + resume + N−k, compared with torch.equal (exact, tolerance 0)."""
    pretrained_dir, data = base
    common = [*TINY, "--pretrained_model_name_or_path", str(pretrained_dir), "--train_data_dir", str(data),
              "--label_init", "random", "--trainable", "lora", "--lora_rank", "2", "--checkpointing_steps", "2",
              "--use_ema", "--random_flip"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script("train_sadm.py", *common, "--output_dir", str(straight), "--max_train_steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--trainable lora:" in result.stderr
    first = run_script("train_sadm.py", *common, "--output_dir", str(resumed), "--max_train_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(
        "train_sadm.py", *common, "--output_dir", str(resumed), "--max_train_steps", "4",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]

    checkpoint = straight / "checkpoint-4"
    assert sorted(p.name for p in (checkpoint / "transformer").iterdir()) == ["trainable.safetensors"]
    trained = load_file(str(checkpoint / "transformer" / "trainable.safetensors"))
    assert trained and all("lora_" in k or "class_embedder" in k for k in trained)
    assert sum(v.numel() for v in trained.values()) < 0.1 * sum(
        p.numel() for p in pretrained().parameters()
    )  # a small fraction of the model
    ema = torch.load(checkpoint / "transformer_ema" / "ema_state.pt", weights_only=True)
    assert len(ema["shadow_params"]) == len(trained)

    for relative in (
        "transformer/diffusion_pytorch_model.safetensors",
        "checkpoint-4/transformer/trainable.safetensors",
    ):
        a, b = load_file(str(straight / relative)), load_file(str(resumed / relative))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{relative} differs after resume"

    # the export is a plain 3-class DiT pipeline with the data's names
    pipe = DiffusionPipeline.from_pretrained(straight)
    assert type(pipe.transformer) is DiTTransformer2DModel
    assert pipe.transformer.config.num_embeds_ada_norm == 3 and pipe.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert not any(
        "lora" in k for k in load_file(str(straight / "transformer" / "diffusion_pytorch_model.safetensors"))
    )


def test_difffit_run_exports_folded_scales(tmp_path, base):
    pretrained_dir, data = base
    out = tmp_path / "difffit"
    result = run_script(
        "train_sadm.py", *TINY, "--pretrained_model_name_or_path", str(pretrained_dir), "--train_data_dir", str(data),
        "--label_init", "map", "--label_map", "a=7,c=1", "--trainable", "difffit", "--max_train_steps", "2",
        "--no-use_ema", "--output_dir", str(out), launch=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_file(str(out / "checkpoint-2" / "transformer" / "trainable.safetensors"))
    assert sum("difffit_gamma" in k for k in trained) == 8 and not any(k.endswith("to_q.weight") for k in trained)
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any("difffit" in k for k in exported)
    base_weights = load_file(str(pretrained_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "transformer_blocks.0.attn1.to_q.weight"  # frozen and not a branch output: unchanged
    assert torch.equal(exported[key], base_weights[key])
    assert "--trainable difffit" in (out / "README.md").read_text()
    # the pretrained rows are N(0, 1): spread ≈ 1, so the tables' default LR ≈ 0.01 (not DiffFit's 1e-3), ~100 steps
    pattern = r"New label tables at LR 0\.0(09|1)\d*: the pretrained class rows differ by 0\.9\d+ per coordinate"
    assert re.search(pattern + r" \(std\), ~100 steps", result.stderr)
    groups = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)["param_groups"]
    assert [g["initial_lr"] for g in groups][0] == 1e-3 and 0.009 < groups[1]["initial_lr"] < 0.011
    assert len(groups[1]["params"]) == 4  # the label table of each of the 4 blocks


def test_unconditional_fine_tuning_of_a_class_conditional_export(tmp_path, base):
    """--unconditional on a 10-class export: one class whose row starts as the old null row; the export is an
    unconditional pipeline (no id2label, 1 class) that samples without labels and refuses them."""
    pretrained_dir, data = base
    out = tmp_path / "uncond"
    result = run_script(
        "train_sadm.py", *TINY, "--pretrained_model_name_or_path", str(pretrained_dir), "--train_data_dir", str(data),
        "--unconditional", "--max_train_steps", "2", "--no-use_ema", "--output_dir", str(out), launch=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_embeds_ada_norm == 1 and not pipe.config.id2label
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=[0], num_inference_steps=2)
    base_weights = load_file(str(pretrained_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    assert exported[key].shape == (2, base_weights[key].shape[1])  # the class row + the null row
    # two steps at LR 1e-4 from the old null row: still close to it, far from the mean of the old class rows
    assert (exported[key][0] - base_weights[key][OLD]).abs().max() < 0.01
    assert (exported[key][0] - base_weights[key][:OLD].mean(0)).abs().max() > 0.1


def test_bad_fine_tuning_flags_stop_with_clear_errors(tmp_path, base, monkeypatch, capsys):
    pretrained_dir, data = base
    common = [*TINY, "--pretrained_model_name_or_path", str(pretrained_dir), "--train_data_dir", str(data)]
    result = run_script(
        "train_sadm.py", *common, "--label_init", "map", "--label_map", "a=1,dog=2", "--output_dir",
        str(tmp_path / "o1"), launch=False,
    )  # fmt: skip
    assert result.returncode != 0 and "not in the data: ['dog']" in result.stderr
    result = run_script("train_sadm.py", *common, "--output_dir", str(tmp_path / "o2"), launch=False)
    assert result.returncode != 0 and "has 10 classes but the data has 3" in result.stderr
    assert "--label_init" in result.stderr

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import train_sadm

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(SystemExit):
        train_sadm.parse_args([*common, "--trainable", "lora", "--output_dir", str(tmp_path / "o3")])
    assert "--trainable lora needs peft" in capsys.readouterr().err
    with pytest.raises(ImportError, match="--trainable lora needs peft"):
        setup_trainable(pretrained(), "lora")
    with pytest.raises(SystemExit):
        train_sadm.parse_args([*TINY, "--trainable", "difffit", "--output_dir", str(tmp_path / "o4")])
    assert "pass --pretrained_model_name_or_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sadm.parse_args([*common, "--label_map", "a=1", "--output_dir", str(tmp_path / "o5")])
    assert "--label_map needs --label_init map" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sadm.parse_args([*common, "--label_learning_rate", "0", "--output_dir", str(tmp_path / "o6")])
    assert "--label_learning_rate must be positive, got 0.0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the evidence's tooling
def test_sample_crops_folder_is_deterministic_and_refuses_a_non_empty_folder(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from sadm.data import scan_image_folder

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from make_sample_crops import sample_crops_image_folder

    a = sample_crops_image_folder(tmp_path / "a", per_class=3, seed=0)
    files, labels, id2label = scan_image_folder(a)
    assert id2label == {0: "building", 1: "leaves", 2: "petals", 3: "sky"} and len(files) == 12
    image = Image.open(files[0])
    assert image.mode == "L" and image.size == (16, 16)
    b = sample_crops_image_folder(tmp_path / "b", per_class=3, seed=0)
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(b / p.relative_to(a)))) for p in files)
    with pytest.raises(FileExistsError, match="not empty"):
        sample_crops_image_folder(a)


def test_evaluate_pixels_features(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import evaluate
    from accelerate import Accelerator

    from sadm.evaluation import build_feature_network

    args = evaluate.parse_args(["--samples", str(tmp_path), "--feature_network", "pixels", "--metrics", "fid"])
    network = build_feature_network(args.feature_network, args.resolution, Accelerator(cpu=True))
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    assert network.identity == "pixels_r16" and torch.equal(network(images), images.reshape(2, 256))
