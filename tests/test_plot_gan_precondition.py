"""`scripts/plot_gan_precondition.py`: r_d and FID of a GAN run against kimg."""

import importlib.util
import json

import numpy as np
import pytest
from helpers import REPO


def load_plot_script():
    spec = importlib.util.spec_from_file_location(
        "plot_gan_precondition", REPO / "scripts" / "plot_gan_precondition.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_running_mean_by_hand():
    script = load_plot_script()
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(script.running_mean(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(script.running_mean(values, 10), [1.0, 2.0, 3.0, 4.0])


def test_plot_from_a_run_folder(tmp_path):
    script = load_plot_script()
    run = tmp_path / "run"
    run.mkdir()
    (run / "T_history.json").write_text(
        json.dumps([[0, 0, 10, 0.0]] + [[s, 0, 10, s / 100] for s in range(4, 100, 4)])
    )
    history = [{"step": 50, "fid": 20.0, "recall": 0.4}, {"step": 100, "fid": 30.0, "recall": 0.2}]
    (run / "eval_history.json").write_text(json.dumps(history))
    output = tmp_path / "docs" / "plot.png"
    script.main(script.parse_args(["--run_dir", str(run), "--output", str(output), "--batch_size", "32"]))
    assert output.stat().st_size > 0


def test_missing_history_names_the_file(tmp_path, capsys):
    script = load_plot_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--run_dir", str(tmp_path), "--output", str(tmp_path / "p.png")])
    assert f"--run_dir {tmp_path} has no T_history.json" in capsys.readouterr().err
