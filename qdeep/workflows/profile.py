"""What each DeepCluster group looks like: OUT/profiles/ and OUT/report.html (`qdeep deepcluster`
writes them at its end; `qdeep profile --out OUT` rebuilds them for a finished run).

Per group (`qdeep.profiles`): its palette (k-means in CIELAB on pixels of up to PALETTE_MEMBERS
members, decoded here), the median and spread of colour and texture descriptors of every member (Ray
tasks over the collection, a progress bar; a few numbers per image in memory), those as z-scores against the whole
collection and in words, and a Grad-CAM of the last network's pseudo-label head on its most central
members (`qdeep.models.saliency`).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from qdeep import io, profiles, tracking
from qdeep.data import BadInputPolicy, load_rgb
from qdeep.data.inputs import InputBands, model_input
from qdeep.data.pack import Pack, is_pack
from qdeep.data.planet import ImageSet
from qdeep.distributed.session import log_in, ray_session
from qdeep.distributed.tasks import image_features
from qdeep.errors import QdeepError
from qdeep.html_report import deepcluster_report
from qdeep.io import atomic_dir, child
from qdeep.report import cluster_grid, deepcluster_curves, deepcluster_sizes

PALETTE_MEMBERS = 64  # members per group whose pixels make its palette
PALETTE_PIXELS = 256  # pixels sampled from each of them
CENTRAL = 4  # most central members shown with their saliency
GRID_SIZE = 16  # members on a group's grid


def _descriptors(image) -> np.ndarray:
    return profiles.describe_image(np.asarray(image.convert("RGB")))


def _lab_pixels(image) -> np.ndarray:
    return profiles.lab_pixels(np.asarray(image.convert("RGB")), PALETTE_PIXELS, np.random.default_rng(0))


def run_profile(out: str | Path, images: str | None = None, address: str | None = None,
                tracking_uri: str | None = None, progress=print) -> Path:
    """`qdeep profile`: OUT/profiles/ and OUT/report.html of the finished DeepCluster run in OUT
    (`images`: where its images are now, when they moved); also logged to the run's MLflow run."""
    out = io.resolved(out)
    metrics = io.read_json(child(out, "metrics.json"))
    if not metrics or "final" not in metrics:
        raise QdeepError(f"{out} holds no finished DeepCluster run (no metrics.json): run qdeep deepcluster first")
    with ray_session(address, log=log_in(out)), io.outputs(out) as folder:
        assignments = BytesIO(io.read_bytes(child(out, "assignments.parquet")))
        write_report(folder, metrics, assignments, images=images, progress=progress)
        if metrics.get("mlflow_run_id"):
            with tracking.parent_run(metrics["mlflow_run_id"], "deepcluster", {}, tracking_uri):
                tracking.log_artifacts(*report_files(folder))
        io.write_json(folder / "metrics.json", metrics)  # last: the outputs are whole again
    progress(f"report: {child(out, 'report.html')}")
    return Path(folder) / "report.html"


def report_files(folder: Path) -> list[Path]:
    return [folder / n for n in ("report.html", "profiles", "grids", "curves.png", "sizes.png")]


