"""``python -m atelier.generation``: run the generation service."""

import sys

from atelier.generation import app
from atelier.kit.cli import run_service

if __name__ == "__main__":
    sys.exit(run_service("generation", app))
