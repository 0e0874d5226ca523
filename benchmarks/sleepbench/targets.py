"""The SPEC's targets ("Targets" in /work/shared/SPEC.md), in one place; the report judges against these.

Ratios ("x limit") are of the pinned-copy limit measured in the same run, same size and direction.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Target:
    at_least: bool       # the value must be >= bound (else <=)
    bound: float
    text: str            # what the table's "target" column says

    def verdict(self, value: Optional[float]) -> str:
        if value is None:
            return "n/a"
        ok = value >= self.bound if self.at_least else value <= self.bound
        return "PASS" if ok else "FAIL"


TARGETS: dict[str, Target] = {
    "first_sleep_x": Target(True, 0.95, ">= 0.95x limit"),         # first level-1 sleep
    "warm_x": Target(True, 0.97, ">= 0.97x limit"),                # warm sleep and wake
    "host_ratio": Target(False, 1.01, "<= 1.01"),                  # host bytes / bytes backed up
    "reclaimable_warm_x": Target(True, 0.9, ">= 0.9x limit"),      # host policy "reclaimable", warm
    "l2_ms": Target(False, 30.0, "<= 30 ms"),                      # level-2 sleep + wake, median
    "returned_pct": Target(True, 99.9, ">= 99.9%"),                # memory returned on sleep
    "load_ratio": Target(False, 1.1, "<= 1.1"),                    # load into pools / torch's allocator
}

# How the level-2 figure is measured: the median over this many cycles, with this pause between the
# sleep and the wake (the trainer runs in between); the same cycles with no pause are reported too.
L2_CYCLES = 10
L2_PAUSE_S = 1.0


def target(key: str) -> Target:
    return TARGETS[key]