def write_report(folder: Path, metrics: dict, assignments, images: str | None = None, progress=print) -> list[dict]:
    """grids/, curves.png, sizes.png, profiles/ (profiles.json, palette_XX.png, saliency_XX.png) and
    report.html into `folder`, from a run's metrics.json content and its assignments.parquet
    (a path or a file object); returns the groups' profiles."""
    import pyarrow.parquet as pq

    table = pq.read_table(assignments)
    ids, labels = table["image"].to_pylist(), table["cluster"].to_numpy()
    distance = table["distance"].to_numpy() if "distance" in table.column_names else np.zeros(len(ids))
    history = metrics.get("iterations", [])
    last = table[f"iter_{history[-1]['iteration']}"].to_numpy() if history else None
    source = images or metrics.get("images")
    if not source:
        raise QdeepError("metrics.json does not say where the run's images are: give --images")
    bands = InputBands.from_dict(metrics["bands"], "metrics.json") if metrics.get("bands") else None
    pack = Pack(source) if is_pack(source) else None
    decode = bands.preview if bands else load_rgb
    collection = ImageSet(names=ids, paths=ids if pack else [Path(source) / i for i in ids])

    progress(f"profiles of {len(np.unique(labels))} groups over {len(ids)} images")
    features, _ = image_features(_descriptors, collection, BadInputPolicy(), "group profiles: colour and texture",
                                 pack=pack and pack.uri, decode=decode)
    central, sampled = {}, {}  # per group: its members nearest to its centre first; a random few
    rng = np.random.default_rng(0)
    for c in range(metrics["final"]["k"]):  # an empty group gets a blank grid
        members = np.flatnonzero(labels == c)
        central[c] = members[np.argsort(distance[members], kind="stable")][:GRID_SIZE]
        sampled[c] = rng.permutation(members)[:PALETTE_MEMBERS]
    wanted = sorted({ids[i] for rows in (*central.values(), *sampled.values()) for i in rows})
    refs = pack.images(wanted) if pack else {i: str(Path(source) / i) for i in wanted}
    pixels = {c: np.concatenate([_lab_pixels(decode(refs[ids[i]])) for i in rows])
              for c, rows in tqdm(sampled.items(), desc="group profiles: palettes", unit="group") if len(rows)}
    groups = [p.to_dict() for p in profiles.profile_groups(labels, features, pixels)]

    with atomic_dir(folder / "grids") as grids:
        for c, members in central.items():
            cluster_grid([refs[ids[i]] for i in members], grids / f"cluster_{c:02d}.png",
                         f"cluster {c}: {int((labels == c).sum())} images", load=decode)
    deepcluster_curves(history, folder / "curves.png")
    deepcluster_sizes(history, metrics["final"]["sizes"], folder / "sizes.png")
    network = _last_network(metrics, bands) if history else None
    final = folder / "profiles"  # where atomic_dir puts the files written into `out`
    with atomic_dir(final) as out:
        for g in groups:
            c = g["group"]
            profiles.swatch_strip(g["palette"], out / f"palette_{c:02d}.png")
            g.update(grid=folder / "grids" / f"cluster_{c:02d}.png", swatch=final / f"palette_{c:02d}.png")
            if network is not None:
                g["target"] = int(np.bincount(last[labels == c]).argmax())  # most members' last pseudo-class
                _saliency_strip(network, [refs[ids[i]] for i in central[c][:CENTRAL]], g["target"], decode,
                                out / f"saliency_{c:02d}.png")
                g["saliency"] = final / f"saliency_{c:02d}.png"
        io.write_json(out / "profiles.json", {"features": list(profiles.FEATURES),
                                              "groups": [{k: v for k, v in g.items() if not isinstance(v, Path)}
                                                         for g in groups]})
    settings = {"images": source, "n_images": len(ids), **metrics.get("config", {})}
    deepcluster_report(folder, metrics, groups, list(profiles.FEATURES), settings)
    return groups


def _last_network(metrics: dict, bands: InputBands | None):
    """The last iteration's network with its pseudo-label head (a file or a URI), and what it is fed."""
    from qdeep.models import build_model

    config = metrics["config"]
    model = build_model(config["arch"], config["k"], metrics["final"]["weights"], "none", bands and bands.names,
                        config["band_init"])
    return model.eval(), model_input(model.qdeep_arch, config.get("image_size"), bands)


def _saliency_strip(network, refs: list, target: int, decode, path: Path, thumb: int = 128) -> None:
    """The images at `refs` side by side, each with the Grad-CAM of pseudo-class `target` over it."""
    import torch
    from PIL import Image

    from qdeep.models.saliency import grad_cam, overlay

    model, read = network
    x = torch.stack([read(r) for r in refs])
    cams = grad_cam(model, x, [target] * len(refs))
    strip = Image.new("RGB", (thumb * len(refs), thumb), "white")
    for i, (ref, cam) in enumerate(zip(refs, cams)):
        strip.paste(overlay(decode(ref).resize((thumb, thumb)), cam), (i * thumb, 0))
    with io.atomic_path(path) as tmp:
        strip.save(tmp, format="PNG")

