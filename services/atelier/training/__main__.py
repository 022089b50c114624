"""``python -m atelier.training``: run the training service."""

import sys

from atelier.kit.cli import run_service
from atelier.training import app

if __name__ == "__main__":
    sys.exit(run_service("training", app))
