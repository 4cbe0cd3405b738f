"""Placement groups a stopped trial leaves behind, found and removed while the search runs.

Seen with Ray 2.60: ASHA stops a trial while its TorchTrainer's worker placement group is still
PENDING (the cluster is full). The trial and its Train controller die; Train's
``PlacementGroupCleaner`` only knows groups that were ready, so it removes nothing, and the
group is created later with no owner left: it holds its CPUs (GPUs, on a GPU cluster) for good,
and the next trial waits for them without end.

:class:`OrphanSweeper` (a Tune callback, run in the search's driver) looks every ``interval_s``
at this job's CREATED placement groups; one whose resources nothing holds (no actor, no task)
on ``strikes`` looks in a row is removed, with a warning naming its bundles. Groups of other jobs
(a production Serve app, say) are never touched. Needs Ray's state API (the dashboard) to tell
this job's groups apart; without it the sweeper does nothing.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

log = logging.getLogger(__name__)


class OrphanSweeper(Callback):
    def __init__(self, interval_s: float = 10.0, strikes: int = 3):
        self.interval_s, self.strikes = interval_s, strikes
        self.next_look = time.monotonic() + interval_s
        self.empty: dict[str, int] = {}  # group id -> consecutive looks without an actor
        self.removed: list[str] = []

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + self.interval_s
        try:
            self.sweep()
        except Exception as err:  # noqa: BLE001 - no state API (no dashboard): nothing to sweep with
            log.debug("orphan sweep skipped: %s", err)

    def final_sweeps(self, window_s: float, every_s: float = 2.0) -> None:
        """After the search: look every ``every_s`` for ``window_s``, removing every group of this
        job that holds nothing (a stopped controller's late group among them)."""
        end = time.monotonic() + window_s
        while True:
            try:
                self.sweep(final=True)
            except Exception as err:  # noqa: BLE001 - no state API: nothing to sweep with
                log.debug("final orphan sweep skipped: %s", err)
                return
            if time.monotonic() > end:
                return
            time.sleep(every_s)

    def sweep(self, final: bool = False) -> None:
        """One look; ``final`` (the search is over, no trial lives): every group of this job that
        holds nothing goes now, PENDING ones too (they would be created later, for no one)."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        from ray.util.state import list_placement_groups

        context = ray.get_runtime_context()
        groups = [
            g
            for g in list_placement_groups(
                address=context.gcs_address,
                filters=[("creator_job_id", "=", context.get_job_id())],
                detail=True,
                limit=1000,
                raise_on_missing_output=False,
                timeout=10,
            )
            if g.state == "CREATED" or (final and g.state == "PENDING")
        ]
        total, free = ray.cluster_resources(), ray.available_resources()
        live = {g.placement_group_id for g in groups}
        self.empty = {gid: n for gid, n in self.empty.items() if gid in live}
        for group in groups:
            gid = group.placement_group_id
            used = in_use(gid, total, free)
            if used is None and group.state == "CREATED":
                continue  # bundles of nothing countable: never judged
            self.empty[gid] = 0 if used else self.empty.get(gid, 0) + 1
            if self.empty[gid] >= (1 if final else self.strikes):
                bundles = [b.get("unit_resources") for b in group.bundles or []]
                log.warning(
                    "tune: removing placement group %s %s (%s): nothing runs in it (left by a stopped trial)",
                    gid[:12],
                    bundles,
                    group.state,
                )
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(gid))))
                self.removed.append(gid)
                self.empty.pop(gid)


def in_use(group_id: str, total: dict[str, float], free: dict[str, float]) -> bool | None:
    """Whether an actor or task holds any of a created group's resources: Ray lists each group's
    share of the cluster as ``<resource>_group_<id>``, free and total (None: no such share)."""
    keys = [k for k in total if k.endswith(f"_group_{group_id}")]
    if not keys:
        return None
    return any(free.get(k, 0.0) < total[k] - 1e-9 for k in keys)
