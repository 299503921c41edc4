"""`qdeep features`: descriptors of every image under a folder into a feature store."""

from __future__ import annotations

from pathlib import Path

from qdeep.config import FeaturesConfig
from qdeep.data import BadInputPolicy, ImageSet, load_rgb, scan_images
from qdeep.data.images import IMAGE_EXTENSIONS
from qdeep.data.inputs import input_bands
from qdeep.data.pack import Pack, is_pack
from qdeep.distributed.features import embed_images, folder_rows, pack_images
from qdeep.distributed.session import log_beside, ray_session
from qdeep.distributed.tasks import check_images
from qdeep.errors import QdeepError


def extract_features(images: str | Path, arch: str, weights: str, out: str | Path,
                     batch_size: int = FeaturesConfig.batch_size, image_size: int | None = None,
                     rows_per_shard: int = FeaturesConfig.rows_per_shard,
                     on_bad_image: str = "error", address: str | None = None,
                     image_format: str = FeaturesConfig.image_format, bands: str | None = None,
                     band_init: str = FeaturesConfig.band_init):
    """Build the store at `out` from every image under `images` (ids relative to `images`), or of the
    pack `images` (a folder or URI holding pack.json; ids its image names, decoding checked when packed).
    Multiband images (`image_format` tif): the `bands` chosen, the network's first convolution
    adapted by `band_init`, each band normalised by its statistics in a sample of the images."""
    if is_pack(images):
        pack = Pack(str(images))
        pack.check_format(image_format, f"--images {images}")
        names = pack.read(("image",))["image"].to_pylist()
        chosen = input_bands(image_format, names, bands, pack)
        with ray_session(address, log=log_beside(out)):
            return embed_images(pack_images(pack), pack.total, pack.uri, arch, weights, out, batch_size, image_size,
                                rows_per_shard, extra={"n_skipped": 0, "skipped": [], "pack": pack.uri},
                                bands=chosen, band_init=band_init)
    root = Path(images).resolve()
    policy = BadInputPolicy(on_bad_image)
    found = scan_images(root, policy)
    if not found:
        raise QdeepError(f"{root}: no images to describe ({', '.join(IMAGE_EXTENSIONS)}, in or below it)")
    chosen = input_bands(image_format, found, bands)
    with ray_session(address, log=log_beside(out)):
        good = check_images(ImageSet(names=[str(p) for p in found], paths=found), policy,
                            decode=chosen.read if chosen else load_rgb)
        if not good.paths:
            raise QdeepError(f"{root}: none of its {len(found)} images could be decoded ({policy.n_skipped} skipped)")
        return embed_images(folder_rows(root, good.paths), len(good.paths), root, arch, weights, out, batch_size,
                            image_size, rows_per_shard, extra={"n_skipped": policy.n_skipped, "skipped": policy.skipped},
                            bands=chosen, band_init=band_init)
