"""``python -m tests.training.service_with_faults '<json>'``: the training service with
faults injected through its test seam (``atelier.training.faults.Faults``)."""

import json
import sys

from atelier.kit.cli import run_service
from atelier.training import app
from atelier.training.faults import Faults

if __name__ == "__main__":
    sys.exit(run_service("training", app, faults=Faults(**json.loads(sys.argv[1]))))
