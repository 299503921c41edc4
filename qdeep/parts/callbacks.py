"""Worker callbacks: what a plugin module asks every Ray Train worker to run at each epoch (or
DeepCluster iteration), registered by name like any other part. qdeep registers none of its own;
its tests register a fault injector and a check that the ranks' weights agree (tests/plugins/)."""

from __future__ import annotations

from qdeep.registry import Registry

CALLBACKS: Registry = Registry("callback")


class Callback:
    """The hooks, each a no-op here; a registered subclass overrides what it needs."""

    def on_epoch_start(self, rank: int, epoch: int) -> None:
        """Before training epoch `epoch` on this rank."""

    def on_epoch_end(self, rank: int, epoch: int, model, metrics: dict) -> None:
        """After epoch `epoch` was validated, before it is reported: may add entries to `metrics`."""

    def on_iteration_start(self, rank: int, iteration: int) -> None:
        """Before DeepCluster iteration `iteration` embeds the images on this rank."""


def callbacks() -> list[Callback]:
    """One instance of every registered callback (those of the plugins loaded)."""
    return [CALLBACKS.get(name)() for name in CALLBACKS.names()]
