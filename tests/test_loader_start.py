"""DataLoader workers start clean: not forks of a training process whose threads hold locks."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the training process: a thread holds a lock that reading a batch needs, then the workers start
SCRIPT = """
from model.data.stream import make_loader
from tests.held_lock import NeedsTheLock, hold_forever

hold_forever()
print([batch["read"] for batch in make_loader(NeedsTheLock(), workers=2)])
"""


def test_workers_read_while_a_thread_of_the_training_process_holds_a_lock_they_need():
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers too are ended below, whatever they wait on
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("a DataLoader worker waited for ever on a lock held when it started") from None
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["[1,", "1]"]  # each of the 2 workers read its batch
