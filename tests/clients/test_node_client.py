"""The Node.js client's own test suite (`npm test` in clients/node): `tsc --noEmit`
checks its TypeScript declarations, the retry policy meets a grpc-js server that
refuses at first, and the rest starts the three services and uses them through
@grpc/grpc-js with the published protos, proving that a non-Python backend can use
the API as published."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT

NODE_CLIENT = REPO_ROOT / "clients" / "node"


def test_npm_test_passes():
    npm = shutil.which("npm")
    assert npm, "npm is needed for the Node client test (.ci/run installs it)"
    if not all((NODE_CLIENT / "node_modules" / name).is_dir()
               for name in ("@grpc/grpc-js", "typescript")):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, check=True,
                       timeout=600)
    result = subprocess.run([npm, "test"], cwd=NODE_CLIENT, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "ATELIER_PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# pass 8" in result.stdout and "# fail 0" in result.stdout
