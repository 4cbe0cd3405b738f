"""The last thing the README's main command prints is its closing line: progress bars of Ray
workers whose closing state never reached the driver are not redrawn after it."""

from __future__ import annotations

import os


def remote_bar_state(pid: int, uuid: str) -> dict:
    """A bar as a Ray worker on this node reports it to the driver (ray.experimental.tqdm_ray)."""
    import ray._private.services as services

    return {
        "__magic_token__": "__ray_tqdm_magic_token__",
        "x": 48,
        "pos": 0,
        "desc": "finetune loss 0.35",
        "total": 48,
        "unit": "it",
        "ip": services.get_node_ip_address(),
        "pid": pid,
        "uuid": uuid,
        "closed": False,
    }


def test_a_worker_bar_left_open_is_not_redrawn_after_the_closing_line(capfd, monkeypatch):
    import builtins

    from ray.experimental import tqdm_ray

    from sd2_ray.runtime import disconnect_quietly

    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test: Ray patches it
    monkeypatch.setattr(tqdm_ray, "_manager", None)
    manager = tqdm_ray.instance()  # patches print, as Ray does on a driver that shows worker bars
    manager.process_state_update(remote_bar_state(os.getpid() + 1, "bar-left-open"))
    capfd.readouterr()
    disconnect_quietly()
    print("sd2 run: report at out/tiny/report/report.md")
    out, err = capfd.readouterr()
    assert out.strip().splitlines()[-1] == "sd2 run: report at out/tiny/report/report.md"
    assert "finetune loss" not in err, err  # the stale bar was not redrawn around the print
