"""TorchServe handler for the GTSRB traffic-sign classifier (models/gtsrb.pt)."""

import json
import time
import warnings
from collections import Counter

import torch
from image_input import InputError, decode_image, request_bytes
from presets import EvalPreset
from serving_metrics import HandlerMetrics
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

    def _load_torchscript_model(self, model_pt_path):
        with warnings.catch_warnings():  # torch 2.14 flags TorchScript as deprecated on every load
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            return super()._load_torchscript_model(model_pt_path)

    def preprocess(self, data):
        """Returns (uint8 batch of the good images or None, {request index: InputError})."""
        t0 = time.perf_counter()
        images, errors = [], {}
        self._inference_ms = 0.0
        for i, row in enumerate(data):
            try:
                img = decode_image(request_bytes(row), max_pixels=self.max_pixels, draft_size=2 * self.image_size)
                images.append(self.preset(img))
            except InputError as e:
                errors[i] = e
        self._preprocess_ms = (time.perf_counter() - t0) * 1000
        return (torch.stack(images) if images else None), errors

    def inference(self, data, *args, **kwargs):
        batch, errors = data
        if batch is None:
            return None, errors
        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = self.model(batch.to(self.device)).softmax(1)
        self._inference_ms = (time.perf_counter() - t0) * 1000
        return probs.topk(self.topk, 1), errors

    def postprocess(self, data):
        top, errors = data
        out, j, top1 = [], 0, []
        scores, indices = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        for i in range(len(scores) + len(errors)):
            if i in errors:
                e = errors[i]
                self.context.set_response_status(e.status, str(e), i)
                body = e.as_response()
            else:
                body = {self.names[c]: p for c, p in zip(indices[j], scores[j])}
                top1.append((self.names[indices[j][0]], scores[j][0]))
                j += 1
            self.context.set_response_content_type(i, "application/json")
            out.append(json.dumps(body))
        outcomes = Counter(("too_large" if e.status == 413 else "bad_input") for e in errors.values())
        outcomes["predicted"] += len(top1)
        self.stats.record(+outcomes, top1, self._preprocess_ms, self._inference_ms)
        return out
