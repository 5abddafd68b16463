import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, HeunDiscreteScheduler
from sadm.pipelines.pipeline_sadm_dit import SADMDiTPipeline

import sadm
from sadm.export import copy_pipeline_file
from sadm.models.dit import build_dit


def make_pipeline(num_classes=10, learn_sigma=False, channels=1):
    model = build_dit(
        "tiny", sample_size=8, in_channels=channels, num_classes=num_classes, learn_sigma=learn_sigma, seed=0
    )
    scheduler = DDPMScheduler(variance_type="learned_range" if learn_sigma else "fixed_small")
    id2label = {i: f"class{i}" for i in range(num_classes)} if num_classes else None
    pipe = SADMDiTPipeline(transformer=model.eval(), scheduler=scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    return pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    pipe = make_pipeline()
    expected = sample(pipe, class_labels=[1, 5, 9], guidance_scale=3.0)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is SADMDiTPipeline
    assert loaded.config.id2label[5] == "class5" and loaded.get_label_ids(["class9"]) == [9]
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(loaded, class_labels=[1, 5, 9], guidance_scale=3.0), expected)
    assert type(SADMDiTPipeline.from_pretrained(tmp_path)) is SADMDiTPipeline


def test_loads_without_sadm_through_pipeline_py(tmp_path):
    pipe = make_pipeline(num_classes=3)
    pipe.save_pretrained(tmp_path)
    copy_pipeline_file(sadm.pipelines.pipeline_sadm_dit.__file__, str(tmp_path))
    code = (
        "import sys, diffusers, torch\n"
        f"p = diffusers.DiffusionPipeline.from_pretrained({str(tmp_path)!r}, custom_pipeline='pipeline', trust_remote_code=True)\n"
        "assert 'sadm' not in sys.modules, 'sadm was imported'\n"
        "print(type(p).__name__, p(class_labels=[0, 2], num_inference_steps=2, output_type='np').images.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SADMDiTPipeline (2, 8, 8, 1)" in result.stdout


def test_cfg_uses_the_models_null_class_not_1000():
    pipe = make_pipeline(num_classes=10)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True
    )
    guided = sample(pipe, class_labels=[2, 3], guidance_scale=4.0)
    assert seen[0].tolist() == [2, 3, 10, 10]  # conditional half, then the null class id = class count
    seen.clear()
    plain = sample(pipe, class_labels=[2, 3], guidance_scale=1.0)
    assert seen[0].tolist() == [2, 3]  # no guidance: one pass, no null class
    assert not np.allclose(guided, plain)


