"""The API contract: CI runs ``buf breaking`` (FILE rules) against the protos of the last
landed commit. Here buf catches breaks planted in a copy of protos/, and passes
additions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BUF = str(Path(sys.executable).with_name("buf"))
TRAINING = "atelier/v1/training.proto"


@pytest.fixture
def landed(tmp_path) -> Path:
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "landed",
                    ignore=shutil.ignore_patterns("*.py"))
    return tmp_path / "landed"


def breaking(tmp_path, landed: Path, edit) -> subprocess.CompletedProcess:
    changed = tmp_path / "changed"
    shutil.copytree(landed, changed)
    path = changed / TRAINING
    path.write_text(edit(path.read_text()))
    return subprocess.run([BUF, "breaking", str(changed), "--against", str(landed)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("int32 exported_step = 15;", "int64 exported_step = 15;"),
     'changed type from "int32" to "int64"'),
    (lambda t: t.replace("string failure_reason = 4;", "string failure_reason = 40;"),
     'Previously present field "4" with name "failure_reason"'),
    (lambda t: t.replace("rpc CancelTrainingJob(", "rpc StopTrainingJob("),
     'Previously present RPC "CancelTrainingJob"'),
    (lambda t: t.replace("  TRAINING_JOB_STATE_CANCELLING = 8;\n", ""),
     'Previously present enum value "8"'),
])
def test_buf_catches_a_planted_break(tmp_path, landed, edit, message):
    result = breaking(tmp_path, landed, edit)
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_additions_are_not_breaking(tmp_path, landed):
    result = breaking(tmp_path, landed, lambda t: t.replace(
        "  int32 exported_step = 15;\n",
        "  int32 exported_step = 15;\n  // A new field.\n  string note = 99;\n"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_checks_against_a_landed_commit():
    assert "make breaking" in (REPO_ROOT / ".ci" / "run").read_text()
    baseline = (REPO_ROOT / ".ci" / "api-baseline").read_text().strip()
    assert len(baseline) == 40
    if (REPO_ROOT / ".git").exists():
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", baseline, "HEAD"],
                                  cwd=REPO_ROOT, capture_output=True)
        assert ancestor.returncode == 0, f"{baseline} is not in this branch's history"
