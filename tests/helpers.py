"""Small builders shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_class_folder(root: Path, classes=("cat", "dog"), per_class=4, size=8, mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            channels = 3 if mode == "RGB" else 1
            array = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
            Image.fromarray(array if channels == 3 else array[..., 0], mode=mode).save(root / name / f"{i}.png")
    return root


def run_script(
    script: str,
    *args: str,
    launch: bool = True,
    timeout: int = 300,
    env: dict | None = None,
    cpu: bool = True,
    launch_args: tuple[str, ...] = (),
):
    """Run a script under `accelerate launch` on one CPU process; returns the CompletedProcess.

    `cpu=False` launches on the default device (one CUDA device where there is one); `launch_args` go to
    `accelerate launch` before the script (e.g. `--config_file`, which then replaces the process and precision flags).
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    if launch:
        device = ["--cpu"] if cpu else []
        flags = ["--num_processes", "1", "--num_machines", "1", *device, "--mixed_precision", "no"]
        if "--config_file" in launch_args:
            flags = []
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *flags,
            "--dynamo_backend",
            "no",
            *launch_args,
            str(REPO / "scripts" / script),
            *args,
        ]
    else:
        cmd = [sys.executable, str(REPO / "scripts" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO))


def write_dit_replica(
    root: Path,
    resolution: int = 16,
    learn_sigma: bool = True,
    num_classes: int = 1000,
    seed: int = 0,
    drop: tuple[str, ...] = (),
) -> Path:
    """A tiny local copy of the `facebook/DiT-XL-2-256` layout (`transformer/`, `vae/`, `scheduler/`, `model_index.json`).

    Same config keys and classes as the hub repo (a `Transformer2DModel`-named ada-norm-zero DiT with learned σ and 1000
    classes, an `AutoencoderKL` with a `scaling_factor`, a `DDIMScheduler` with DiT's linear β), at toy widths: the VAE
    downsamples 2x (DiT-XL-2-256's downsamples 8x) into 4 latent channels. `drop` leaves components out (bad-input tests).
    """
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    latent_size = resolution // 2
    transformer = DiTTransformer2DModel(
        in_channels=4,
        out_channels=8 if learn_sigma else 4,
        sample_size=latent_size,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=num_classes,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=resolution,
        scaling_factor=0.18215,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    root.mkdir(parents=True, exist_ok=True)
    components = {"transformer": transformer, "vae": vae, "scheduler": scheduler}
    for name, component in components.items():
        if name not in drop:
            component.save_pretrained(root / name)
    if "transformer" not in drop:  # the hub config names the legacy class and carries its unused keys
        path = root / "transformer" / "config.json"
        config = json.loads(path.read_text())
        config.update(
            _class_name="Transformer2DModel",
            cross_attention_dim=None,
            num_vector_embeds=None,
            only_cross_attention=False,
            use_linear_projection=False,
        )
        path.write_text(json.dumps(config, indent=2))
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": "0.12.0.dev0",
        "id2label": {str(i): f"class {i}" for i in range(num_classes)},
        "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def adamw_after_steps(initial: list, gradients: list[list], **implementation):
    """Flattened parameters after one AdamW (lr 1e-3, weight decay 0.01) step per entry of `gradients`, started from
    copies of `initial`; `implementation` is torch's `foreach=` / `fused=` choice (tests compare them)."""
    import torch

    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **implementation)
    for step_gradients in gradients:
        for p, g in zip(params, step_gradients):
            p.grad = g.clone()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in params])
