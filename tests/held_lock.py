"""A lock a thread of the training process holds forever, and a dataset whose reading needs it: what a
library's lock (zarr's or fsspec's event loop, tensorstore's pool, a codec's) looks like to a DataLoader
worker that starts while another thread holds it."""

import threading

from torch.utils.data import IterableDataset

LOCK = threading.Lock()


def hold_forever() -> None:
    """Take LOCK in a daemon thread that keeps it; return once it is taken."""
    taken = threading.Event()

    def hold():
        with LOCK:
            taken.set()
            threading.Event().wait()

    threading.Thread(target=hold, daemon=True).start()
    taken.wait()


class NeedsTheLock(IterableDataset):
    def __iter__(self):
        with LOCK:
            yield {"read": 1}
