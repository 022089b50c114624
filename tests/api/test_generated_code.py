"""The API contract: generated stubs match the protos; buf lint is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT

GEN = REPO_ROOT / "clients" / "python" / "gen" / "atelier" / "v1"


def test_generated_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "protos" / "generate_python.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "atelier" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GEN.iterdir() if p.is_file()}
    assert fresh.keys() == committed.keys(), "run `make protos` and commit the result"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code differs from the protos (run `make protos`): {stale}"


def test_buf_lint_is_clean():
    buf = shutil.which("buf", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("buf")
    assert buf, "buf is installed by the dev extra (buf-bin)"
    result = subprocess.run([buf, "lint"], cwd=REPO_ROOT / "protos", capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_has_health_reflection_free_names():
    from atelier.v1 import analysis_pb2, generation_pb2, training_pb2

    names = {
        s.full_name
        for module in (analysis_pb2, generation_pb2, training_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert names == {"atelier.v1.AnalysisService", "atelier.v1.GenerationService",
                     "atelier.v1.TrainingService"}
