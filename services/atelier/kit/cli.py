"""``atelier-server <service>``: start one service the same way as any other.

Settings come from ``--config`` (YAML) and ``ATELIER_*`` environment variables;
an invalid setting stops the process at once with exit code 2 and a message
naming it. SIGTERM drains in-flight RPCs, then exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from atelier.kit.server import ServiceServer, run_process
from atelier.kit.settings import ConfigError, load_settings
from atelier.kit.structured_logging import configure_logging

#: Service name -> module exposing ``Settings`` and ``build_spec(settings, metrics)``.
SERVICES = {
    "training": "atelier.training.app",
    "generation": "atelier.generation.app",
    "analysis": "atelier.analysis.app",
}


def run_service(name: str, config_file: Path | None = None, **build_options) -> int:
    """Load settings, build the service and serve until SIGTERM. Returns the exit code.
    ``build_options`` go to the service's ``build_spec`` (its test seams)."""
    module = importlib.import_module(SERVICES[name])
    try:
        settings = load_settings(module.Settings, config_file)
    except ConfigError as exc:
        print(f"atelier {name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging, name)
    # Process-level set-up that must run before the server starts its threads.
    prepare = getattr(module, "prepare_process", None)
    if prepare is not None:
        prepare(settings)

    async def serve() -> int:
        from atelier.kit.metrics import ServerMetrics

        metrics = ServerMetrics()
        spec = module.build_spec(settings, metrics, **build_options)
        return await ServiceServer(settings, spec, metrics).run_until_signal()

    return run_process(serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier-server", description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=sorted(SERVICES), help="which service to run")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML settings file (env ATELIER_CONFIG_FILE)")
    args = parser.parse_args(argv)
    return run_service(args.service, args.config)


if __name__ == "__main__":
    sys.exit(main())
