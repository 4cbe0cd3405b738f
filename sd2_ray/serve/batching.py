"""One batch of requests through a blocking :class:`Engine`, streamed back per request.

Ray Serve's ``@serve.batch`` decides *which* requests share a batch; this module runs that
batch: the engine's ``generate`` (blocking, torch) runs in a thread so the replica's event loop
keeps answering, and its ``on_tokens`` callback turns committed ids into text deltas that are
yielded, one list slot per request, the shape ``@serve.batch`` async generators must yield.
No Ray here, so it is tested with a plain event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from sd2_ray.serve.core import PreparedRequest, TextStream
from sd2_ray.specdec.types import Engine, GenerationResult, SpecStats


@dataclass
class Job:
    """A request in flight: what to generate, its text state, and whether its client left."""

    request: PreparedRequest
    text: TextStream
    cancelled: bool = False


@dataclass
class Delta:
    """What one request gained in one step; the last one carries the finish reason and stats."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stats: SpecStats | None = None
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # this request failed (the others of its batch did not)

    @property
    def empty(self) -> bool:
        return not self.text and not self.num_tokens and self.finish_reason is None and self.error is None


_DONE = object()


async def run_batch(
    engine: Engine, jobs: list[Job], executor: Executor, speculate: bool = True
) -> AsyncIterator[list[Delta]]:
    """Yield, step by step, a list with one :class:`Delta` per job; the final list closes them all.
    ``speculate=False``: the engine decodes this batch with the target alone."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_tokens(index: int, new_ids: list[int]) -> bool:  # runs in the engine thread
        job = jobs[index]
        text = job.text.feed(list(new_ids))
        loop.call_soon_threadsafe(events.put_nowait, (index, len(new_ids), text))
        return job.text.stopped or job.cancelled

    def generate() -> list[GenerationResult]:
        try:
            return engine.generate([job.request.generation_request() for job in jobs], on_tokens, speculate=speculate)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, _DONE)

    future = loop.run_in_executor(executor, generate)
    finished = False
    while not finished:
        step = [Delta() for _ in jobs]
        items = [await events.get()]
        while not events.empty():
            items.append(events.get_nowait())
        for item in items:
            if item is _DONE:
                finished = True
                continue
            index, count, text = item
            step[index].text += text
            step[index].num_tokens += count
        if finished:
            try:
                results = await future
            except Exception as err:  # noqa: BLE001 - isolate it: one bad request must not fail its batch
                yield await _alone(engine, jobs, executor, speculate, step, err)
                return
            yield [_final(job, result, delta) for job, result, delta in zip(jobs, results, step, strict=True)]
        elif any(not d.empty for d in step):
            yield step


def _generate_alone(engine: Engine, job: Job, speculate: bool) -> GenerationResult:
    return engine.generate([job.request.generation_request()], speculate=speculate)[0]


async def _alone(
    engine: Engine, jobs: list[Job], executor: Executor, speculate: bool, step: list[Delta], batch_error: Exception
) -> list[Delta]:
    """After a batch failed: each request that had not streamed anything yet runs again on its
    own (so only the request that fails alone fails); one that had streamed tokens cannot be
    replayed without repeating them, and reports the batch's error."""
    loop = asyncio.get_running_loop()
    out = []
    for job, delta in zip(jobs, step, strict=True):
        if job.text.ids or job.cancelled:
            out.append(_failed(delta, batch_error))
            continue
        try:
            result = await loop.run_in_executor(executor, _generate_alone, engine, job, speculate)
        except Exception as err:  # noqa: BLE001 - this request's own failure
            out.append(_failed(delta, err))
            continue
        out.append(_final(job, result, delta))
    return out


def _failed(delta: Delta, err: Exception) -> Delta:
    delta.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    delta.finish_reason = "error"
    return delta


def _final(job: Job, result: GenerationResult, delta: Delta) -> Delta:
    missing = list(result.token_ids)[len(job.text.ids) :]  # ids the callback did not report
    if missing and not job.text.stopped:
        delta.text += job.text.feed(missing)
    delta.text += job.text.finish()
    delta.finish_reason = "stop" if job.text.stopped else result.finish_reason
    delta.stats = result.stats
    delta.token_ids = list(result.token_ids)
    return delta
