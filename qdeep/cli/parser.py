"""The `qdeep` command line: one sub-command per workflow. The options of the run configurations
(`qdeep.config`) are generated from their fields, so every default lives in one place."""

from __future__ import annotations

import argparse

from qdeep.cli import commands
from qdeep.config import (DEEPCLUSTER_HELP, DEEPCLUSTER_TRAIN_OPTIONS, FEATURES_OPTIONS, LADDER_OPTIONS, SWEEP_OPTIONS,
                          TRAIN_OPTIONS, BaselineConfig, DeepClusterConfig, FeaturesConfig, LadderConfig, Sweep,
                          TrainConfig)
from qdeep.data.pack import DEFAULT_SHARD_MB
from qdeep.options import (Parser, add_fields, csv_list, encoding_name, freeze_spec, int_range,
                           learning_rate, non_negative_int, positive_float, positive_int, run_name, seed_int, workers_spec)

# ---- options shared by several commands --------------------------------------------------------


def _data_args(p) -> None:
    g = p.add_argument_group("data (--data, or --labels with --images, or --images alone: a folder per class)")
    g.add_argument("--data", metavar="DIR", help="Kaggle Planet layout: train_v2.csv, train-jpg/, test-jpg/; "
                                                 "train and tune also take a pack (`qdeep pack`: a folder or s3://)")
    g.add_argument("--labels", metavar="CSV", help="any CSV with columns image_name,tags")
    g.add_argument("--images", metavar="DIR", help="the folder the labels CSV names images in; alone, one "
                                                   "sub-folder per class")
    _encoding_arg(g)


def _encoding_arg(p) -> None:
    p.add_argument("--encoding", type=encoding_name, default="utf-8",
                   help="text encoding of the CSVs (default utf-8, with or without a BOM), e.g. latin-1")


