"""What the handler reports for monitoring: Prometheus metrics and the input-statistics log.

Metrics are declared in metrics.yaml (TorchServe drops undeclared ones) and aggregated per batch, so a
batch emits a few metric lines, not several per request. The input log holds light statistics of each
served image (never the image) for tools/drift_report.py, in a bounded, rotating JSON-lines file.
Copied into the model archive as a top-level module.
"""

import json
import logging
import logging.handlers
import time
from collections import Counter
from pathlib import Path

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


class InputLog:
    """Rotating JSON lines: {t, w, h, stats, class, p, model_version} per successfully classified request."""

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
        self, sizes: list[tuple[int, int]], stats: list[list[float]], classes: list[int], probs: list[float]
    ) -> None:
        now = round(time.time(), 3)
        for (w, h), st, c, p in zip(sizes, stats, classes, probs):
            row = {"t": now, "w": w, "h": h, "stats": [round(v, 5) for v in st], "class": c, "p": round(p, 5),
                   "model_version": self.model_version}  # fmt: skip
            self.logger.info(json.dumps(row, separators=(",", ":")))
