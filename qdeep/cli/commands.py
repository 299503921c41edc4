"""What each `qdeep` sub-command does with its parsed arguments: check its paths before Ray starts
(`qdeep.paths`: one line naming the option), call its workflow, print its summary."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from qdeep import paths
from qdeep.config import (DEEPCLUSTER_TRAIN_OPTIONS, SWEEP_OPTIONS, TRAIN_OPTIONS, DeepClusterConfig, Sweep,
                          TrainConfig, pick)
from qdeep.errors import QdeepError
from qdeep.io import child, read_text


def _use_gpu(args) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.gpu]


def _training(args, **fixed) -> TrainConfig:
    return replace(TrainConfig(), **pick(args, TRAIN_OPTIONS), **fixed)


def _inputs(args) -> list[tuple[str, str]]:
    return [(o, v) for o, v in (("--images", getattr(args, "images", None)), ("--data", getattr(args, "data", None)))
            if v]


def _check_outputs(args) -> None:
    """--out and --storage-path can be written and are not inside the input data (`qdeep.paths`)."""
    paths.output_dir(args.out, "--out", _inputs(args))
    if getattr(args, "storage_path", None):
        paths.output_dir(args.storage_path, "--storage-path", _inputs(args))


# ---- commands ------------------------------------------------------------------------------------


def cmd_synth(args) -> None:
    from qdeep.data.synth import write_synthetic_classes, write_synthetic_planet

    if args.multiclass and args.bands != 3:
        raise QdeepError("--bands 4 writes the Planet layout's GeoTIFFs; leave out --multiclass")
    paths.output_dir(args.out, "--out")
    if args.multiclass:
        summary = write_synthetic_classes(args.out, n_per_class=args.n, size=args.size, seed=args.seed, progress=True)
        print(f"wrote {args.n} images of each of {', '.join(summary['classes'])} to {args.out}/<class>/")
        return
    summary = write_synthetic_planet(args.out, n=args.n, size=args.size, seed=args.seed, n_test=args.n_test,
                                     progress=True, bands=args.bands)
    also = " (JPEGs and 4-band GeoTIFFs)" if args.bands == 4 else ""
    print(f"wrote {summary['n_train']} training and {summary['n_test']} test images{also} to {args.out}")


def cmd_pack(args) -> None:
    from qdeep.data.pack import MANIFEST, describe
    from qdeep.workflows.pack import run_pack

    paths.training_data(args.data, args.labels, args.images, image_format=args.image_format)
    _check_outputs(args)
    manifest = run_pack(args.out, data=args.data, labels=args.labels, images=args.images, shard_mb=args.shard_mb,
                        on_bad_image=args.on_bad_image, address=args.address, image_format=args.image_format)
    print(f"packed {describe(manifest)} into {args.out}")
    if manifest["skipped"]:
        print(f"skipped inputs are listed in {child(args.out, MANIFEST)}")


def cmd_baseline(args) -> None:
    from qdeep.report import summary_table
    from qdeep.tracking import tracking_uri
    from qdeep.workflows.baseline import run_baseline

    paths.training_data(args.data, args.labels, args.images, packs=True, image_format=args.image_format)
    _check_outputs(args)
    m = run_baseline(args.out, data=args.data, labels=args.labels, images=args.images, folds=args.folds,
                     seed=args.seed, trees=args.trees, on_bad_image=args.on_bad_image,
                     tracking_uri=args.tracking_uri, address=args.address, image_format=args.image_format,
                     bands=args.bands, indices=args.indices)
    print(summary_table(m["f2_oof"], m["per_label_f2"], m["thresholds"], m["label_counts"]))
    print(f"\n{m['n_images']} images, {m['n_skipped']} skipped; outputs in {args.out}")
    if m["n_skipped"]:
        print(f"skipped files are listed in {args.out}/metrics.json")
    print(f"MLflow run {m['mlflow_run_id']} in {tracking_uri(args.tracking_uri)}")


def cmd_train(args) -> None:
    from qdeep.workflows.train import run_train

    paths.training_data(args.data, args.labels, args.images, packs=True, image_format=args.image_format)
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

    paths.training_data(args.data, args.labels, args.images, packs=True, image_format=args.image_format)
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
    print(read_text(child(args.out, "report.md")))
    print(f"{len(rows)} trials; results in {args.out}/results.csv")


def cmd_ladder(args) -> None:
    from qdeep.workflows.ladder import run_ladder

    paths.training_data(args.data, args.labels, args.images, packs=True, image_format=args.image_format)
    paths.weights_file(args.weights)
    _check_outputs(args)
    run_ladder(args.out, _training(args, lr=args.lr), data=args.data, labels=args.labels,
               images=args.images, arch=args.arch, scratch_arch=args.scratch_arch, weights=args.weights,
               workers=args.workers, trees=args.trees, on_bad_image=args.on_bad_image,
               tracking_uri=args.tracking_uri, address=args.address, plugins=args.plugins)
    print(read_text(child(args.out, "ladder.md")))


def cmd_features(args) -> None:
    from qdeep.data.pack import is_pack
    from qdeep.workflows.features import extract_features

    if not is_pack(args.images):
        paths.image_dir(args.images, "--images")
    paths.weights_file(args.weights)
    _check_outputs(args)
    store = extract_features(args.images, args.arch, args.weights, args.out, batch_size=args.batch_size,
                             image_size=args.image_size, rows_per_shard=args.rows_per_shard,
                             on_bad_image=args.on_bad_image, address=args.address, image_format=args.image_format,
                             bands=args.bands, band_init=args.band_init)
    print(f"wrote {store.total_rows} descriptors of dim {store.dim} in {len(store.shards)} shard(s) to {args.out}")


def cmd_deepcluster(args) -> None:
    from qdeep.workflows.deepcluster import run_deepcluster

    if not paths.is_pack_or_uri(args.images):
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
                        tracking_uri=args.tracking_uri, address=args.address, max_failures=args.max_failures,
                        plugins=args.plugins)
    final = m["final"]
    text = f"final: {len(final['sizes'])} clusters, score {final['score']:.4f}"
    if "nmi_true" in final:
        text += f", NMI {final['nmi_true']:.3f} / ARI {final['ari_true']:.3f} / purity {final['purity_true']:.3f}"
    print(text)
    print(f"assignments in {args.out}/assignments.parquet; the report, with each group's grid and profile: "
          f"{args.out}/report.html")


def cmd_profile(args) -> None:
    from qdeep.workflows.profile import run_profile

    if args.images and not paths.is_pack_or_uri(args.images):
        paths.image_dir(args.images, "--images")
    run_profile(args.out, images=args.images, address=args.address, tracking_uri=args.tracking_uri)


def cmd_predict(args) -> None:
    from qdeep.workflows.predict import run_predict

    paths.model_dir(args.model, "--model")
    if args.images:
        paths.image_dir(args.images, "--images")
    if args.data and not paths.is_pack_or_uri(args.data):
        paths.planet_dir(args.data, "--data", split="test", image_format=None)  # the model says which
    paths.output_file(args.out, "--out", _inputs(args))
    r = run_predict(args.model, args.out, images=args.images, data=args.data, on_bad_image=args.on_bad_image,
                    address=args.address, tta=args.tta, output_format=args.output_format, plugins=args.plugins)
    print(f"wrote {r['n_predicted']} predictions to {r['out']} ({r['n_skipped']} skipped)")
    if r["skipped"]:
        print(json.dumps(r["skipped"], indent=1), file=sys.stderr)


def cmd_compare(args) -> None:
    from qdeep.io import basename, read_json, unfinished
    from qdeep.report import comparison_table

    runs = {}
    for out in args.runs:
        why = unfinished(out)
        if why:
            raise QdeepError(why)
        runs[basename(out)] = read_json(child(out, "metrics.json"))
    print(comparison_table(runs))


def ray_log(args) -> Path | None:
    """Where the command put Ray's output (`distributed.session`): in OUT, or beside a file or store."""
    from qdeep.distributed.session import log_beside, log_in

    if args.command in ("features", "predict", "pack"):
        return log_beside(args.out)
    return None if args.command in ("synth", "compare") else log_in(args.out)
