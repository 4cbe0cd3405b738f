"""`sd2 serve` with autoscaling under load from 16 real HTTP clients (loopback): the replica
count rises within 60 s, returns to the minimum after the load stops, and no request fails
while replicas come and go. A tiny random pair keeps the replicas quick to start."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # 70-100 s on 2 shared cores

APP = "sd2"
CLIENTS = 16
# Proxies and replicas report load every 10 s by default; a cluster operator sets these on the
# cluster (Serve reads them per process). 1 s here, on the private Ray this module starts.
PUSH_INTERVALS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_ADDRESS": "local",
}  # a private Ray, never a cluster another `ray start` left here


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The served pair, started as `sd2 serve` starts it, with fast autoscaling knobs."""
    from ray import serve

    from sd2_ray.runtime import ensure_ray
    from sd2_ray.serve.config import ServeConfig
    from sd2_ray.serve.http import free_port
    from sd2_ray.serve.job import start
    from sd2_ray.testing.serve_pairs import save_tiny_pair

    target, drafter = save_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    saved = {key: os.environ.get(key) for key in PUSH_INTERVALS}
    os.environ.update(PUSH_INTERVALS)
    ray = ensure_ray(num_cpus=4)
    config = ServeConfig.load(
        None,
        {
            "target": target,
            "drafter": drafter,
            "port": free_port(),
            "model_name": "target",
            "num_cpus_per_replica": 0.5,
            "max_batch_size": 4,
            "batch_wait_timeout_s": 0.01,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_requests": 4,
                "upscale_delay_s": 2,
                "downscale_delay_s": 5,
                "look_back_period_s": 2,
            },
        },
    )
    try:
        yield start(config)
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_autoscaling_follows_load_without_failed_requests(served):
    from sd2_ray.testing.serve_load import Load, Timeline, failed, running_replicas

    timeline = Timeline(lambda: running_replicas(APP)).start()
    assert timeline.wait_for(lambda n: n == 1, 30) is not None
    load = Load(
        served, CLIENTS, ["hello world", "def add(a, b):", "The quick brown fox"], max_tokens=16, timeout_s=60
    ).start()
    t_load = timeline.samples[-1][0]
    up = timeline.wait_for(lambda n: n >= 2, 60)
    peak_at = timeline.wait_for(lambda n: n >= 3, 30)  # more load, more time at the top
    stopped = load.stop()
    t_stop = timeline.samples[-1][0]
    down = timeline.wait_for(lambda n: n == 1, 90)
    samples = timeline.stop()
    outcomes = load.snapshot()
    peak = max(n for _, n in samples)
    after = lambda t, t0: "never" if t is None else f"{t - t0:.1f} s"  # noqa: E731
    print(
        f"autoscaling: >=2 replicas {after(up, t_load)} after the load began, 3 {after(peak_at, t_load)} "
        f"after; load stopped {t_stop - t_load:.1f} s in, back to 1 {after(down, t_stop)} after; peak "
        f"{peak}; {len(outcomes)} requests, {len(failed(outcomes))} failed"
    )
    assert stopped, "a client was still waiting past its timeout"
    assert up is not None and up - t_load <= 60, f"no scale-up within 60 s: {samples[-20:]}"
    assert down is not None, f"not back to 1 replica 90 s after the load stopped: {samples[-20:]}"
    assert outcomes and not failed(outcomes), [(o.status, o.error) for o in failed(outcomes)][:5]
