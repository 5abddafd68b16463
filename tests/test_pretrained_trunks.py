"""Pretrained timm / transformers trunks from local files (sadm/models/pretrained_trunks.py) in both discriminators,
the stem adapters for other input channels (grey digits, 4-channel latents), clear errors before training, and the
orthonormal head over a frozen backbone."""

import json

import pytest
import torch
from helpers import run_script, write_class_folder
from safetensors.torch import save_file

from sadm.models.structure_discriminator import StructureDiscriminator
from sadm.models.timestep_discriminator import TimestepDiscriminator


def _save_timm(path, name="test_resnet", in_chans=3, num_classes=10, seed=1):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict()


def _structure(**kwargs) -> StructureDiscriminator:
    torch.manual_seed(0)
    config = {"in_channels": 1, "sample_size": 8, "embed_dim": 8, "backbone": "timm", "timm_model_name": "test_resnet"}
    return StructureDiscriminator(**{**config, **kwargs})


def _projected(**kwargs) -> TimestepDiscriminator:
    torch.manual_seed(0)
    config = {"in_channels": 1, "sample_size": 8, "trunk": "projected", "t_conditioning": False, "base_channels": 8}
    config.update(timm_model_name="test_resnet", timm_out_indices=(0, 1, 2))
    return TimestepDiscriminator(**{**config, **kwargs})


# --- timm ---------------------------------------------------------------------------------------------------------


def test_timm_weights_are_the_saved_ones_in_both_discriminators(tmp_path):
    path = tmp_path / "rgb.safetensors"
    saved = _save_timm(path, in_chans=3)
    structure = _structure(in_channels=3, timm_pretrained_path=str(path), input_adapter="strict")
    projected = _projected(in_channels=3, timm_pretrained_path=str(path), input_adapter="strict")
    for disc in (structure.encoder, projected.backbone):  # a classifier model's file: the classifier is dropped
        state = disc.state_dict()
        assert not any(key.startswith("fc.") for key in state)
        for key, value in state.items():
            assert torch.equal(value, saved[key]), key
    random = _structure(in_channels=3)
    assert not torch.equal(random.encoder.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])


def test_stem_adapters_for_grey_and_latent_inputs(tmp_path):
    path = tmp_path / "rgb.safetensors"
    saved = _save_timm(path, in_chans=3)
    stem = saved["conv1.0.weight"]  # [O, 3, k, k]
    grey = _structure(timm_pretrained_path=str(path))  # default "adapt": RGB filters summed for one channel
    torch.testing.assert_close(grey.encoder.conv1[0].weight, stem.sum(dim=1, keepdim=True))
    latent = _projected(in_channels=4, timm_pretrained_path=str(path))  # 4 channels: RGB repeated, scaled by 3/4
    torch.testing.assert_close(latent.backbone.conv1[0].weight, torch.cat([stem, stem[:, :1]], dim=1) * 0.75)
    with pytest.raises(ValueError, match=r"rgb.safetensors' was trained on 3-channel inputs.*has 4 channel"):
        _structure(in_channels=4, timm_pretrained_path=str(path), input_adapter="strict")
    with pytest.raises(ValueError, match="was trained on 3-channel inputs"):
        _projected(in_channels=4, timm_pretrained_path=str(path), input_adapter="strict")
    # reinit: an untrained stem that trains even though the rest of the backbone is frozen
    for disc, backbone in (
        (s := _structure(in_channels=4, timm_pretrained_path=str(path), input_adapter="reinit", freeze_backbone=True),
         s.encoder),
        (p := _projected(in_channels=4, timm_pretrained_path=str(path), input_adapter="reinit"), p.backbone),
    ):  # fmt: skip
        disc.requires_grad_(False).requires_grad_(True)
        trainable = {name for name, param in backbone.named_parameters() if param.requires_grad}
        assert trainable == {"conv1.0.weight"}
        assert torch.equal(backbone.state_dict()["conv1.3.weight"], saved["conv1.3.weight"])
        assert backbone.conv1[0].weight.shape[1] == 4


