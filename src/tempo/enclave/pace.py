"""Workers that answer far slower than their peers: the rule that retires them as 'slow'.

A worker can answer every job correctly just before the timeout, forever: never stalled, never
lying, and the run crawls. Timeouts cannot tell it from a big job, but its peers can: the other
live workers run the same kind of job (the same op in the same direction: the shards of one op
side by side, or that op in other steps). A reply is *slow* when it took longer than both
``floor_s`` (fast jobs never trip it, however noisy) and ``ratio`` times the median of those
workers' recent replies of that kind. A worker with ``strikes`` slow replies among its last
``window`` judged ones is retired as 'slow' (one hiccup is not enough) when another live worker can
take over. No reference, no judgement: a kind of job only this worker ran is never called slow.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

SLOW_RATIO = 10.0
SLOW_FLOOR_S = 5.0
SLOW_STRIKES = 2
WINDOW = 5


@dataclass
class Pace:
    """Recent reply times per worker and kind of job, and the verdict on each new one."""

    ratio: float = SLOW_RATIO
    floor_s: float = SLOW_FLOOR_S
    strikes: int = SLOW_STRIKES
    window: int = WINDOW
    _times: dict[tuple[Hashable, int], deque[float]] = field(default_factory=dict)
    _judged: dict[int, deque[bool]] = field(default_factory=dict)
    _lagging: set[int] = field(default_factory=set)  # workers whose last measured reply took over floor_s

    def lagging(self, worker: int) -> bool:
        """Whether `worker`'s last measured reply took longer than the floor. Its replies are then collected
        after its peers': one collected first would leave theirs already waiting, their times unmeasured."""
        return worker in self._lagging

    def judge(self, worker: int, kind: Hashable, seconds: float, peers: Iterable[int]) -> str | None:
        """Record that `worker` took `seconds` over a job of `kind`; say why it is too slow, or None.
        `peers`: the other live workers, whose recent replies of that kind are the reference."""
        reference = [t for peer in peers for t in self._times.get((kind, peer), ())]
        (self._lagging.add if seconds > self.floor_s else self._lagging.discard)(worker)
        self._times.setdefault((kind, worker), deque(maxlen=self.window)).append(seconds)
        if not reference:
            return None
        typical = statistics.median(reference)
        judged = self._judged.setdefault(worker, deque(maxlen=self.window))
        judged.append(seconds > max(self.floor_s, self.ratio * typical))
        if not judged[-1] or sum(judged) < self.strikes:
            return None
        verdict = (f"was over {self.ratio:g}x slower than the other workers in {sum(judged)} of its last "
                   f"{len(judged)} replies (the last: {seconds:.1f} s for a job that took them {typical:.3f} s)")
        judged.clear()
        return verdict
