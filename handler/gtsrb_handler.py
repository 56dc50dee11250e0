"""TorchServe handler for the GTSRB traffic-sign classifier (models/gtsrb.pt)."""

import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from image_input import InputError, decode_image, request_bytes
from presets import EvalPreset, image_stats
from serving_metrics import HandlerMetrics, InputLog
from ts.torch_handler.base_handler import BaseHandler


class GTSRBHandler(BaseHandler):
    """Image bytes -> top-k {class name: probability}, highest first (the stock image-classifier shape).

    BaseHandler loads the TorchScript model, ``index_to_name.json`` and ``model-config.yaml``; this
    class adds decoding with per-request errors: in a batch, a bad image gets its own 4xx JSON error
    and the others still get their predictions (stock handlers fail the whole batch with a 503).
    Preprocessing is ``presets.EvalPreset``, the training pipeline's own; normalisation and resizing
    to the network's resolution are inside the exported model.
    """

    def initialize(self, context):
        cfg = context.model_yaml_config.get("handler", {})
        torch.set_num_threads(int(cfg["torch_threads"]))
        super().initialize(context)
        self.topk = int(cfg["topk"])
        self.max_pixels = int(cfg["max_pixels"])
        self.image_size = int(self.model.image_size)
        self.preset = EvalPreset(size=self.image_size)
        self.names = [self.mapping[str(i)] for i in range(len(self.mapping))]
        self.stats = HandlerMetrics(context.metrics, context.model_name, float(cfg["low_confidence"]))
        self.input_log = None
        if cfg.get("input_log_mb", 0) > 0:  # per-request input statistics for `make drift-report`
            path = Path(os.environ.get("LOG_LOCATION", "logs")) / "gtsrb_inputs.jsonl"
            self.input_log = InputLog(path, int(cfg["input_log_mb"] * 2**20), backups=3)

    def _load_torchscript_model(self, model_pt_path):
        with warnings.catch_warnings():  # torch 2.14 flags TorchScript as deprecated on every load
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            return super()._load_torchscript_model(model_pt_path)

    def preprocess(self, data):
        """Decode each request; a bad one becomes an InputError for its index, the rest a uint8 batch."""
        t0 = time.perf_counter()
        images, sizes, errors = [], [], {}
        for i, row in enumerate(data):
            try:
                img = decode_image(request_bytes(row), max_pixels=self.max_pixels, draft_size=2 * self.image_size)
                images.append(self.preset(img))
                sizes.append(img.size)
            except InputError as e:
                errors[i] = e
        batch = torch.stack(images) if images else None
        return {"images": batch, "sizes": sizes, "errors": errors, "preprocess_ms": (time.perf_counter() - t0) * 1e3}

    def inference(self, data, *args, **kwargs):
        data["top"], data["inference_ms"] = None, 0.0
        if data["images"] is not None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                probs = self.model(data["images"].to(self.device)).softmax(1)
            data["top"], data["inference_ms"] = probs.topk(self.topk, 1), (time.perf_counter() - t0) * 1e3
        return data

    def postprocess(self, data):
        errors = data["errors"]
        scores, indices = (
            (data["top"].values.tolist(), data["top"].indices.tolist()) if data["top"] is not None else ([], [])
        )
        out, good = [], iter(zip(indices, scores))
        for i in range(len(scores) + len(errors)):
            if i in errors:
                self.context.set_response_status(errors[i].status, str(errors[i]), i)
                body = errors[i].as_response()
            else:
                classes, probs = next(good)
                body = {self.names[c]: p for c, p in zip(classes, probs)}
            self.context.set_response_content_type(i, "application/json")
            out.append(json.dumps(body))
        self._monitor(data, [c[0] for c in indices], [p[0] for p in scores])
        return out

    def _monitor(self, data, top1: list[int], p1: list[float]) -> None:
        outcomes = Counter("too_large" if e.status == 413 else "bad_input" for e in data["errors"].values())
        outcomes["predicted"] = len(top1)
        named = [(self.names[c], p) for c, p in zip(top1, p1)]
        self.stats.record(+outcomes, named, data["preprocess_ms"], data["inference_ms"])
        if self.input_log is not None and top1:
            self.input_log.write(data["sizes"], image_stats(data["images"]).tolist(), top1, p1)
