"""Load from real HTTP clients and a replica-count timeline, for the Serve tests and
``bench/bench_serve.py --autoscale``: every request has a bounded timeout and is recorded
(start, end, HTTP status or error, completion tokens), so a test can say how many failed, how
fast, and whether any hung."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Outcome:
    """One request: when it ran, its HTTP status (0 = no response) and tokens."""

    start: float
    end: float
    status: int
    tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Load:
    """``clients`` threads posting chat completions to ``base_url`` in a loop until stopped
    (or ``max_requests`` each); a closed loop, like users waiting for their answer."""

    base_url: str
    clients: int
    prompts: list[str]
    model: str = "target"
    max_tokens: int = 16
    timeout_s: float = 60.0
    max_requests: int = 10_000
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, join_s: float | None = None) -> bool:
        """Stop sending; wait for requests in flight (each bounded by ``timeout_s``). True when
        every client thread ended."""
        self._stop.set()
        deadline = time.monotonic() + (join_s if join_s is not None else self.timeout_s + 10)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _client(self, i: int) -> None:
        import requests

        with requests.Session() as session:
            for j in range(self.max_requests):
                if self._stop.is_set():
                    return
                self._record(self._one(session, self.prompts[(i + j) % len(self.prompts)]))

    def _one(self, session, prompt: str) -> Outcome:
        import requests

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        start = time.monotonic()
        try:
            r = session.post(f"{self.base_url}/chat/completions", json=body, timeout=self.timeout_s)
        except requests.RequestException as err:
            return Outcome(start, time.monotonic(), 0, error=type(err).__name__)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return Outcome(start, time.monotonic(), r.status_code, tokens, "" if r.ok else r.text[:200])

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


class Timeline:
    """Samples ``probe()`` (e.g. the running replica count) every ``period_s`` in a thread."""

    def __init__(self, probe: Callable[[], int], period_s: float = 0.5):
        self.probe, self.period_s = probe, period_s
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(30)
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, int(self.probe())))
            except Exception:  # noqa: BLE001 - a probe failing mid-failover is a gap, not an end
                pass
            self._stop.wait(self.period_s)

    def latest(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def wait_for(self, predicate: Callable[[int], bool], timeout_s: float) -> float | None:
        """Seconds (since the timeline started) at which ``predicate(count)`` first held, or None."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and predicate(self.samples[-1][1]):
                return self.samples[-1][0]
            time.sleep(self.period_s / 2)
        return None


def running_replicas(app: str, deployment: str = "SpecDecodeServer") -> int:
    """Replicas of ``app``'s deployment that Serve reports RUNNING."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    states = status.deployments[deployment].replica_states
    return int(sum(n for state, n in states.items() if str(state).endswith("RUNNING")))


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def tokens_per_s(outcomes: list[Outcome], t0: float, t1: float) -> float:
    """Completion tokens of requests that ended in [t0, t1), per second (monotonic times)."""
    done = sum(o.tokens for o in outcomes if t0 <= o.end < t1)
    return done / max(t1 - t0, 1e-9)