def test_projected_backbone_stays_frozen_through_requires_grad():
    disc = _projected()
    disc.requires_grad_(True)
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())


def test_bad_timm_files_fail_before_training_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="timm_pretrained_path: '/nowhere.safetensors' is not a file"):
        _structure(timm_pretrained_path="/nowhere.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    for build in (_structure, _projected):
        with pytest.raises(ValueError, match="corrupt.safetensors' could not be read"):
            build(timm_pretrained_path=str(corrupt))
    other = tmp_path / "convnext.safetensors"
    _save_timm(other, name="test_convnext", in_chans=1)
    with pytest.raises(ValueError, match=r"convnext.safetensors' does not hold the weights of timm 'test_resnet'"):
        _structure(timm_pretrained_path=str(other))
    with pytest.raises(ValueError, match="does not hold the weights of timm 'test_resnet'"):
        _projected(timm_pretrained_path=str(other))
    wide = tmp_path / "wide.safetensors"
    state = _save_timm(wide, in_chans=1)
    state["conv1.3.weight"] = torch.zeros(3, *state["conv1.3.weight"].shape[1:])
    save_file({k: v.contiguous() for k, v in state.items()}, str(wide))
    with pytest.raises(ValueError, match=r"'conv1.3.weight' has shape \(3,"):
        _structure(timm_pretrained_path=str(wide))


def test_trunk_that_cannot_take_the_input_size_fails_at_construction(tmp_path):
    # test_vit is built for 160 px inputs: the discriminator's 8 px samples cannot go through it
    with pytest.raises(ValueError, match=r"timm 'test_vit' cannot take the discriminator input \[B, 1, 8, 8\]"):
        _structure(timm_model_name="test_vit")


# --- transformers -------------------------------------------------------------------------------------------------


def _save_dinov2(folder, num_channels=3, with_head=False, seed=2):
    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          image_size=8, patch_size=4, num_channels=num_channels, num_labels=5)  # fmt: skip
    torch.manual_seed(seed)
    model = (Dinov2ForImageClassification if with_head else Dinov2Model)(config)
    model.save_pretrained(str(folder))
    return model.dinov2.state_dict() if with_head else model.state_dict()


@pytest.mark.parametrize("with_head", [False, True], ids=["model", "classifier"])
def test_transformers_folder_weights_are_the_saved_ones(tmp_path, with_head):
    saved = _save_dinov2(tmp_path / "dinov2", num_channels=1, with_head=with_head)
    disc = _structure(backbone="transformers", transformers_path=str(tmp_path / "dinov2"), freeze_backbone=True)
    state = disc.encoder.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in disc.encoder.parameters())
    # the folder's config is recorded: the saved discriminator reloads without the folder
    disc.eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    disc.save_pretrained(str(tmp_path / "disc"))
    reloaded = StructureDiscriminator.from_pretrained(str(tmp_path / "disc"), transformers_path=None).eval()
    torch.testing.assert_close(reloaded(x).embeddings, disc(x).embeddings, atol=1e-6, rtol=0)


def test_transformers_stem_adapters_and_bad_folders(tmp_path):
    saved = _save_dinov2(tmp_path / "rgb", num_channels=3)
    stem_key = "embeddings.patch_embeddings.projection.weight"
    latent = _structure(in_channels=4, backbone="transformers", transformers_path=str(tmp_path / "rgb"))
    stem = saved[stem_key]
    adapted = latent.encoder.state_dict()[stem_key]
    torch.testing.assert_close(adapted, torch.cat([stem, stem[:, :1]], dim=1) * 0.75)
    assert latent(torch.randn(2, 4, 8, 8)).embeddings.shape == (2, 8)
    with pytest.raises(ValueError, match=r"rgb' was trained on 3-channel inputs"):
        _structure(in_channels=4, backbone="transformers", transformers_path=str(tmp_path / "rgb"),
                   input_adapter="strict")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="transformers_path: '/nowhere' is not a folder"):
        _structure(backbone="transformers", transformers_path="/nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty' could not be loaded as a transformers model"):
        _structure(backbone="transformers", transformers_path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"cannot take the discriminator input \[B, 3, 2, 2\]"):  # 2 px, patches of 4
        _structure(in_channels=3, sample_size=2, backbone="transformers", transformers_path=str(tmp_path / "rgb"))


