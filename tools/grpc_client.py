"""TorchServe's own gRPC inference client: Python stubs generated (grpcio-tools) from the .proto files inside
the installed TorchServe frontend jar, so they always match the server that runs."""

import importlib
import sys
import zipfile
from pathlib import Path

import grpc
import ts
from grpc_tools import protoc

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
PROTOS = ("inference.proto", "google/rpc/status.proto")  # and the well-known types grpc_tools ships


def generate(out: Path):
    """Write inference_pb2(_grpc).py and google/rpc/status_pb2.py under ``out``; returns the two modules."""
    src = out / "proto"
    with zipfile.ZipFile(JAR) as jar:
        for name in PROTOS:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(jar.read(name))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{src}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *PROTOS]
    assert protoc.main(args) == 0, "protoc failed"
    sys.path.insert(0, str(out))  # inference_pb2 imports google.rpc.status_pb2: a namespace package beside protobuf's
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


class Client:
    def __init__(self, out: Path, port: int) -> None:
        self.pb2, pb2_grpc = generate(out)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def predict(self, inputs: dict[str, bytes], model: str = "gtsrb"):
        """-> (gRPC status code, prediction bytes or the error's details)."""
        try:
            reply = self.stub.Predictions(self.pb2.PredictionsRequest(model_name=model, input=inputs), timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, reply.prediction

    def close(self) -> None:
        self.channel.close()
