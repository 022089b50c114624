"""``atelier-server <service>``: the service table, and the command that starts one.

The kit starts any service (``kit/cli.run_service``) but names none: this table
does, beside the services themselves.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from atelier.kit.cli import run_service

#: Service name -> its app module (``Settings``, ``build_spec``, ``prepare_process``).
SERVICES = {
    "training": "atelier.training.app",
    "generation": "atelier.generation.app",
    "analysis": "atelier.analysis.app",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier-server",
                                     description="Start one atelier service.")
    parser.add_argument("service", choices=sorted(SERVICES), help="which service to run")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML settings file (env ATELIER_CONFIG_FILE)")
    args = parser.parse_args(argv)
    return run_service(args.service, importlib.import_module(SERVICES[args.service]),
                       args.config)


if __name__ == "__main__":
    sys.exit(main())
