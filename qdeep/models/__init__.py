"""CNN architectures for multi-label tagging: registry, weights, freezing, embeddings.

Kept free of Ray so that workers, inference and tests can import it cheaply.
"""

from qdeep.models.freeze import apply_freeze, parse_freeze, set_train_mode
from qdeep.models.weights import weights_sha256
from qdeep.models.zoo import ArchSpec, arch_spec, build_model, embed, list_archs, reset_head

__all__ = ["ArchSpec", "apply_freeze", "arch_spec", "build_model", "embed", "list_archs", "parse_freeze",
           "reset_head", "set_train_mode", "weights_sha256"]
