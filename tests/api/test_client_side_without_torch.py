"""The client side (stubs, client library, CLI) installs and imports without torch or
the server extras."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import REPO_ROOT

SERVER_ONLY = ("torch", "torchvision", "diffusers", "transformers", "ray", "minio", "peft",
               "numpy", "pydantic", "pydantic_settings", "yaml", "kubernetes")


def test_base_dependencies_exclude_server_packages():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not any(name in base for name in SERVER_ONLY)
    assert "server" in project["optional-dependencies"]


def test_stubs_client_library_and_cli_import_with_server_packages_blocked():
    blocked = ", ".join(repr(n) for n in SERVER_ONLY)
    code = f"""
import sys
for name in ({blocked},):
    sys.modules[name] = None  # any import of these now fails
import grpc
from atelier.v1 import (analysis_pb2, analysis_pb2_grpc, generation_pb2, generation_pb2_grpc,
                        training_pb2, training_pb2_grpc)
channel = grpc.insecure_channel("127.0.0.1:1")
generation_pb2_grpc.GenerationServiceStub(channel)
training_pb2_grpc.TrainingServiceStub(channel)
analysis_pb2_grpc.AnalysisServiceStub(channel)
from atelier.client import AnalysisClient, GenerationClient, TrainingClient, dreambooth_spec
from atelier.cli.main import build_parser
for client in (AnalysisClient, GenerationClient, TrainingClient):
    client("127.0.0.1:1").close()
build_parser().parse_args(["generate", "a red fox", "-n", "2"])
from atelier.cli.main import main
# The kube commands need the k8s extra: a clear usage error, not a traceback.
assert main(["kube", "submit", "job.yaml", "--job-id", "a", "--image", "i"]) == 2
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "pip install 'atelier[k8s]'" in " ".join(result.stderr.split())
