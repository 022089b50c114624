"""``python -m atelier.analysis``: run the analysis service."""

import sys

from atelier.analysis import app
from atelier.kit.cli import run_service

if __name__ == "__main__":
    sys.exit(run_service("analysis", app))
