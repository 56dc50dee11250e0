"""TorchServe handler for the GTSRB traffic-sign classifier (models/gtsrb.pt)."""

import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from image_input import as_input_error, decode_image, request_bytes
from presets import EvalPreset, to_network_layout
from saliency import integrated_gradients, saliency_map
from serving_metrics import Batch, HandlerMetrics, InputLog, Monitor, input_log_path
from ts.torch_handler.base_handler import BaseHandler


class GTSRBHandler(BaseHandler):
    """Image bytes -> top-k {class name: probability}, highest first (the stock image-classifier shape);
    on /explanations, {class, probability, saliency} with a 32x32 integrated-gradients map of the top-1 class.

    BaseHandler loads the TorchScript model, ``index_to_name.json`` and ``model-config.yaml``; this
    class adds per-request answers: in a batch, a request that cannot be read gets its own 4xx JSON
    error and the others still get theirs (stock handlers fail the whole batch with a 503), and each
    request is a prediction or an explanation by its own header (BaseHandler looks at request 0 only).
    Preprocessing is ``presets.EvalPreset``, the training pipeline's own; normalisation and resizing
    to the network's resolution are inside the exported model.
    """

    def initialize(self, context):
        cfg = context.model_yaml_config.get("handler", {})
        torch.set_num_threads(int(cfg["torch_threads"]))
        # TorchServe's worker would json.loads every application/json body before the handler sees it
        # (16 MiB of "[[],[]..." is 400 MB of Python objects); image_input parses them with a bound.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        super().initialize(context)
        self.topk = int(cfg["topk"])
        self.max_pixels, self.max_bytes = int(cfg["max_pixels"]), int(cfg["max_bytes"])
        self.explain_steps = int(cfg["explain_steps"])
        self.image_size = int(self.model.image_size)
        self.preset = EvalPreset(size=self.image_size)
        self.names = [self.mapping[str(i)] for i in range(len(self.mapping))]
        self.model_version = str((context.manifest or {}).get("model", {}).get("modelVersion", "unknown"))
        input_log = None
        if cfg.get("input_log_mb", 0) > 0:  # per-request input statistics for `make drift-report`
            path = input_log_path(Path(os.environ.get("LOG_LOCATION", "logs")))  # one file per worker
            input_log = InputLog(path, int(cfg["input_log_mb"] * 2**20), backups=3, model_version=self.model_version)
        metrics = HandlerMetrics(context.metrics, context.model_name, float(cfg["low_confidence"]))
        self.monitor = Monitor(metrics, input_log, float(cfg["monitor_interval_s"]))
        # While the monitor thread runs Python, the request thread waits for the GIL each time it takes it back
        # (after every decode, forward, socket read): up to the switch interval, 5 ms by default, several times
        # per batch during a flush. A shorter interval bounds each wait (BENCHMARKS.md, "Latency": c=32 p99).
        sys.setswitchinterval(float(cfg["gil_switch_interval_ms"]) / 1e3)

    def _load_torchscript_model(self, model_pt_path):
        with warnings.catch_warnings():  # torch 2.14 flags TorchScript as deprecated on every load
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            return super()._load_torchscript_model(model_pt_path)

    def _is_explain(self):
        return False  # decided per request in preprocess

    def preprocess(self, data):
        """Decode each request; one that cannot be read becomes an InputError for its index, the rest a
        uint8 batch, each marked as a prediction or an explanation."""
        t0 = time.perf_counter()
        images, sizes, explain, errors = [], [], [], {}
        for i, row in enumerate(data):
            try:
                wants_explanation = self.context.get_request_header(i, "explain") == "True"  # set by /explanations
                img = decode_image(request_bytes(row), max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                   draft_size=2 * self.image_size)  # fmt: skip
                images.append(self.preset(img))
                sizes.append(img.size)
                explain.append(wants_explanation)
            except Exception as e:
                errors[i] = as_input_error(e)
        batch = torch.stack(images) if images else None
        return {"images": batch, "sizes": sizes, "explain": explain, "errors": errors,
                "preprocess_ms": (time.perf_counter() - t0) * 1e3}  # fmt: skip

    def inference(self, data, *args, **kwargs):
        data["top"], data["saliency"], data["inference_ms"] = None, {}, 0.0
        if data["images"] is not None:
            t0 = time.perf_counter()
            x = to_network_layout(data["images"].to(self.device))
            with torch.inference_mode():
                data["top"] = self.model(x).softmax(1).topk(self.topk, 1)
            wanted = [k for k, e in enumerate(data["explain"]) if e]
            if wanted:
                targets = data["top"].indices[wanted, 0].tolist()
                black = torch.zeros(3, 1, 1, device=self.device)
                attr = integrated_gradients(self.model, x[wanted], targets, baseline=black, steps=self.explain_steps)
                data["saliency"] = dict(zip(wanted, saliency_map(attr).double().cpu().numpy().round(4).tolist()))
            data["inference_ms"] = (time.perf_counter() - t0) * 1e3
        return data

    def postprocess(self, data):
        errors = data["errors"]
        scores, indices = (
            (data["top"].values.tolist(), data["top"].indices.tolist()) if data["top"] is not None else ([], [])
        )
        out, k = [], 0  # k: index among the decoded images
        for i in range(len(scores) + len(errors)):
            if i in errors:
                self.context.set_response_status(errors[i].status, errors[i].phrase, i)
                body = errors[i].as_response()
            elif k in data["saliency"]:
                c, p = indices[k][0], scores[k][0]
                body, k = {"class": self.names[c], "probability": p, "saliency": data["saliency"][k]}, k + 1
            else:
                body, k = {self.names[c]: p for c, p in zip(indices[k], scores[k])}, k + 1
            self.context.set_response_content_type(i, "application/json")
            out.append(json.dumps(body))
        self._monitor(data, [c[0] for c in indices], [p[0] for p in scores])
        return out

    def _monitor(self, data, top1: list[int], p1: list[float]) -> None:
        outcomes = Counter("too_large" if e.status == 413 else "bad_input" for e in data["errors"].values())
        outcomes["predicted"] = len(top1)
        named = [(c, self.names[c], p) for c, p in zip(top1, p1)]
        self.monitor.submit(
            Batch(
                time.time(),
                +outcomes,
                named,
                data["preprocess_ms"],
                data["inference_ms"],
                data["images"],
                data["sizes"],
            )
        )
