"""`--help` of the training script states the effective default of every method-config flag."""

import dataclasses
import importlib.util
import re

from helpers import REPO

from sadm.diffusion_gan import DiffusionGANConfig
from sadm.structure import StructureConfig


def _train_sadm():
    spec = importlib.util.spec_from_file_location("train_sadm", REPO / "scripts" / "train_sadm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_defaults_of_the_method_configs_are_the_effective_ones(tmp_path, capsys):
    script = _train_sadm()
    args = script.parse_args(["--output_dir", str(tmp_path)])
    try:
        script.parse_args(["--help"])
    except SystemExit:
        pass
    blocks = {}  # flag -> its help text, from the option lines of argparse's layout ("  --flag METAVAR  help...")
    for block in re.split(r"\n(?=  -)", capsys.readouterr().out):
        if block.startswith("  --"):
            blocks[block.split()[0].rstrip(",")] = " ".join(block.split())  # argparse wraps lines
    for config, prefix, rename in (
        (args.structure, "structure_", script.STRUCTURE_FLAGS),
        (args.diffusion_gan, "diffusion_gan_", script.GAN_FLAGS),
    ):
        for field in dataclasses.fields(config):
            flag = "--" + rename.get(field.name, prefix + field.name)
            match = re.search(r"\(default: ([^)]*)\)", blocks[flag])
            assert match, f"{flag} has no default in --help"
            shown, effective = match.group(1), getattr(config, field.name)
            if shown == "None":  # resolved in __post_init__ (e.g. the preset's values): the help says how
                continue
            assert shown == str(effective), f"{flag}: --help says {shown}, the run uses {effective}"
    assert args.structure.weight == 0.0 and args.diffusion_gan.weight == 0.0  # both terms are off by default
    assert isinstance(args.structure, StructureConfig) and isinstance(args.diffusion_gan, DiffusionGANConfig)
