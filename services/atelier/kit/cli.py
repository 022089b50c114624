"""Starting a service process, the same way for every service.

Settings come from ``--config`` (YAML) and ``ATELIER_*`` environment variables;
an invalid setting stops the process at once with exit code 2 and a message
naming it. SIGTERM drains in-flight RPCs, then exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from atelier.kit.server import ServiceServer, run_process
from atelier.kit.settings import ConfigError, load_settings
from atelier.kit.structured_logging import configure_logging


def run_service(name: str, module: ModuleType, config_file: Path | None = None,
                **build_options) -> int:
    """Load settings, build the service and serve until SIGTERM. Returns the exit code.

    ``module`` is the service's app module: its ``Settings``, its
    ``build_spec(settings, metrics)`` and optionally ``prepare_process(settings)``.
    ``build_options`` go to ``build_spec`` (its test seams)."""
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
