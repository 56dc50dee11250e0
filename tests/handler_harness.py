"""The handler without Java: a real ts.context.Context around the shipped model, a batch driver, and the
frontend's reading of the worker's answer (what the Java side decodes, byte for byte)."""

import json
import shutil
import struct
from pathlib import Path

import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import create_predict_response

from tests.conftest import MODEL, ROOT

MODEL_VERSION = "test-version-7"
CONFIG = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
MAX_RESPONSE_SIZE = 1048576  # config.properties max_response_size: the frontend refuses longer fields


def metrics_cache() -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = "gtsrb"  # as TorchServe's model loader sets it
    return cache


def make_handler(model_dir: Path):
    """An initialised GTSRBHandler, as a TorchServe worker loads it from the archive (LOG_LOCATION is the
    caller's business)."""
    from gtsrb_handler import GTSRBHandler

    shutil.copy(MODEL, model_dir / "gtsrb.pt")
    shutil.copy(ROOT / "handler" / "index_to_name.json", model_dir)
    manifest = {"model": {"serializedFile": "gtsrb.pt", "modelVersion": MODEL_VERSION}}
    ctx = Context("gtsrb", str(model_dir), manifest, 8, None, "0.12.0", metrics=metrics_cache(),
                  model_yaml_config=CONFIG)  # fmt: skip
    h = GTSRBHandler()
    h.initialize(ctx)
    return h


def batch_context(n: int, explain=()) -> Context:
    """The context of one batch of n requests; the indices in ``explain`` came in on /explanations
    (TorchServe's frontend marks them with the request header explain: True)."""
    ctx = Context("gtsrb", "", {}, n, None, "0.12.0", metrics=metrics_cache())
    ctx.request_processor = [RequestProcessor({"explain": "True"} if i in explain else {}) for i in range(n)]
    ctx.request_ids = {i: f"request-{i}" for i in range(n)}
    ctx.metrics.set_request_ids(ctx.request_ids)
    return ctx


def frontend_reads(frame: bytes) -> list[dict]:
    """Decode a worker's answer the way TorchServe's Java ModelResponseDecoder does: every length is a
    byte count, none may exceed max_response_size, and the frame must end exactly at the end-of-list."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        assert 0 <= n <= MAX_RESPONSE_SIZE and pos + n <= len(frame), "frame out of step: the worker would be killed"
        pos += n
        return frame[pos - n : pos]

    def integer() -> int:
        return struct.unpack("!i", take(4))[0]

    def text() -> str:
        return take(integer()).decode("utf-8")

    code, _message = integer(), text()
    assert code == 200, "the whole batch failed"
    answers = []
    while (length := integer()) != -1:
        take(length)  # request id
        content_type = text()
        status, phrase = integer(), text()
        headers = {text(): text() for _ in range(integer())}
        answers.append({"status": status, "phrase": phrase, "content_type": content_type, "headers": headers,
                        "body": take(integer())})  # fmt: skip
    assert pos == len(frame), "trailing bytes: the frontend would read them as the next message"
    return answers


def run(handler, rows: list, explain=()) -> list[tuple[int, object]]:
    """handle() one batch, the worker's answer decoded as the frontend reads it; [(status, JSON body)] per
    request. Checks what every answer must satisfy: one per request, a fixed ASCII reason phrase."""
    ctx = batch_context(len(rows), explain)
    out = handler.handle(rows, ctx)
    handler.monitor.flush()  # metrics and input log: written by a background thread, here at once
    assert len(out) == len(rows)
    answers = frontend_reads(bytes(create_predict_response(out, ctx.request_ids, "Prediction success", 200, ctx)))
    results = []
    for a in answers:
        assert a["content_type"] == "application/json"
        assert a["phrase"] == "" or (a["phrase"].isascii() and a["phrase"].isprintable() and len(a["phrase"]) < 40)
        body = json.loads(a["body"])
        if a["status"] != 200:
            assert a["phrase"] in ("Bad Request", "Request Entity Too Large"), a["phrase"]
            assert body["code"] == a["status"] and body["type"] and body["message"], body
            assert len(a["body"]) < 2048, "an error body echoes what the client sent"
        results.append((a["status"], body))
    return results
