"""When a step's metrics go to Ray Train (pure: a clock and a broadcast, no Ray).

A report is a collective (every rank reports, or none does), and Ray Train's controller takes
one report per worker every couple of seconds, so reporting faster stalls training. A step
reports when it is a multiple of ``report_every`` and, with ``report_interval_s``, at least
that long after the last report by rank 0's clock (agreed on by every rank). The last step never
reports here: the final checkpoint's report carries it. Every step's metrics are still kept in
the run's history.
"""

from __future__ import annotations

import time

import torch

from sd2_ray.finetune.collectives import rank0_decides


def report_due(
    every: int, interval_s: float, step: int, total: int, last_report: float, world: int, device: torch.device
) -> bool:
    """Whether this step's metrics go to Ray Train. Every rank must decide alike (a report is a
    collective), so the time gate is agreed on: rank 0's clock decides for everyone."""
    if step % every or step >= total:
        return False
    if not interval_s:
        return True
    return rank0_decides(time.monotonic() - last_report >= interval_s, world, device)