def _run_args(p, tracking: bool = True, bad_input: bool = True) -> None:
    """Bad-input policy, Ray cluster and MLflow store: every command that reads images."""
    if bad_input:
        p.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                       help="error: stop at the first bad file or CSV line (default); skip: skip, count and report")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    if tracking:
        p.add_argument("--tracking-uri",
                       help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def _placement_args(p, what: str = "run") -> None:
    """Where a Ray Train run goes: workers, GPUs, checkpoints, restarts."""
    p.add_argument("--workers", type=workers_spec, default="2", metavar="N|MIN-MAX",
                   help="Ray Train workers (GPUs when the cluster has them); MIN-MAX is elastic: start with the "
                        "workers the cluster holds (at least MIN), grow towards MAX as nodes join (default 2)")
    p.add_argument("--storage-path", help="where checkpoints live (default: OUT/ray_results)")
    p.add_argument("--max-failures", type=non_negative_int,
                   help=f"worker failures the {what} recovers from, restarting from the last checkpoint "
                        "(default 0; 3 for elastic --workers MIN-MAX)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="GPU workers: auto (when the cluster has GPUs now), yes (ask for them: an autoscaling "
                        "cluster starts GPU nodes), no")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qdeep", description="Training and clustering for aerial and satellite images.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's driver, controller and worker output on the terminal (default: in OUT's log)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: it may register tasks, validations, fit strategies, formats, "
                             "callbacks (repeatable; also QDEEP_PLUGINS=mod1,mod2)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = TrainConfig()

    p = sub.add_parser("synth", help="write a synthetic Planet-layout dataset", description=(
        "Procedural tiles carrying the 17 Planet tags, visible in the pixels; deterministic for a seed."))
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--n", type=positive_int, default=2000, help="training images (default 2000)")
    p.add_argument("--n-test", type=non_negative_int, default=None, help="test images (default n/4)")
    p.add_argument("--size", type=int_range(8, unit=" (pixels)"), default=128, help="tile side in pixels (default 128)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--multiclass", action="store_true",
                   help="instead: one scene class per image, a folder per class (--n images per class)")
    p.add_argument("--bands", type=int, choices=(3, 4), default=3,
                   help="4: also train-tif-v2/ and test-tif-v2/, 4-band (blue, green, red, near-infrared) 16-bit "
                        "GeoTIFFs of the same tiles, whose NIR band shows what RGB barely does (blow_down); "
                        "Planet layout only (default 3: RGB JPEGs)")
    p.set_defaults(func=commands.cmd_synth)

    p = sub.add_parser("pack", help="pack a data set into Parquet shards of image bytes, locally or in a bucket",
                       description="Every image of --data (Planet layout), --labels with --images, or --images (a "
                                   "folder per class), its bytes unchanged, with its name, labels and split, into "
                                   "Parquet shards of at most about --shard-mb and a manifest written last, at a local "
                                   "path or a URI (s3://bucket/prefix: credentials and endpoint from the standard AWS "
                                   "variables). `--data` and `--images` of every command take the pack.")
    _data_args(p)
    p.add_argument("--out", required=True, metavar="URI", help="a folder or a bucket prefix (s3://, gs://, ...)")
    add_fields(p, BaselineConfig(), ["image_format"], image_format={
        "help": "jpg: images Pillow decodes to RGB (train-jpg/ of the Planet layout); tif: multiband GeoTIFFs "
                "(train-tif-v2/), their bytes unchanged, every image checked to have the first one's bands"})
    p.add_argument("--shard-mb", type=positive_float, default=DEFAULT_SHARD_MB,
                   help=f"at most about how many MB of images a shard holds (default {DEFAULT_SHARD_MB}); smaller, "
                        "down to 16, when that gives every CPU of the cluster a shard to pack and later to read")
    _run_args(p, tracking=False)
    p.set_defaults(func=commands.cmd_pack)

    p = sub.add_parser("baseline", help="colour-histogram Random Forest with K-fold F2 and thresholds",
                       description="26-bin RGB histograms on Ray, one Random Forest per label, "
                                   "K-fold out-of-fold F2, per-label thresholds, a final model and submission.")
    _data_args(p)
    add_fields(p, BaselineConfig(), ["folds", "trees", "seed", "image_format", "bands", "indices"])
    p.add_argument("--out", required=True, metavar="OUT")
    _run_args(p)
    p.set_defaults(func=commands.cmd_baseline)

    p = sub.add_parser("train", help="train a CNN data-parallel on Ray Train",
                       description="A CNN (from scratch, or pretrained with a frozen backbone or the last N blocks "
                                   "fine-tuned) trained with DDP on Ray Train workers; validated every epoch; "
                                   "checkpointed; the best epoch exported to OUT/model.")
    _data_args(p)
    add_fields(p, train, ["arch", "weights", "freeze", "lr", "refit"])
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--name", type=run_name,
                   help="run name; rerunning the same name and storage path resumes (default: train)")
    _placement_args(p)
    add_fields(p, train, TRAIN_OPTIONS)
    _run_args(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep over architecture x weights x freeze depth x lr",
                       description="Each trial is a full Ray Train run; ASHA stops weak trials early; rerunning "
                                   "the same --name resumes. Writes OUT/results.csv, report.md, ladder.png, "
                                   "per_label.png; one MLflow parent run with a child per trial.")
    _data_args(p)
    p.add_argument("--archs", type=csv_list(str, "architectures"), default=[train.arch],
                   help=f"comma-separated, e.g. resnet18,alexnet (default {train.arch})")
    p.add_argument("--weights", type=csv_list(str, "weights"), default=[train.weights],
                   help=f"comma-separated: none,imagenet,bundled,PATH (default {train.weights})")
    p.add_argument("--freeze", type=csv_list(freeze_spec, "freeze depths"), default=[train.freeze],
                   help=f"comma-separated, e.g. head,last:1,none (default {train.freeze})")
    p.add_argument("--lr", type=csv_list(learning_rate, "learning rates"), default=[train.lr],
                   help=f"comma-separated, e.g. 1e-3,3e-4 (default {train.lr:g})")
    p.add_argument("--space", metavar="YAML", help="the sweep as YAML (same keys; lists are grids, "
                                                   "{choice: [...]} / {loguniform: [lo, hi]} are sampled)")
    add_fields(p, Sweep(), SWEEP_OPTIONS)
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--name", type=run_name, default="sweep", help="rerunning the same name resumes unfinished trials")
    p.add_argument("--storage-path", help="where trials and checkpoints live (default: OUT/ray_results)")
    add_fields(p, train, TRAIN_OPTIONS)
    _run_args(p)
    p.set_defaults(func=commands.cmd_tune)

    p = sub.add_parser("ladder", help="the four-way experiment: histogram RF, scratch, frozen, fine-tuned CNN",
                       description="One held-out split, one threshold procedure: histogram_rf, a CNN from scratch, "
                                   "a pretrained CNN with frozen backbone, then its last 2 blocks fine-tuned. "
                                   "Writes OUT/ladder.csv, ladder.md, ladder.png, per_label.png.")
    _data_args(p)
    add_fields(p, LadderConfig(), LADDER_OPTIONS)
    add_fields(p, train, ["lr"])
    p.add_argument("--out", required=True, metavar="OUT")
    add_fields(p, train, TRAIN_OPTIONS)
    _run_args(p)
    p.set_defaults(func=commands.cmd_ladder)

    p = sub.add_parser("features", help="descriptors of every image into a sharded Arrow feature store",
                       description="Penultimate-layer, globally pooled CNN features of every image under --images, "
                                   "computed with Ray Data (GPU actors when present) into Arrow shards + manifest, "
                                   "at a path or a URI (s3://...).")
    p.add_argument("--images", required=True, metavar="DIR|PACK",
                   help="a folder of images (recursive), or a pack (`qdeep pack`: a folder or an s3:// URI)")
    add_fields(p, FeaturesConfig(), FEATURES_OPTIONS)
    p.add_argument("--out", required=True, metavar="STORE")
    _run_args(p, tracking=False)
    p.set_defaults(func=commands.cmd_features)

    dc = DeepClusterConfig()
    p = sub.add_parser("deepcluster", help="DeepCluster: cluster descriptors, train on the clusters, repeat",
                       description="Each iteration: descriptors of every image into a feature store, PCA-whitening "
                                   "+ k-means into --k pseudo-labels, a fresh head and the network trained on them "
                                   "with Ray Train (ctrl split held out). Then the last network over-clusters into "
                                   "--final-k groups: OUT/assignments.parquet, metrics.json, grids/, curves.png, "
                                   "sizes.png, profiles/ and report.html (`qdeep profile`). Rerunning the same --out "
                                   "resumes after the last finished iteration. --images and --out may be URIs "
                                   "(s3://...).")
    p.add_argument("--images", required=True, metavar="DIR|PACK",
                   help="a folder of images (recursive), or a pack (`qdeep pack`: a folder or an s3:// URI; "
                        "its labels, when every image has some, are the ground truth)")
    add_fields(p, dc.train, ["arch", "weights"], weights={"help": "the starting network: none | imagenet | "
                                                                  "bundled | PATH"})
    add_fields(p, dc, ["k", "iterations"])
    add_fields(p, dc.train, DEEPCLUSTER_TRAIN_OPTIONS, **DEEPCLUSTER_HELP)
    add_fields(p, dc, ["final_k", "pca"])
    g = p.add_argument_group("ground truth, for NMI/ARI/purity (optional)")
    g.add_argument("--labels", metavar="CSV", help="a Planet-style CSV (image_name,tags) over --images")
    g.add_argument("--data", metavar="DIR", help="a folder-per-class layout, or a Planet layout")
    _encoding_arg(g)
    p.add_argument("--out", required=True, metavar="OUT", help="a folder every node sees, or a URI (s3://...)")
    _placement_args(p, "loop")
    _run_args(p)
    p.set_defaults(func=commands.cmd_deepcluster)

    p = sub.add_parser("profile", help="rebuild a DeepCluster run's group profiles and OUT/report.html",
                       description="For the finished DeepCluster run in --out: per group its palette, colour and "
                                   "texture descriptors against the whole collection, in words, and Grad-CAM "
                                   "saliency of its most central members; OUT/profiles/ and OUT/report.html, also "
                                   "logged to the run's MLflow run. `qdeep deepcluster` writes them at its end.")
    p.add_argument("--out", required=True, metavar="OUT", help="a DeepCluster run's output (a folder or a URI)")
    p.add_argument("--images", metavar="DIR|PACK", help="where the run's images are now (default: where they were)")
    _run_args(p, bad_input=False)  # the run's images were checked when it ran
    p.set_defaults(func=commands.cmd_profile)

    p = sub.add_parser("predict", help="predict tags with a saved model and write a submission CSV")
    p.add_argument("--model", required=True, metavar="DIR", help="a model directory, e.g. OUT/model")
    p.add_argument("--images", metavar="DIR", help="a folder of images (recursive)")
    p.add_argument("--data", metavar="DIR", help="a Planet-layout folder: predicts its test split")
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--tta", action="store_true", help="CNN models: average the 8 flips/rotations")
    _encoding_arg(p)
    p.add_argument("--format", dest="output_format",
                   help="kaggle-planet | csv | jsonl | a plugin's (default: kaggle-planet for tags, csv for classes)")
    _run_args(p, tracking=False)
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser("compare", help="compare runs' F2, overall and per label",
                       description="Reads OUT/metrics.json of baseline and train runs and prints one table.")
    p.add_argument("runs", nargs="+", metavar="OUT", help="output directories of baseline/train runs")
    p.set_defaults(func=commands.cmd_compare)
    return parser