def test_guidance_formula():
    # ε = ε_null + w (ε_cond − ε_null), checked on a fake transformer output through one DDIM step
    pipe = make_pipeline(num_classes=2)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    w = 3.0
    calls = []

    def fake_forward(module, args, kwargs, output):
        labels = kwargs["class_labels"]
        eps = torch.where(labels[:, None, None, None] == 2, -1.0, 1.0).expand_as(output.sample)
        calls.append(eps)
        output.sample = eps.clone()
        return output

    pipe.transformer.register_forward_hook(fake_forward, with_kwargs=True)
    guided = pipe(
        class_labels=[0],
        guidance_scale=w,
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    pipe2 = make_pipeline(num_classes=2)
    pipe2.scheduler = DDIMScheduler.from_config(pipe2.scheduler.config)

    def constant_forward(module, args, kwargs, output):
        output.sample = torch.full_like(output.sample, -1.0 + w * (1.0 - -1.0))
        return output

    pipe2.transformer.register_forward_hook(constant_forward, with_kwargs=True)
    expected = pipe2(
        class_labels=[0],
        guidance_scale=1.0,
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    torch.testing.assert_close(guided.images, expected.images)


def test_unconditional_and_learned_sigma_and_rgb():
    pipe = make_pipeline(num_classes=0, learn_sigma=True, channels=3)
    assert not pipe.is_conditional
    images = pipe(batch_size=2, num_inference_steps=3, output_type="pil").images
    assert len(images) == 2 and images[0].mode == "RGB" and images[0].size == (8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=[0])


def test_random_labels_bad_labels_and_output_types():
    pipe = make_pipeline(num_classes=4)
    out = pipe(
        batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt"
    ).images
    assert out.shape == (3, 1, 8, 8) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pipe(class_labels=[4], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], output_type="latent")
    images = pipe(class_labels=[0], num_inference_steps=2, output_type="pil").images
    assert images[0].mode == "L"


def test_per_image_generators_make_each_image_independent_of_its_batch():
    # DDPM draws noise at every step: with one generator per image, batches of 7, 4 + 3 and 1 give the same images,
    # up to the float rounding of batch-size-dependent CPU kernels (tests/test_sample_script.py: bit-exact with CNR)
    pipe = make_pipeline(num_classes=3, learn_sigma=True)
    labels = [0, 1, 2, 0, 1, 2, 0]

    def run(start, end, seeds=None):
        generators = [torch.Generator().manual_seed(s) for s in (seeds or range(start, end))]
        return pipe(
            class_labels=labels[start:end], generator=generators, guidance_scale=2.0, num_inference_steps=4,
            output_type="np",
        ).images  # fmt: skip

    whole = run(0, 7)
    np.testing.assert_allclose(np.concatenate([run(0, 4), run(4, 7)]), whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.concatenate([run(i, i + 1) for i in range(7)]), whole, atol=1e-4, rtol=0)
    assert np.abs(run(0, 7, seeds=range(10, 17)) - whole).max() > 0.05  # other seeds: other images
    with pytest.raises(ValueError, match="list of 2 generators for 7 images"):
        pipe(class_labels=labels, generator=[torch.Generator(), torch.Generator()], num_inference_steps=1)


def test_learned_sigma_is_used_with_the_fixed_variance_sadm_saves(monkeypatch):
    pipe = make_pipeline(num_classes=3, learn_sigma=True)  # a DDPMScheduler with variance_type="learned_range"
    expected = sample(pipe, class_labels=[0, 1, 2], guidance_scale=2.0)
    # sadm exports save "fixed_small" (diffusers' DiTPipeline steps it); the pipeline still steps with the σ channels
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    stepped = []
    original_step = DDPMScheduler.step

    def spy(self, model_output, timestep, sample, generator=None, return_dict=True):
        stepped.append((self.variance_type, model_output.shape[1]))
        return original_step(self, model_output, timestep, sample, generator=generator, return_dict=return_dict)

    monkeypatch.setattr(DDPMScheduler, "step", spy)
    np.testing.assert_array_equal(sample(pipe, class_labels=[0, 1, 2], guidance_scale=2.0), expected)
    assert set(stepped) == {("learned_range", 2)}  # ε and the σ interpolation v of the one channel
    assert pipe.scheduler.config.variance_type == "fixed_small"  # the pipeline's scheduler is left as it is
    # schedulers without a variance get ε only, even when from_config carried a DDPM config's "learned_range" over
    for scheduler_class in (DDIMScheduler, HeunDiscreteScheduler):  # Heun's step takes no generator
        pipe.scheduler = scheduler_class.from_config(DDPMScheduler(variance_type="learned_range").config)
        assert sample(pipe, class_labels=[0, 1]).shape == (2, 8, 8, 1)


def test_guidance_interval_guides_only_the_steps_inside():
    pipe = make_pipeline(num_classes=3)  # DDPM, 5 steps: t = 800, 600, 400, 200, 0 of T = 1000
    batch_sizes = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batch_sizes.append(kwargs["class_labels"].shape[0]), with_kwargs=True
    )
    guided = sample(pipe, class_labels=[0, 1], guidance_scale=3.0)
    assert batch_sizes == [4] * 5
    np.testing.assert_array_equal(
        sample(pipe, class_labels=[0, 1], guidance_scale=3.0, guidance_interval=(0, 1)), guided
    )
    batch_sizes.clear()
    partly = sample(pipe, class_labels=[0, 1], guidance_scale=3.0, guidance_interval=(0.5, 1.0))
    assert batch_sizes == [4, 4, 2, 2, 2]  # t/T = 0.8 and 0.6 are guided, the rest run the conditional model alone
    assert not np.array_equal(partly, guided)
    unguided = sample(pipe, class_labels=[0, 1], guidance_scale=1.0)
    np.testing.assert_array_equal(
        sample(pipe, class_labels=[0, 1], guidance_scale=3.0, guidance_interval=(0.85, 1.0)), unguided
    )
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.3, 0.3)):
        with pytest.raises(ValueError, match=r"guidance_interval must be \(low, high\) with 0 <= low < high <= 1"):
            pipe(class_labels=[0], guidance_scale=3.0, guidance_interval=bad)


def test_guidance_channels_guides_the_first_channels_and_keeps_the_conditional_rest(monkeypatch):
    # ε_cond = −1, ε_null = +1 on 4 channels: with 3 guided channels the scheduler gets 1 − 2w on channels 0–2 and the
    # conditional −1 on channel 3 (the original DiT code's forward_with_cfg)
    pipe = make_pipeline(num_classes=2, channels=4)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    w = 3.0

    def fake_forward(module, args, kwargs, output):
        labels = kwargs["class_labels"]
        output.sample = torch.where(labels[:, None, None, None] == 2, 1.0, -1.0).expand_as(output.sample).clone()
        return output

    pipe.transformer.register_forward_hook(fake_forward, with_kwargs=True)
    seen = []
    original_step = pipe.scheduler.step
    monkeypatch.setattr(
        pipe.scheduler, "step", lambda out, t, x, **kw: seen.append(out) or original_step(out, t, x, **kw)
    )
    for channels in (3, 4, None):
        pipe(class_labels=[0], guidance_scale=w, guidance_channels=channels, num_inference_steps=1, output_type="pt")
    three, four, default = seen
    assert torch.all(three[:, :3] == 1 - 2 * w) and torch.all(three[:, 3] == -1.0)
    assert torch.all(four == 1 - 2 * w) and torch.equal(four, default)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"guidance_channels must be in \[1, 4\]"):
            pipe(class_labels=[0], guidance_scale=w, guidance_channels=bad)
