"""Running the installed `atelier` command line (the services it talks to come from
the `local_services` fixture in tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def atelier_cli(*args: str, server: str | None = None, timeout: float = 600,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `atelier` console script."""
    cli = Path(sys.executable).parent / "atelier"
    command = [str(cli), *(["--server", server] if server else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=env)
