"""What the handler reports for monitoring: Prometheus metrics and the input-statistics log, off the
request path.

Metrics are declared in metrics.yaml (TorchServe drops undeclared ones). The input log holds light
statistics of each served image (never the image) for tools/drift_report.py, in bounded, rotating
JSON-lines files, one per worker. ``Monitor`` does both in a background thread, once per interval for every batch served
meanwhile: the worker answers a request before any of it runs, and the frontend parses a few metric lines a
second instead of ~10 per batch (BENCHMARKS.md, "Latency"). Copied into the model archive as a top-level module.
"""

import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
import typing
from collections import Counter
from pathlib import Path

import torch
from presets import image_stats
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

log = logging.getLogger(__name__)
CONFIDENCE_BUCKETS = (0.5, 0.8, 0.95, 0.99)  # upper edges; the last bucket is [0.99, 1]


def confidence_bucket(p: float) -> str:
    lo = 0.0
    for hi in CONFIDENCE_BUCKETS:
        if p < hi:
            return f"{lo:g}-{hi:g}"
        lo = hi
    return f"{lo:g}-1"


class HandlerMetrics:
    COUNTERS = ("GTSRBRequests", "GTSRBPredictedClass", "GTSRBConfidence", "GTSRBLowConfidence")
    GAUGES = ("GTSRBPreprocessTime", "GTSRBInferenceTime")

    def __init__(self, cache, model_name: str, low_confidence: float) -> None:
        self.model_name, self.low_confidence = model_name, low_confidence
        try:
            self.m = {n: cache.get_metric(n, MetricTypes.COUNTER) for n in self.COUNTERS}
            self.m |= {n: cache.get_metric(n, MetricTypes.GAUGE) for n in self.GAUGES}
        except (MetricsCacheKeyError, AttributeError):
            log.warning("handler metrics are not declared in TorchServe's metrics config: not emitted")
            self.m = None

    def record(
        self, outcomes: Counter, top1: list[tuple[str, float]], preprocess_ms: float, inference_ms: float
    ) -> None:
        if self.m is None:
            return
        name = self.model_name
        for outcome, n in outcomes.items():
            self.m["GTSRBRequests"].add_or_update(n, [name, outcome])
        for cls, n in Counter(c for c, _ in top1).items():
            self.m["GTSRBPredictedClass"].add_or_update(n, [name, cls])
        for bucket, n in Counter(confidence_bucket(p) for _, p in top1).items():
            self.m["GTSRBConfidence"].add_or_update(n, [name, bucket])
        low = sum(p < self.low_confidence for _, p in top1)
        if low:
            self.m["GTSRBLowConfidence"].add_or_update(low, [name])
        self.m["GTSRBPreprocessTime"].add_or_update(round(preprocess_ms, 3), [name])
        if top1:
            self.m["GTSRBInferenceTime"].add_or_update(round(inference_ms, 3), [name])


def worker_slot(argv: list[str] | None = None) -> str:
    """This worker's place in TorchServe: the port of its socket (``W-9000`` in TorchServe's logs), which a
    restarted worker keeps; the process id outside TorchServe."""
    argv = sys.argv if argv is None else argv
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--sock-name", "--port"):  # unix: /tmp/.ts.sock.9000; tcp: 9000
            return value.rsplit(".", 1)[-1]
    return f"pid{os.getpid()}"


def input_log_path(log_dir: Path, argv: list[str] | None = None) -> Path:
    """``gtsrb_inputs.jsonl.w<slot>``: one file per worker, so that no two processes rotate one file (a
    rotation by one would drop the rows the other wrote meanwhile). Rotated files add ``.1``, ``.2``, ...;
    ``gtsrb_inputs.jsonl*`` matches them all (``make drift-report``)."""
    return Path(log_dir) / f"gtsrb_inputs.jsonl.w{worker_slot(argv)}"


class InputLog:
    """Rotating JSON lines: {t, w, h, stats, class, p, model_version} per successfully classified request.
    Written by one process (``input_log_path``): RotatingFileHandler's rotation is not safe across processes."""

    def __init__(self, path: Path, max_bytes: int, backups: int, model_version: str = "unknown") -> None:
        self.model_version = model_version
        path.parent.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger(f"gtsrb.inputs.{path}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if not self.logger.handlers:
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)

    def write(
        self,
        sizes: list[tuple[int, int]],
        stats: list[list[float]],
        classes: list[int],
        probs: list[float],
        times: list[float] | None = None,
    ) -> None:
        """One row per image; ``times``: when each was served (default: now). All rows go out in one write:
        per-row records cost the monitor thread ~25 ms a second at full load (a size check and a flush each)."""
        times = times or [time.time()] * len(sizes)
        rows = [
            json.dumps(
                {
                    "t": round(t, 3),
                    "w": w,
                    "h": h,
                    "stats": [round(v, 5) for v in st],
                    "class": c,
                    "p": round(p, 5),
                    "model_version": self.model_version,
                },
                separators=(",", ":"),
            )
            for t, (w, h), st, c, p in zip(times, sizes, stats, classes, probs)
        ]
        if rows:
            self.logger.info("\n".join(rows))


class Batch(typing.NamedTuple):
    """What one served batch leaves for monitoring."""

    t: float  # when it was served (time.time())
    outcomes: Counter  # predicted / bad_input / too_large
    top1: list[tuple[int, str, float]]  # (class index, class name, probability) per predicted image
    preprocess_ms: float
    inference_ms: float
    images: torch.Tensor | None  # the predicted images, uint8 [N, 3, S, S], for their statistics
    sizes: list[tuple[int, int]]  # their sizes as received


class Monitor:
    """Monitoring off the request path. ``submit()`` queues a batch (no other work); a daemon thread
    ``flush()``es every ``interval`` seconds: the counters summed over the batches, the time gauges as their
    mean per batch, and the input log rows with the statistics of all queued images computed at once. A worker
    that dies loses at most ``interval`` seconds of metrics and log rows."""

    def __init__(self, metrics: HandlerMetrics, input_log: InputLog | None, interval: float) -> None:
        self.metrics, self.input_log, self.interval = metrics, input_log, interval
        self._queue: queue.SimpleQueue[Batch] = queue.SimpleQueue()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="gtsrb-monitor", daemon=True).start()

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # monitoring must never stop: log and go on
                log.exception("monitoring flush failed")

    def flush(self) -> None:
        """Emit everything submitted so far (the background thread's job; tests call it directly)."""
        with self._lock:
            batches = []
            while True:
                try:
                    batches.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batches:
                return
            outcomes = sum((b.outcomes for b in batches), Counter())
            top1 = [(name, p) for b in batches for _, name, p in b.top1]
            predicting = [b.inference_ms for b in batches if b.top1]
            self.metrics.record(
                outcomes,
                top1,
                sum(b.preprocess_ms for b in batches) / len(batches),
                sum(predicting) / len(predicting) if predicting else 0.0,
            )
            served = [b for b in batches if b.images is not None and b.top1]
            if self.input_log is not None and served:
                stats = image_stats(torch.cat([b.images for b in served])).tolist()
                self.input_log.write(
                    [s for b in served for s in b.sizes],
                    stats,
                    [c for b in served for c, _, _ in b.top1],
                    [p for b in served for _, _, p in b.top1],
                    [b.t for b in served for _ in b.top1],
                )
