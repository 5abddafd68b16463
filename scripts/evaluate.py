#!/usr/bin/env python
"""Measure generated samples against a reference: FID, KID, precision/recall, Inception Score, class accuracy.

    # a trained pipeline folder, digits-FID against the embedded digits (10 classes, equal samples per class)
    accelerate launch scripts/evaluate.py --samples runs/digits --num_samples 2000 --metrics fid,kid,precision,recall,accuracy

    # saved samples (.npz with uint8 `images` [N, H, W, C] and optional `labels`, or a folder of PNGs) against saved statistics
    python scripts/evaluate.py --samples samples.npz --reference_stats digits_r16.npz --output_json metrics.json

    # FID with the standard Inception-v3 (the weights file is never downloaded)
    python scripts/evaluate.py --samples runs/x --feature_network inception --inception_weights pt_inception-2015-12-05-6726825d.pth

The reference is `--reference_stats` (a file written by `--save_reference_stats`), or `--reference_npz` (images), or the
dataset given by the data flags (default: the embedded digits at `--resolution`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

import sadm  # noqa: F401  registers sadm's pipeline classes on diffusers, so DiffusionPipeline.from_pretrained finds them
from sadm.cli import add_data_args, data_config_from_args, parse_metric_list
from sadm.data import load_train_dataset, resolve_num_workers
from sadm.evaluation import (
    build_feature_network,
    check_feature_network_name,
    check_metrics,
    compute_reference_statistics,
    extract_features,
    load_image_folder,
    load_images_npz,
    sample_features,
)
from sadm.metrics import METRICS, FeatureStatistics, MetricOptions, check_metric_names, compute_metrics

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--samples",
        type=str,
        required=True,
        help="A pipeline folder (model_index.json) to sample, an .npz with uint8 `images` (+ `labels`), or a folder of PNGs.",
    )
    parser.add_argument(
        "--num_samples",
        type=int,
        default=None,
        help="Images to generate from a pipeline (default 1000), or the first N of an .npz / PNG folder (default all).",
    )
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampling steps of the pipeline.")
    parser.add_argument(
        "--guidance_scale", type=float, default=1.0, help="Classifier-free guidance scale (1 disables it)."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of sampling, of the reference subset and of KID subsets."
    )
    parser.add_argument(
        "--batch_size", type=int, default=64, help="Per-process batch size of sampling and feature extraction."
    )
    parser.add_argument(
        "--reference_stats", type=str, default=None, help="Reference statistics .npz (from --save_reference_stats)."
    )
    parser.add_argument(
        "--reference_npz",
        type=str,
        default=None,
        help="Reference images: .npz with uint8 `images` [N, H, W, C] (+ `labels`).",
    )
    parser.add_argument(
        "--num_reference_samples",
        type=int,
        default=None,
        help="A seeded random subset of the reference data (default all).",
    )
    parser.add_argument(
        "--save_reference_stats",
        type=str,
        default=None,
        help="Write the reference statistics (with the raw features, for KID/PR) to this .npz for later --reference_stats.",
    )
    parser.add_argument(
        "--feature_network",
        type=str,
        default="digits",
        help="digits (the cached digit classifier, at --resolution), inception (FID Inception-v3), pixels (raw pixels: "
        "pixel-space FID/KID, no network), random (a fixed random conv: sanity checks only), or timm:<model name>.",
    )
    parser.add_argument(
        "--inception_weights", type=str, default=None, help="Local path of pt_inception-2015-12-05-6726825d.pth."
    )
    parser.add_argument(
        "--timm_weights", type=str, default=None, help="Local timm checkpoint for timm:<name> (default: random init)."
    )
    parser.add_argument(
        "--timm_image_size", type=int, default=None, help="Input size of the timm network (default its own)."
    )
    parser.add_argument(
        "--classifier_cache_dir",
        type=str,
        default=None,
        help="Where the digit classifier is cached (default ~/.cache/sadm).",
    )
    parser.add_argument(
        "--metrics",
        type=str,
        default="fid,kid,precision,recall",
        help=f"Comma-separated, from {','.join(METRICS)}. accuracy uses the digit classifier; is uses the feature network's logits.",
    )
    parser.add_argument("--kid_subsets", type=int, default=100, help="KID: number of random subsets.")
    parser.add_argument(
        "--kid_subset_size", type=int, default=1000, help="KID: subset size (capped at the smaller set)."
    )
    parser.add_argument("--pr_k", type=int, default=3, help="Precision/recall: k of the k-NN balls.")
    parser.add_argument("--output_json", type=str, default=None, help="Write the results here as JSON.")
    add_data_args(parser)
    args = parser.parse_args(argv)

    try:
        check_metric_names(parse_metric_list(args.metrics))
        check_feature_network_name(args.feature_network)
        MetricOptions(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, pr_k=args.pr_k)
    except ValueError as error:
        parser.error(str(error))
    data_config_from_args(args, parser)
    if args.reference_stats is not None and args.reference_npz is not None:
        parser.error("Give --reference_stats or --reference_npz, not both.")
    if args.reference_stats is not None and args.save_reference_stats is not None:
        parser.error(
            "--save_reference_stats writes statistics computed from images; --reference_stats already is a file."
        )
    if not Path(args.samples).exists():
        parser.error(f"--samples {args.samples} does not exist.")
    return args


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    metrics = parse_metric_list(args.metrics)
    options = MetricOptions(
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, pr_k=args.pr_k, seed=args.seed
    )
    feature_network = build_feature_network(
        args.feature_network,
        args.resolution,
        accelerator,
        inception_weights=args.inception_weights,
        timm_weights=args.timm_weights,
        timm_image_size=args.timm_image_size,
        cache_dir=args.classifier_cache_dir,
    )
    classifier = None
    if any(METRICS[name].needs == "classifier" for name in metrics):
        digits = feature_network if args.feature_network == "digits" else None
        if digits is None:
            digits = build_feature_network("digits", args.resolution, accelerator, cache_dir=args.classifier_cache_dir)
        classifier = digits.logits
        logger.info(f"accuracy: digit classifier {digits.identity} (held-out accuracy {digits.heldout_accuracy:.4f})")
    check_metrics(metrics, feature_network, classifier)

    # reference
    if args.reference_stats is not None:
        reference = FeatureStatistics.load_npz(args.reference_stats, feature_network.identity)
        reference_source = args.reference_stats
    else:
        if args.reference_npz is not None:
            dataset, reference_source = load_images_npz(args.reference_npz), args.reference_npz
        else:
            dataset = load_train_dataset(data_config_from_args(args))
            reference_source = args.dataset_name or args.train_data_dir or "digits (scikit-learn load_digits)"
        reference = compute_reference_statistics(
            feature_network,
            dataset,
            accelerator,
            args.batch_size,
            args.num_reference_samples,
            args.seed,
            num_workers=resolve_num_workers(args.dataloader_num_workers, dataset),
        )
        if args.save_reference_stats is not None and accelerator.is_main_process:
            reference.save_npz(args.save_reference_stats, feature_network.identity, features=reference.features)
            logger.info(f"Wrote reference statistics to {args.save_reference_stats}")

    # samples
    samples = Path(args.samples)
    with_logits = any(METRICS[name].needs == "logits" for name in metrics)
    if (samples / "model_index.json").exists():
        pipeline = DiffusionPipeline.from_pretrained(samples).to(accelerator.device)
        fake = sample_features(
            pipeline,
            feature_network,
            args.num_samples or 1000,
            accelerator,
            batch_size=args.batch_size,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            with_logits=with_logits,
            classifier=classifier,
        )
    else:
        if samples.suffix == ".npz":
            dataset = load_images_npz(samples, args.num_samples)
        elif samples.is_dir():
            dataset = load_image_folder(samples, args.num_samples)
        else:
            raise ValueError(f"--samples {samples} is neither a pipeline folder, an .npz, nor a folder of PNGs.")
        fake = extract_features(
            feature_network,
            dataset,
            accelerator,
            args.batch_size,
            with_logits,
            classifier,
            "samples",
            num_workers=resolve_num_workers(args.dataloader_num_workers, dataset),
        )

    results = compute_metrics(reference, fake, metrics, options)
    report = {
        **results,
        "num_samples": int(fake["features"].shape[0]),
        "num_reference": reference.num_samples,
        "feature_network": feature_network.identity,
        "samples": str(samples),
        "reference": reference_source,
    }
    if accelerator.is_main_process:
        width = max(len(key) for key in report)
        print(
            "\n".join(
                f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}"
                for key, value in report.items()
            )
        )
        if args.output_json is not None:
            Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main(parse_args())
