"""In-training evaluation (`--eval_steps`) of both training scripts, and the `InTrainingEvaluator` bookkeeping."""

import argparse
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import run_script, write_class_folder
from safetensors.torch import load_file

import sadm  # noqa: F401  registers the pipeline classes
from sadm.cli import add_eval_args, eval_config_from_args
from sadm.evaluation import EVAL_HISTORY_NAME, EvalConfig, InTrainingEvaluator, RandomConvFeatures, load_images_npz
from sadm.metrics import FeatureStatistics

COMMON = ["--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0", "--report_to", "none"]
COMMON += ["--max_train_steps", "4", "--checkpointing_steps", "4"]
# a cheap offline feature network for non-digit data; fid + kid from 8 samples
EVAL = [
    "--eval_steps",
    "2",
    "--eval_num_samples",
    "8",
    "--eval_feature_network",
    "random",
    "--eval_metrics",
    "fid,kid",
]
SCRIPTS = {
    "train_sadm.py": (
        ["--model", "tiny", "--eval_num_inference_steps", "2"],
        ["transformer", "checkpoint-4/transformer"],
    ),
    "train_diffusion_gan.py": (
        ["--latent_dim", "8", "--generator_base_channels", "8", "--disc_base_channels", "8"],
        ["gan", "checkpoint-4/generator", "discriminator"],
    ),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=4, size=8, mode="L")


def weights(folder, sub):
    return load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_eval_history_best_and_unchanged_training(tmp_path, data_dir, script):
    flags, components = SCRIPTS[script]
    runs = {}
    for name, extra in (("eval", EVAL), ("plain", [])):
        runs[name] = tmp_path / name
        result = run_script(
            script, *COMMON, *flags, *extra, "--train_data_dir", str(data_dir), "--output_dir", str(runs[name]),
            launch=False, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    history = json.loads((runs["eval"] / EVAL_HISTORY_NAME).read_text())
    assert [entry["step"] for entry in history] == [2, 4]
    assert all({"fid", "kid_mean", "kid_std", "wall_s"} <= set(entry) for entry in history)
    best = json.loads((runs["eval"] / "best" / "metrics.json").read_text())
    assert best["fid"] == min(entry["fid"] for entry in history)
    assert best["feature_network"] == "random_conv_seed0" and best["num_samples"] == 8
    pipe = DiffusionPipeline.from_pretrained(runs["eval"] / "best")
    assert pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 1)
    assert not (runs["plain"] / EVAL_HISTORY_NAME).exists() and not (runs["plain"] / "best").exists()

    # evaluation restores the RNG states and the live weights: training ends exactly as without it
    for sub in components:
        with_eval, without = weights(runs["eval"], sub), weights(runs["plain"], sub)
        assert all(torch.equal(with_eval[k], without[k]) for k in without), sub


def parse(argv):
    parser = argparse.ArgumentParser()
    for flag in ("--dataset_name", "--train_data_dir"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--unconditional", action="store_true")
    add_eval_args(parser)
    return eval_config_from_args(parser.parse_args(argv), parser)


def test_eval_flag_defaults_follow_the_data():
    digits = parse(["--eval_steps", "5"])
    assert (digits.metrics, digits.feature_network) == (("fid", "accuracy"), "digits")
    folder = parse(["--train_data_dir", "x"])  # eval off: no weights needed
    assert (folder.metrics, folder.feature_network) == (("fid",), "inception")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train_data_dir", "x", "--eval_steps", "5"], "--eval_inception_weights"),
        (
            [
                "--train_data_dir",
                "x",
                "--eval_steps",
                "5",
                "--eval_feature_network",
                "random",
                "--eval_metrics",
                "fid,accuracy",
            ],
            "accuracy",
        ),  # fmt: skip
        (["--eval_steps", "5", "--eval_metrics", "fid,is"], "--eval_metrics"),
        (["--eval_steps", "5", "--eval_best_metric", "recall"], "--eval_best_metric recall"),
        (["--eval_steps", "5", "--eval_feature_network", "vgg"], "--eval_feature_network"),
        (
            [
                "--eval_steps",
                "5",
                "--eval_metrics",
                "precision",
                "--eval_best_metric",
                "precision",
                "--eval_num_samples",
                "3",
            ],
            "--eval_num_samples",
        ),  # fmt: skip
    ],
)
def test_bad_eval_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def make_evaluator(tmp_path, best_metric, start_step=0):
    from accelerate import Accelerator

    reference = FeatureStatistics.from_features(torch.randn(6, 64, generator=torch.Generator().manual_seed(0)))
    config = EvalConfig(
        steps=10, metrics=("fid", "accuracy"), best_metric=best_metric, feature_network="random", on_digits=True
    )
    return InTrainingEvaluator(
        config, str(tmp_path), RandomConvFeatures(), reference, Accelerator(cpu=True),
        classifier=lambda images: torch.zeros(images.shape[0], 2), start_step=start_step,
    )  # fmt: skip