# --- the orthonormal head over frozen features --------------------------------------------------------------------


def test_orthonormal_head_stays_orthonormal_only_it_trains_and_it_round_trips(tmp_path):
    path = tmp_path / "grey.safetensors"
    saved = _save_timm(path, in_chans=1)
    disc = _structure(timm_pretrained_path=str(path), freeze_backbone=True, head_type="orthonormal").train()
    assert disc.head.weight.shape == (8, disc.encoder.num_features) and disc.head.bias is None
    disc.requires_grad_(False).requires_grad_(True)
    trainable = [name for name, param in disc.named_parameters() if param.requires_grad]
    assert trainable and all(name.startswith("head.") for name in trainable)
    before = disc.head.weight.detach().clone()
    optimizer = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):  # maximise the spread of the embeddings, as the maximising player would
        z = disc(torch.randn(6, 1, 8, 8, generator=generator)).embeddings
        loss = (z @ z.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weight = disc.head.weight.detach()
    assert not torch.allclose(weight, before)
    torch.testing.assert_close(weight @ weight.T, torch.eye(8), atol=1e-5, rtol=0)  # W Wᵀ = I
    for key, value in disc.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key  # the backbone did not move (BatchNorm statistics included)
    disc.eval().save_pretrained(str(tmp_path / "disc"))
    reloaded = StructureDiscriminator.from_pretrained(str(tmp_path / "disc"), timm_pretrained_path=None).eval()
    torch.testing.assert_close(reloaded.head.weight, weight)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    torch.testing.assert_close(reloaded(x).embeddings, disc(x).embeddings, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head_type='orthonormal' needs embed_dim <="):
        _structure(head_type="orthonormal", embed_dim=10_000)
    with pytest.raises(ValueError, match="`head_type` must be one of"):
        _structure(head_type="mlp")


# --- the training scripts -----------------------------------------------------------------------------------------


TINY = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "2", "--validation_steps", "0",
        "--report_to", "none"]  # fmt: skip


def test_train_sadm_flags_reach_both_pretrained_trunks(tmp_path):
    """Both discriminators of train_sadm.py read their local timm files (the projected trunk included): the checkpoint's
    exported discriminators hold exactly the files' backbone weights after two steps (frozen), the structure head
    orthonormal."""
    from safetensors.torch import load_file

    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    structure_file, gan_file = tmp_path / "structure.safetensors", tmp_path / "gan.safetensors"
    structure_saved = _save_timm(structure_file, in_chans=1, seed=3)
    gan_saved = _save_timm(gan_file, in_chans=3, seed=4)  # RGB: the stem is adapted to the grey input
    out = tmp_path / "run"
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "2",
        "--structure_loss_weight", "0.05", "--structure_warmup_steps", "0",
        "--structure_t_threshold", "1000", "--disc_backbone", "timm", "--disc_timm_model_name", "test_resnet",
        "--disc_timm_pretrained_path", str(structure_file), "--disc_freeze_backbone", "--disc_head", "orthonormal",
        "--disc_embed_dim", "8", "--gan_loss_weight", "0.05", "--gan_disc_trunk", "projected",
        "--diffusion_gan_preset", "projected_gan", "--gan_disc_timm_model_name", "test_resnet",
        "--gan_disc_timm_pretrained_path", str(gan_file), launch=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    structure_state = load_file(str(out / "discriminator" / "diffusion_pytorch_model.safetensors"))
    gan_state = load_file(str(out / "timestep_discriminator" / "diffusion_pytorch_model.safetensors"))
    for key, value in structure_saved.items():
        if not key.startswith("fc."):
            assert torch.equal(structure_state[f"encoder.{key}"], value), key
    for key, value in gan_saved.items():
        if f"backbone.{key}" in gan_state and key != "conv1.0.weight":
            assert torch.equal(gan_state[f"backbone.{key}"], value), key
    assert "head.parametrizations.weight.original" in structure_state
    config = json.loads((out / "discriminator" / "config.json").read_text())
    assert config["head_type"] == "orthonormal" and config["timm_pretrained_path"] == str(structure_file)


def _script(name):
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_trunk_flags_stop_at_parsing(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    _save_timm(weights, in_chans=3)
    sadm, gan = _script("train_sadm"), _script("train_diffusion_gan")
    cases = [
        (sadm, ["--gan_disc_timm_pretrained_path", str(weights)],
         "--gan_disc_timm_pretrained_path is read by --gan_disc_trunk projected, not --gan_disc_trunk conv"),
        (sadm, ["--disc_backbone", "timm", "--disc_timm_pretrained_path", str(tmp_path / "no.pt")], "no.pt is not a file"),
        (sadm, ["--disc_backbone", "transformers", "--disc_transformers_path", str(weights)], "is not a folder"),
        (sadm, ["--disc_backbone", "transformers"], "needs --disc_transformers_path"),
        (sadm, ["--disc_backbone", "timm", "--disc_input_adapter", "zero"], "invalid choice: 'zero'"),
        (gan, ["--disc_timm_pretrained_path", str(weights)], "--disc_timm_pretrained_path is read by --disc_trunk projected"),
        (gan, ["--disc_trunk", "projected", "--disc_timm_pretrained_path", str(tmp_path / "no.pt")], "is not a file"),
    ]  # fmt: skip
    for script, flags, message in cases:
        base = TINY if script is sadm else TINY[4:]  # train_diffusion_gan.py has no --model and needs 2^k px
        with pytest.raises(SystemExit):
            script.parse_args([*base, "--output_dir", str(tmp_path / "o"), *flags])
        assert message in capsys.readouterr().err, flags
    defaults = sadm.parse_args(["--output_dir", str(tmp_path / "o")])
    assert (defaults.disc_head, defaults.disc_input_adapter, defaults.gan_disc_timm_pretrained_path) == (
        None, "adapt", None
    )  # fmt: skip


def test_a_file_that_does_not_fit_stops_train_sadm_before_the_first_step(tmp_path):
    weights = tmp_path / "w.safetensors"
    _save_timm(weights, in_chans=3)
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=8, mode="L")
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data), "--output_dir", str(tmp_path / "o2"),
        "--max_train_steps", "1", "--gan_loss_weight", "0.05", "--gan_disc_trunk", "projected",
        "--diffusion_gan_preset", "projected_gan", "--gan_disc_timm_model_name", "test_convnext",
        "--gan_disc_timm_pretrained_path", str(weights), launch=False,
    )  # fmt: skip
    message = "w.safetensors' does not hold the weights of timm 'test_convnext'"
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "o2" / "checkpoint-1").exists()


