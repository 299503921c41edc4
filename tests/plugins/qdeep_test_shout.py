"""A plugin only tests/test_output.py loads: every Ray Train worker prints a line as each epoch
starts, to see where workers' output goes."""

from qdeep.parts.callbacks import CALLBACKS, Callback

LINE = "qdeep-test: a line from rank {rank}, epoch {epoch}"


@CALLBACKS.register("test-shout")
class Shout(Callback):
    def on_epoch_start(self, rank: int, epoch: int) -> None:
        print(LINE.format(rank=rank, epoch=epoch), flush=True)
