"""``atelier-tiny-models``: build the tiny random models, offline and deterministically."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atelier.tiny_models.cache import ensure_tiny_model, tiny_model_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier-tiny-models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build models into the cache (or --out)")
    build.add_argument("names", nargs="*", choices=[[], *tiny_model_names()],
                       help="models to build (default: all)", default=[])
    build.add_argument("--cache-dir", type=Path, default=Path(".cache/atelier/models"),
                       help="model cache (default: .cache/atelier/models)")
    build.add_argument("--out", type=Path, default=None,
                       help="write one model here instead of the cache")
    build.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(argv)

    names = args.names or tiny_model_names()
    if args.out is not None:
        if len(names) != 1:
            parser.error("--out needs exactly one model name")
        from atelier.tiny_models.cache import _builders

        path = _builders()[names[0]](args.out, args.seed)
        print(f"{names[0]}: {path}")
        return 0
    for name in names:
        print(f"{name}: {ensure_tiny_model(name, args.cache_dir, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
