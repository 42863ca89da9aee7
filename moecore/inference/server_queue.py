"""One worker thread in front of the engine: requests wait in line, and those that agree on
their sampling parameters are batched into one ``generate`` call (standard library only).

The engine is not re-entrant, and under ``torchrun`` every ``generate`` is a collective the
other ranks join, so exactly one thread ever calls it. Requests with a ``seed`` run alone:
their samples must not depend on what else arrived at the same time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Job:
    prompts: list[list[int]]
    params: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Any] | None = None
    error: BaseException | None = None


class GenerationQueue:
    """Serializes ``engine.generate`` onto one thread; batches compatible waiting requests.

    ``max_batch_size`` bounds the prompts of one batched call (a single request may not exceed
    it: the server refuses larger ones). ``batch=False`` runs each request on its own.
    """

    def __init__(self, engine: Any, max_batch_size: int, batch: bool = True) -> None:
        self.engine, self.max_batch_size, self.batch = engine, max_batch_size, batch
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moecore-generate", daemon=True)
        self._thread.start()

    def generate(self, prompts: list[list[int]], params: Any) -> list[Any]:
        """The engine's completions for ``prompts`` (blocks; re-raises the engine's error)."""
        job = _Job(prompts, params)
        with self._cv:
            if self._closed:
                raise RuntimeError("the generation queue is closed")
            self._jobs.append(job)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def pending(self) -> int:
        """Requests waiting for the engine (not counting the one running)."""
        with self._cv:
            return len(self._jobs)

    def close(self) -> None:
        """Stop the worker once the waiting requests are done."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if not self._jobs:
                    return
                batch = self._take_batch()
            self._execute(batch)

    def _take_batch(self) -> list[_Job]:
        first = self._jobs.popleft()
        batch, rows = [first], len(first.prompts)
        if not self.batch or getattr(first.params, "seed", None) is not None:
            return batch
        for job in list(self._jobs):
            if job.params == first.params and rows + len(job.prompts) <= self.max_batch_size:
                self._jobs.remove(job)
                batch.append(job)
                rows += len(job.prompts)
        return batch

    def _execute(self, batch: Sequence[_Job]) -> None:
        try:
            results = self._call([p for job in batch for p in job.prompts], batch[0].params)
        except Exception as err:  # noqa: BLE001 - handed to the waiting request threads
            if len(batch) > 1:  # run them one by one so one bad request fails only itself
                for job in batch:
                    self._execute([job])
                return
            batch[0].error = err
            batch[0].done.set()
            return
        start = 0
        for job in batch:
            job.result = results[start:start + len(job.prompts)]
            start += len(job.prompts)
            job.done.set()

    def _call(self, prompts: list[list[int]], params: Any) -> list[Any]:
        results = list(self.engine.generate(prompts, params))
        if len(results) != len(prompts):
            raise RuntimeError(f"the engine returned {len(results)} completions for "
                               f"{len(prompts)} prompts")
        return results