def test_train_feature_network_writes_a_file_the_structure_discriminator_loads(tmp_path):
    """A few steps of scripts/train_feature_network.py: disjoint seeded halves, a safetensors file + JSON record that
    `--disc_timm_pretrained_path` reads (frozen backbone, orthonormal head) with exactly the trained weights."""
    from safetensors.torch import load_file

    script = _script("train_feature_network")
    images, labels, train, heldout = script.digits_halves(16, split_seed=1)
    assert len(train) + len(heldout) == len(images) == 1797 and not set(train.tolist()) & set(heldout.tolist())
    _, _, other, _ = script.digits_halves(16, split_seed=2)
    assert set(train.tolist()) != set(other.tolist())
    path = tmp_path / "net" / "features.safetensors"
    record = script.main(["--output_path", str(path), "--max_train_steps", "3", "--batch_size", "16"])
    assert record["train_steps"] == 3 and record["model_name"] == "test_resnet" and record["num_train"] == 898
    assert json.loads(path.with_name("features.safetensors.json").read_text()) == record
    saved = load_file(str(path))
    disc = _structure(sample_size=16, embed_dim=32, timm_pretrained_path=str(path), freeze_backbone=True,
                      head_type="orthonormal")  # fmt: skip
    for key, value in disc.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key
    with pytest.raises(SystemExit):
        script.parse_args(["--output_path", str(tmp_path / "x.pt")])


