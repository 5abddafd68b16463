#!/usr/bin/env python
"""Train a timm feature network on one half of the digits, for frozen-feature discriminators (issue 13 item 4).

    python scripts/train_feature_network.py --output_path feature_net/test_resnet_r16.safetensors

The SADM structure encoder can be a frozen feature network plus a trainable orthonormal projection
(`train_sadm.py --disc_backbone timm --disc_timm_pretrained_path FILE --disc_freeze_backbone --disc_head orthonormal`).
If that network were the evaluation classifier (`sadm.models.digit_classifier.DigitClassifier`, whose features define
digits-FID), the denoiser would be trained to match the metric's own features, and the metric would be gamed. This
script trains a network that differs from it in both respects that matter:

- architecture: a timm model (default `test_resnet`, timm's smallest ResNet: a three-conv deep stem, four residual
  stages with batch norm, global average pooling; 0.37 M parameters, 96 features) instead of the classifier's three plain
  conv-BN-ReLU layers with max pooling and a 512 -> 128 fully connected feature layer;
- data: a seeded random half of the 1797 digits (`--split_seed`, the other half measures its accuracy), not the
  classifier's 1497 training digits (all but a seed-0 held-out set of 300), and no augmentation.

The file holds the timm model's state dict (with its 10-class classifier, which the discriminators drop) in safetensors;
a JSON sidecar (`<output>.json`) records the model name, resolution, split and held-out accuracy. About 30 s on one CPU
thread at the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from sadm.data import DataConfig, load_train_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_path", type=str, required=True, help="The .safetensors file to write.")
    parser.add_argument("--model_name", type=str, default="test_resnet", help="timm architecture (1 input channel).")
    parser.add_argument("--resolution", type=int, default=16, help="Digits resolution (the denoiser's).")
    parser.add_argument("--split_seed", type=int, default=1, help="Seed of the random half the network trains on.")
    parser.add_argument("--seed", type=int, default=0, help="Initialisation and batch-order seed.")
    parser.add_argument("--num_epochs", type=int, default=8, help="Epochs over the training half.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many steps (tests).")
    parser.add_argument("--batch_size", type=int, default=64, help="Batch size.")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Peak AdamW learning rate (one-cycle).")
    parser.add_argument("--cache_dir", type=str, default=None, help="Data cache (default: $SADM_CACHE).")
    args = parser.parse_args(argv)
    if args.resolution < 8:
        parser.error(f"--resolution must be >= 8, got {args.resolution}")
    for flag in ("num_epochs", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if not args.output_path.endswith(".safetensors"):
        parser.error(f"--output_path must end in .safetensors, got {args.output_path}")
    return args


def digits_halves(resolution: int, split_seed: int, cache_dir: str | None = None):
    """All digits `[N, 1, R, R]` in [-1, 1] as `sadm.data` serves them, labels `[N]`, and a seeded random split into
    `(train_index, heldout_index)` halves."""
    dataset = load_train_dataset(DataConfig(resolution=resolution, cache_dir=cache_dir))
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["pixel_values"] for item in items])
    labels = torch.stack([item["class_labels"] for item in items])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    half = len(images) // 2
    return images, labels, order[:half], order[half:]


def train_feature_network(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The trained timm model (eval mode) and its record (model, split, held-out accuracy, steps, seconds)."""
    import timm

    images, labels, train, heldout = digits_halves(args.resolution, args.split_seed, args.cache_dir)
    num_classes = int(labels.max()) + 1
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = timm.create_model(args.model_name, pretrained=False, num_classes=num_classes, in_chans=1)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.num_epochs * steps_per_epoch
    if args.max_train_steps is not None:
        total = min(total, args.max_train_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=total)
    model.train()
    step = 0
    while step < total:
        permutation = train[torch.randperm(len(train), generator=generator)]
        for first in range(0, len(permutation), args.batch_size):
            index = permutation[first : first + args.batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total:
                break
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[heldout]).argmax(dim=1) == labels[heldout]).float().mean())
    record = {
        "model_name": args.model_name,
        "num_features": model.num_features,
        "resolution": args.resolution,
        "in_channels": 1,
        "num_classes": num_classes,
        "split_seed": args.split_seed,
        "num_train": len(train),
        "num_heldout": len(heldout),
        "heldout_accuracy": accuracy,
        "train_steps": step,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
    }
    return model, record


def main(argv: list[str] | None = None) -> dict:
    from safetensors.torch import save_file

    args = parse_args(argv)
    model, record = train_feature_network(args)
    folder = os.path.dirname(os.path.abspath(args.output_path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{args.output_path}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, args.output_path)  # never a half-written weights file
    with open(f"{args.output_path}.json", "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
