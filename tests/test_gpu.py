"""The fast paths on a CUDA device: bf16, SDPA kernels, `torch.compile`, fused AdamW, fp16 with loss scaling.

Every test is marked `gpu` and skipped where torch sees no CUDA device (tests/conftest.py). `scripts/gpu_check.sh` runs
them (`pytest -m gpu`); each takes seconds on one GPU. The training runs go through `accelerate launch
scripts/train_sadm.py` as users run it, with tiny models, both adversarial terms and a checkpoint.
"""

import math

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from helpers import adamw_after_steps, run_script, write_class_folder
from safetensors.torch import load_file

from sadm.losses import denoising_loss
from sadm.models.dit import build_dit

pytestmark = pytest.mark.gpu

TINY = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "4", "--validation_steps", "0",
        "--report_to", "none", "--max_train_steps", "4", "--checkpointing_steps", "2"]  # fmt: skip
BOTH_TERMS = ["--structure_loss_weight", "0.05", "--structure_warmup_steps", "0", "--structure_t_threshold", "1000",
              "--gan_loss_weight", "0.05"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("data"), classes=("a", "b"), per_class=8, size=8, mode="L")


def train_on_cuda(out, data_dir, *flags: str, timeout: int = 180):
    result = run_script(
        "train_sadm.py", *TINY, *BOTH_TERMS, "--train_data_dir", str(data_dir), "--output_dir", str(out), *flags,
        cpu=False, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_finite_float32_weights(folder, subs=("transformer", "discriminator", "timestep_discriminator")):
    """Master weights stay float32 under autocast and the scaler; every exported tensor is finite."""
    for sub in subs:
        state = load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))
        assert state, sub
        for key, tensor in state.items():
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float32, (sub, key, tensor.dtype)
                assert torch.isfinite(tensor).all(), (sub, key)


def dit_batch(device, seed=0, batch=4, channels=4, size=8):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, channels, size, size, generator=generator).to(device)  # [B, C, H, W]
    noise = torch.randn(batch, channels, size, size, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return x_t, noise, timesteps, labels


def loss_and_grads(model, batch):
    x_t, noise, timesteps, labels = batch
    model.zero_grad(set_to_none=True)
    prediction = model(x_t, timestep=timesteps, class_labels=labels).sample
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000, device=x_t.device)
    loss = denoising_loss(prediction, noise, timesteps, alphas_cumprod, "epsilon").mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_bf16_training_with_both_terms_exports_finite_float32_weights(tmp_path, data_dir):
    out = tmp_path / "bf16"
    train_on_cuda(out, data_dir, "--mixed_precision", "bf16", "--use_ema")
    assert_finite_float32_weights(out)
    pipe = DiffusionPipeline.from_pretrained(out).to("cuda")
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and math.isfinite(float(images.sum()))


def test_fp16_training_uses_the_grad_scaler_and_exports_finite_weights(tmp_path, data_dir):
    out = tmp_path / "fp16"
    train_on_cuda(out, data_dir, "--mixed_precision", "fp16")
    assert (out / "checkpoint-4" / "scaler.pt").exists()  # accelerate saves the GradScaler only when it has one
    scale = torch.load(out / "checkpoint-4" / "scaler.pt", weights_only=True)["scale"]
    assert 0 < float(scale) < float("inf")
    assert_finite_float32_weights(out)


def test_fused_adamw_trains_through_the_script_and_equals_the_for_loop(tmp_path, data_dir):
    out = tmp_path / "fused"
    train_on_cuda(out, data_dir, "--adam_fused", "--mixed_precision", "bf16")
    assert_finite_float32_weights(out)
    # the fused CUDA kernel does the for-loop's maths: 3 steps on the same gradients agree to rounding
    initial = [p.detach().clone().cuda() for p in build_dit("tiny", 8, 4, 10, seed=0).parameters()]
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator).cuda() for p in initial] for _ in range(3)]
    results = [adamw_after_steps(initial, gradients, **implementation) for implementation in ({"foreach": False}, {"fused": True})]
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)


def test_sdpa_is_the_attention_path_and_a_fused_kernel_runs_it():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_dit("tiny", 8, 4, 10, seed=0).cuda().train()
    processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    batch = dit_batch("cuda")
    # flash / memory-efficient kernels only (no maths fallback): raises if neither can run the DiT's attention
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", torch.bfloat16):
        fused_loss, fused_grads = loss_and_grads(model, batch)
    eager = build_dit("tiny", 8, 4, 10, seed=0).cuda().train()
    eager.set_attn_processor(AttnProcessor())
    with torch.autocast("cuda", torch.bfloat16):
        eager_loss, eager_grads = loss_and_grads(eager, batch)
    # both in bf16: they differ by the kernels' rounding (~3 significant digits)
    torch.testing.assert_close(fused_loss, eager_loss, rtol=2e-2, atol=1e-3)
    assert fused_grads.keys() == eager_grads.keys()
    for name in fused_grads:
        scale = eager_grads[name].abs().max().item() + 1e-6
        torch.testing.assert_close(fused_grads[name], eager_grads[name], rtol=0, atol=0.05 * scale, msg=name)


def test_torch_compile_gives_the_same_loss_and_gradients_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; the eager reference must not use TF32 either
    batch = dit_batch("cuda")
    eager = build_dit("tiny", 8, 4, 10, seed=0).cuda().train()
    compiled = build_dit("tiny", 8, 4, 10, seed=0).cuda().train()
    compiled.compile()  # in place, as train_sadm.py --torch_compile
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(eager, batch), loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5, msg=name)
