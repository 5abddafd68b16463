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


def run_script(script: str, *args: str, launch: bool = True, timeout: int = 300, env: dict | None = None):
    """Run a script under `accelerate launch` on one CPU process; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    if launch:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--cpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "scripts" / script),
            *args,
        ]
    else:
        cmd = [sys.executable, str(REPO / "scripts" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO))
