"""Gauges whose value is a function of time (an age), set on a short interval.

prometheus_client can compute a gauge at scrape time (``set_function``), but
not in multiprocess mode: there ``/metrics`` reads each worker's files, so
each worker writes its current value every ``interval_s`` (1 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from prometheus_client import Gauge

log = logging.getLogger(__name__)

Reading = tuple[Gauge, Callable[[], float]]


class GaugeTicker:
    """Sets each gauge from its function now and then every ``interval_s`` until closed."""

    def __init__(self, readings: Sequence[Reading], interval_s: float = 1.0) -> None:
        self._readings = list(readings)
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> None:
        for gauge, read in self._readings:
            gauge.set(read())

    async def start(self) -> None:
        self.tick()
        if self._task is None and self._readings:
            self._task = asyncio.create_task(self._loop(), name="gauges")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.tick()
            except Exception:  # a gauge must never stop the process, nor the other gauges for long
                log.exception("gauge update failed")
