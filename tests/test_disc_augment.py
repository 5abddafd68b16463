"""DiffAugment (sadm/disc_augment.py): the same draw for real and fake, deterministic per seed, differentiable."""

import pytest
import torch
from safetensors.torch import load_file

from sadm.disc_augment import DiffAugment


def batch(seed=0):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_same_draw_for_real_and_fake_and_deterministic_per_seed():
    augment = DiffAugment("color,translation,cutout")
    x = batch()
    real, fake = augment(x, x.clone(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(real, fake) and not torch.equal(real, x)
    again, _ = augment(x, x, generator=torch.Generator().manual_seed(0))
    other, _ = augment(x, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(real, again) and not torch.equal(real, other)
    per_sample = [torch.Generator().manual_seed(i) for i in range(4)]  # sample i drawn from generator i alone
    first_two = augment(x[:2], generator=[torch.Generator().manual_seed(i) for i in range(2)])[0]
    assert torch.equal(augment(x, generator=per_sample)[0][:2], first_two)


def test_translation_shifts_in_zeros_and_cutout_zeroes_a_square():
    x = torch.arange(1.0, 65.0).reshape(1, 1, 8, 8)
    shifted = DiffAugment("translation", translation_ratio=0.25)(x, generator=torch.Generator().manual_seed(3))[0]
    kept = shifted[shifted != 0]
    assert kept.numel() >= 36 and set(kept.tolist()) <= set(x.flatten().tolist())  # a shift of at most 2 per axis
    rows, cols = (shifted[0, 0] != 0).nonzero(as_tuple=True)
    offset = shifted[0, 0, rows, cols] - x[0, 0, rows, cols]  # x[i − dy, j − dx] − x[i, j] = −8·dy − dx everywhere
    assert (offset == offset[0]).all() and offset[0] != 0
    masked = DiffAugment("cutout")(torch.ones(16, 1, 8, 8), generator=torch.Generator().manual_seed(1))[0]
    zeros = (masked == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 16).all()  # a 4x4 square, clipped at the border


def test_gradients_flow_into_the_fake_side():
    fake = batch().requires_grad_(True)
    real, out = DiffAugment("color,translation,cutout")(batch(1), fake, generator=torch.Generator().manual_seed(0))
    out.square().sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0 and not real.requires_grad


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="choose from color, translation, cutout"):
        DiffAugment("translation,flip")
    with pytest.raises(ValueError, match="one \\[B, C, H, W\\] shape"):
        DiffAugment("color")(batch(), batch()[:2])


def test_train_sadm_with_disc_augment(tmp_path):
    from helpers import run_script, write_class_folder

    data = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=8, mode="L")
    common = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "4", "--validation_steps", "0",
              "--report_to", "none", "--train_data_dir", str(data), "--max_train_steps", "2"]  # fmt: skip
    terms = ["--gan_loss_weight", "0.05", "--structure_loss_weight", "0.05", "--structure_warmup_steps", "0",
             "--structure_t_threshold", "1000", "--per_sample_noise"]  # fmt: skip
    runs = {}
    for name, augment in (("plain", []), ("augmented", ["--disc_augment", "color,translation,cutout"])):
        result = run_script(
            "train_sadm.py", *common, *terms, *augment, "--output_dir", str(tmp_path / name), launch=False
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_file(str(tmp_path / name / "timestep_discriminator" / "diffusion_pytorch_model.safetensors"))
    assert any(
        not torch.equal(runs["plain"][k], runs["augmented"][k]) for k in runs["plain"]
    )  # the D saw other inputs
    bad = run_script(
        "train_sadm.py", *common, "--disc_augment", "flip", "--output_dir", str(tmp_path / "bad"), launch=False
    )
    assert bad.returncode != 0 and "--disc_augment" in bad.stderr and "flip" in bad.stderr
