"""`--help` of both training scripts states the effective default of every flag, and parsing never rewrites a flag."""

import argparse
import dataclasses
import importlib.util
import re

import pytest
from helpers import REPO

from sadm.diffusion_gan import DiffusionGANConfig
from sadm.structure import StructureConfig


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _help_blocks(script, capsys) -> dict[str, str]:
    """flag -> its help text, from the option lines of argparse's layout ("  --flag METAVAR  help...")."""
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    blocks = {}
    for block in re.split(r"\n(?=  -)", capsys.readouterr().out):
        if block.startswith("  --"):
            block = block.split("\n\n")[0]  # the next group's title follows a blank line
            blocks[block.split()[0].rstrip(",")] = " ".join(block.split())  # argparse wraps lines
    return blocks


def _shown_default(blocks: dict[str, str], flag: str) -> str:
    match = re.search(r"\(default: ([^()]*)\)\s*$", blocks[flag])
    assert match, f"{flag} shows no default in --help: {blocks[flag]!r}"
    return match.group(1)


def _options(script) -> list[argparse.Action]:
    """Every option of the script's parser, captured from the parser `parse_args` builds."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args(["--output_dir", "unused"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return [a for a in captured["parser"]._actions if a.option_strings and a.default is not argparse.SUPPRESS]


@pytest.mark.parametrize("name", ["train_sadm", "train_diffusion_gan"])
def test_help_shows_the_value_parse_args_gives_every_flag(name, tmp_path, capsys):
    script = _script(name)
    args = script.parse_args(["--output_dir", str(tmp_path)])
    blocks = _help_blocks(script, capsys)
    options = _options(script)
    assert len(options) > 50
    for action in options:
        if action.required:  # --output_dir: no default to show
            continue
        flag = next(f for f in action.option_strings if f.startswith("--") and not f.startswith("--no-"))
        value = getattr(args, action.dest)
        assert _shown_default(blocks, flag) == str(value), f"{name} {flag}: --help says otherwise than {value!r}"
        assert value == action.default, f"{name} {flag}: parse_args rewrote it to {value!r}"


def test_help_defaults_of_the_method_configs_are_the_effective_ones(tmp_path, capsys):
    script = _script("train_sadm")
    args = script.parse_args(["--output_dir", str(tmp_path)])
    run = script.run_config(args)
    blocks = _help_blocks(script, capsys)
    for config, prefix, rename in (
        (run.structure, "structure_", script.STRUCTURE_FLAGS),
        (run.diffusion_gan, "diffusion_gan_", script.GAN_FLAGS),
    ):
        for field in dataclasses.fields(config):
            flag = "--" + rename.get(field.name, prefix + field.name)
            shown, effective = _shown_default(blocks, flag), getattr(config, field.name)
            if shown == "None":  # resolved in __post_init__ (e.g. the preset's values): the help says how
                continue
            assert shown == str(effective), f"{flag}: --help says {shown}, the run uses {effective}"
    assert run.structure.weight == 0.0 and run.diffusion_gan.weight == 0.0  # both terms are off by default
    assert isinstance(run.structure, StructureConfig) and isinstance(run.diffusion_gan, DiffusionGANConfig)
    assert run.learning_rate == 1e-3 and args.learning_rate is None  # derived in the run config, not in args


def test_config_file_supplies_flags_and_the_command_line_overrides_it(tmp_path, capsys):
    script = _script("train_sadm")
    config = tmp_path / "run.yaml"
    config.write_text(
        "structure_loss_weight: 0\ngan_loss_weight: 100\ngan_grad_ratio: 0.3\nuse_ema: false\n"
        "per_sample_noise: true\nlearning_rate: null\n"
    )
    args = script.parse_args(["--config", str(config), "--output_dir", str(tmp_path), "--gan_grad_ratio", "0.1"])
    assert (args.structure_loss_weight, args.gan_loss_weight, args.gan_grad_ratio) == (0.0, 100.0, 0.1)
    assert args.use_ema is False and args.per_sample_noise is True and args.config == str(config)
    # JSON too, and the repository's recommended settings parse
    (tmp_path / "run.json").write_text('{"gan_loss_weight": 0.5, "seed": 3}')
    args = script.parse_args(["--config", str(tmp_path / "run.json"), "--output_dir", str(tmp_path)])
    assert (args.gan_loss_weight, args.seed) == (0.5, 3)
    for preset in sorted((REPO / "configs" / "methods").glob("*.yaml")):
        script.parse_args(["--config", str(preset), "--output_dir", str(tmp_path)])
    # bad input names the file and the key; argparse still checks the types of the file's values
    for text, message in [
        ("not_a_flag: 1\n", "'not_a_flag' is not a flag"),
        ("use_ema: 3\n", "use_ema takes true or false"),
        ("- 1\n", "must hold a mapping"),
        ("seed: abc\n", "argument --seed: invalid int value"),
    ]:
        config.write_text(text)
        with pytest.raises(SystemExit):
            script.parse_args(["--config", str(config), "--output_dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert message in err and (str(config) in err or "--seed" in message), err
    with pytest.raises(SystemExit):
        script.parse_args(["--config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path)])
    assert "missing.yaml is not a file" in capsys.readouterr().err
