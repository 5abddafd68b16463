"""The frame both training scripts share (sadm/frame.py): tracker config, EMA swap, optimizer factory."""

import pytest
import torch

from sadm.frame import ScalarLogger, ema_weights, make_adamw, tracker_config
from sadm.structure import StructureConfig


def test_tracker_config_flattens_configs_and_stringifies_none():
    values = tracker_config({"seed": 3, "structure": object(), "x": None}, {"structure": StructureConfig()})
    assert values["seed"] == 3 and "x" not in values and "structure" not in values
    assert values["structure.renoise_offset"] == "None" and values["structure.weight"] == 0.0


def test_ema_weights_swaps_in_the_average_and_back():
    from diffusers.training_utils import EMAModel

    model = torch.nn.Linear(2, 2)
    ema = EMAModel(model.parameters(), decay=0.0, use_ema_warmup=False)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ema.shadow_params = [torch.zeros_like(p) for p in model.parameters()]
    with ema_weights(ema, model.parameters(), model) as net:
        assert not net.training and all((p == 0).all() for p in net.parameters())
    assert model.training and all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_make_adamw_implementations():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert make_adamw(params, 1e-3, (0.9, 0.99), 0.0, 1e-8, foreach=True).defaults["foreach"] is True
    assert make_adamw(params, 1e-3, (0.9, 0.99), 0.0, 1e-8).defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="8-bit"):
        make_adamw(params, 1e-3, (0.9, 0.99), 0.0, 1e-8, use_8bit=True, fused=True)


class RecordingAccelerator:
    """What ScalarLogger uses of an Accelerator, on one process, recording what reaches the trackers."""

    device, num_processes = torch.device("cpu"), 1

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


def test_the_scalar_logger_logs_plain_floats_with_the_throughput(monkeypatch):
    clock = iter([100.0, 104.0])  # the logger's start, then the log 4 s later
    monkeypatch.setattr("sadm.frame.time.perf_counter", lambda: next(clock))
    accelerator = RecordingAccelerator()
    log = ScalarLogger(accelerator, global_batch_size=32, start_step=10)
    logs = log({"loss": torch.tensor(0.5), "lr": 1e-3, "empty_bucket": torch.tensor(float("nan"))}, step=20)
    assert logs["loss"] == 0.5 and logs["lr"] == pytest.approx(1e-3) and logs["empty_bucket"] != logs["empty_bucket"]
    assert logs["step_time_s"] == pytest.approx(0.4) and logs["img_per_s"] == pytest.approx(10 * 32 / 4)
    assert accelerator.logged == [(20, logs)] and all(isinstance(v, float) for v in logs.values())


def test_model_card_metadata_is_hub_yaml_with_base_model_only_for_hub_ids(tmp_path):
    from huggingface_hub import ModelCard

    from sadm.export import write_model_card

    write_model_card(str(tmp_path), "A title", ["- Data: digits."], base_model="facebook/DiT-XL-2-256")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model == "facebook/DiT-XL-2-256"
    assert card.data.tags == ["sadm", "dit", "diffusion-transformer"]
    assert "# A title" in card.text and "- Data: digits." in card.text and "trust_remote_code=True" in card.text
    # a local folder cannot be resolved by the Hub: it stays out of the metadata
    write_model_card(str(tmp_path), "A title", [], loads_without_sadm=False, base_model=str(tmp_path))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and "needs sadm installed" in card.text
