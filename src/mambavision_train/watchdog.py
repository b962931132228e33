"""Where this rank is, for the two ways a multi-rank run can stall: a peer that died or stopped answering (the
collective that waited for it ends the run with one line naming the step and the phase, ``peer_failures``), and this
rank itself not progressing (a thread that writes every thread's stack to the rank's log once, ``Watchdog``)."""

from __future__ import annotations

import faulthandler
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .distributed import is_peer_failure
from .errors import PeerFailed
from .log import say

FLOOR_S = 300.0  # the automatic bound never goes below this: first steps, validation, a checkpoint write
FACTOR = 3.0


class Heartbeat:
    """The phase this rank is in (``at``), with the time it entered it; the longest phase seen so far; whether an
    optimizer step has finished yet."""

    def __init__(self):
        self.phase, self.since, self.slowest, self.stepped = "start", time.monotonic(), 0.0, False

    def step_finished(self, global_step: int):
        self.at(f"the end of global step {global_step} (its log line and checkpoint)")
        self.stepped = True

    def at(self, phase: str):
        now = time.monotonic()
        self.slowest = max(self.slowest, now - self.since)
        self.phase, self.since = phase, now

    def quiet_for(self) -> float:
        return time.monotonic() - self.since


@contextmanager
def peer_failures(heartbeat: Heartbeat, rank: int, timeout_s: float, last_checkpoint):
    """A collective that failed because another rank died or hung becomes one line and exit status 75."""
    try:
        yield
    except Exception as e:
        if not is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerFailed(f"rank {rank} lost a peer rank in {heartbeat.phase} after {heartbeat.quiet_for():.0f} s "
                         f"(dist.timeout_s={timeout_s:g}): another rank died or stopped answering ({first[:160]}); "
                         f"resume from the last checkpoint ({last_checkpoint() or 'none yet'}) with resume=auto, "
                         f"the default") from None


class Watchdog(threading.Thread):
    """When the heartbeat has been quiet for ``bound_s`` (0: FACTOR times its slowest phase, at least FLOOR_S), say
    so in one line and append every thread's stack to ``path``, once per quiet spell; the run goes on. Until the
    first step has finished (start-up, compilation, the first batches) the bound is at least FLOOR_S."""

    def __init__(self, heartbeat: Heartbeat, path: Path, rank: int, bound_s: float = 0.0, poll_s: float = 1.0):
        super().__init__(name="mambavision-watchdog", daemon=True)
        self.heartbeat, self.path, self.rank, self.fixed, self.poll_s = heartbeat, Path(path), rank, bound_s, poll_s
        self.done = threading.Event()

    def bound(self) -> float:
        bound = self.fixed or max(FLOOR_S, FACTOR * self.heartbeat.slowest)
        return bound if self.heartbeat.stepped else max(bound, FLOOR_S)

    def run(self):
        reported = None
        while not self.done.wait(self.poll_s):
            hb = self.heartbeat
            if hb.since == reported or hb.quiet_for() < self.bound():
                continue
            reported = hb.since
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = (f"watchdog: rank {self.rank}: nothing finished for {hb.quiet_for():.0f} s in {hb.phase} "
                      f"(bound {self.bound():.0f} s)")
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {header}; every thread's stack:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.write("\n")
            say(f"{header}: every thread's stack written to {self.path}")

    def stop(self):
        self.done.set()