def test_frozen_feature_benchmark_arms_build_a_frozen_orthonormal_encoder(tmp_path):
    """The `*_frozen` arms of benchmark_quality.py: `ft_sadm_mmd`'s flags plus the feature-network file, frozen, with
    an orthonormal head; only the head and the level embedding of the noise-conditional encoder train."""
    benchmark, train = _script("benchmark_quality"), _script("train_sadm")
    args = benchmark.parse_args(["--arms", "dsm", "ft_sadm_mmd_frozen", "--output_root", str(tmp_path)])
    net = tmp_path / "feature_network" / "test_resnet_r16_split1.safetensors"
    net.parent.mkdir()
    saved = _save_timm(net, in_chans=1, seed=5)  # present: the benchmark does not train it again
    base = tmp_path / "dsm" / "seed0"
    base.mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    command = benchmark.train_command(args, "ft_sadm_mmd_frozen", 0, tmp_path / "out")
    assert str(net) in command
    flags = command[command.index("--output_dir") :]
    parsed = train.parse_args(flags)
    reference = train.parse_args(
        [f.replace("{base}", str(base)) for f in benchmark.ARMS["ft_sadm_mmd"][1]] + flags[:2]
    )
    assert train.run_config(parsed).structure == train.run_config(reference).structure
    disc = train.build_structure_discriminator(parsed, 1, 16, 10, num_timesteps=1000)
    assert disc.config.head_type == "orthonormal" and disc.config.freeze_backbone
    for key, value in disc.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key
    trainable = {name.split(".")[0] for name, p in disc.named_parameters() if p.requires_grad}
    assert trainable == {"head", "time_embedding"}
    scratch = benchmark.ARMS["sadm_mmd_frozen"][1]
    assert "--pretrained_model_name_or_path" not in scratch and "{feature_net}" in scratch


def test_orthonormal_head_on_the_frozen_dit_trunk(tmp_path):
    """The frozen copy of the denoiser as the feature network: `head_type='orthonormal'` is its only trainable part."""
    from sadm.models.dit import build_dit
    from sadm.models.dit_trunk import DiTStructureEncoder, freeze_dit_trunk

    trunk = freeze_dit_trunk(build_dit("tiny", sample_size=8, in_channels=4, num_classes=3, seed=0))
    shape = {"in_channels": 4, "sample_size": 8, "trunk_hidden_size": 128, "trunk_num_classes": 3, "trunk_blocks": [1]}
    torch.manual_seed(0)
    encoder = DiTStructureEncoder(**shape, embed_dim=16, head_type="orthonormal", dit=trunk)
    assert [name for name, _ in encoder.named_parameters()] == ["projection.parametrizations.weight.original"]
    optimizer = torch.optim.Adam(encoder.parameters(), lr=0.05)
    for step in range(3):
        z = encoder(torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(step))).embeddings
        optimizer.zero_grad()
        (z @ z.T).mean().backward()
        optimizer.step()
    weight = encoder.projection.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)
    encoder.save_pretrained(str(tmp_path / "enc"))
    reloaded = DiTStructureEncoder.from_pretrained(str(tmp_path / "enc"), dit=trunk)
    torch.testing.assert_close(reloaded.projection.weight, weight)
    with pytest.raises(ValueError, match="head_type='orthonormal' needs embed_dim <= the pooled feature width 128"):
        DiTStructureEncoder(**shape, embed_dim=129, head_type="orthonormal", dit=trunk)
    with pytest.raises(SystemExit):  # train_sadm.py: the conv encoder's linear head is not a head of the dit one
        _script("train_sadm").parse_args(["--output_dir", str(tmp_path / "o"), "--disc_backbone", "dit",
                                          "--disc_head", "linear"])  # fmt: skip