def test_best_direction_and_resumed_history(tmp_path):
    fid = make_evaluator(tmp_path, "fid")
    assert fid.is_better(3.0)
    fid.best_value = 3.0
    assert fid.is_better(2.0) and not fid.is_better(4.0) and not fid.is_better(float("nan"))
    accuracy = make_evaluator(tmp_path, "accuracy")
    accuracy.best_value = 0.5
    assert accuracy.is_better(0.6) and not accuracy.is_better(0.4)

    # resumed at step 20: entries after it are recomputed by the resumed run, the best comes from what is kept
    history = [{"step": 10, "fid": 5.0}, {"step": 20, "fid": 4.0}, {"step": 30, "fid": 1.0}]
    (tmp_path / EVAL_HISTORY_NAME).write_text(json.dumps(history))
    resumed = make_evaluator(tmp_path, "fid", start_step=20)
    assert [entry["step"] for entry in resumed.history] == [10, 20] and resumed.best_value == 4.0
    assert make_evaluator(tmp_path, "fid").history == []  # a fresh run starts a new history


def test_adm_layout_npz_is_read(tmp_path):
    images = torch.randint(0, 256, (3, 4, 4, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
    np.savez(tmp_path / "adm.npz", arr_0=images)  # the ADM evaluator's layout: arr_0 uint8 [N, H, W, 3]
    dataset = load_images_npz(tmp_path / "adm.npz")
    assert len(dataset) == 3 and dataset.labels is None
    assert torch.allclose(dataset[0]["pixel_values"], torch.from_numpy(images[0]).permute(2, 0, 1).float() / 127.5 - 1)


def test_eval_config_is_the_one_place_of_defaults_and_checks():
    from dataclasses import fields

    parser = argparse.ArgumentParser()
    for flag in ("--dataset_name", "--train_data_dir"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--unconditional", action="store_true")
    add_eval_args(parser)
    from_flags = eval_config_from_args(parser.parse_args([]))
    defaults = EvalConfig(on_digits=True)
    assert from_flags == defaults  # the flags' defaults are the config's
    for field in fields(EvalConfig):
        flag = f"--eval_{field.name}"
        if flag in parser._option_string_actions and field.default is not None:
            assert parser.get_default(flag[2:]) == field.default, flag
    # library callers get the same checks, as ValueError
    with pytest.raises(ValueError, match="--eval_metrics 'fid,is'"):
        EvalConfig(steps=5, metrics=("fid", "is"), feature_network="random")
    with pytest.raises(ValueError, match="--eval_metrics accuracy uses the digit classifier"):
        EvalConfig(steps=5, metrics=("fid", "accuracy"), feature_network="random", on_digits=True, conditional=False)
    assert EvalConfig(steps=0, metrics=("nonsense",)).metrics == ("nonsense",)  # evaluation off: nothing checked
