"""The README's commands exist and work, so the docs cannot rot."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def make_targets() -> set[str]:
    makefile = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.MULTILINE))


def test_quickstart_is_make_demo_then_make_test():
    quickstart = README.split("\n## ", 1)[0]
    assert quickstart.index("make demo") < quickstart.index("make test")


def test_every_make_command_in_readme_exists():
    named = set(re.findall(r"\bmake ([a-z][a-z0-9-]*[a-z0-9])", README))
    assert {"demo", "test"} <= named
    missing = named - make_targets()
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


def test_every_env_var_in_readme_is_a_real_setting():
    from atelier.analysis.app import Settings as A
    from atelier.cli.main import ENVIRONMENT
    from atelier.gateway.config import GatewaySettings as W
    from atelier.generation.app import Settings as G
    from atelier.training.app import Settings as T

    known = {"ATELIER_CONFIG_FILE", "ATELIER_TEST_S3_ENDPOINT", "ATELIER_TEST_S3_ACCESS_KEY",
             "ATELIER_TEST_S3_SECRET_KEY", *ENVIRONMENT}

    def add(prefix: str, model) -> None:  # nested sections too (analysis.vllm.*)
        for name, info in getattr(model, "model_fields", {}).items():
            known.add(f"{prefix}{name.upper()}")
            add(f"{prefix}{name.upper()}__", info.annotation)

    for cls in (A, G, T, W):
        add("ATELIER_", cls)
    named = set(re.findall(r"\bATELIER_[A-Z0-9_]+", README))
    assert named, "the README documents configuration"
    unknown = named - known
    assert not unknown, f"README names settings that do not exist: {unknown}"


def test_make_demo_runs():
    """The README's main command, with fewer steps (the scenario is the same), on free
    ports: a test beside it may hold a default port as a client's ephemeral port."""
    import json
    import shutil

    from jsonschema import Draft202012Validator

    from atelier.dev.demo_assets import DOCUMENT_SCHEMA

    out = REPO_ROOT / "out" / "demo"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(["make", "demo", "DEMO_ARGS=--train-steps 6 --steps 6 --free-ports"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("training", "generation", "analysis"):
        assert f"{name} is SERVING" in result.stdout
    assert "trained     models/demo-sks-toy" in result.stdout
    assert "stopped cleanly" in result.stdout
    for name in ("subject-pose0.png", "generated-moon.png", "generated-beach.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    Draft202012Validator(DOCUMENT_SCHEMA).validate(
        json.loads((out / "analysis-document.json").read_text()))
    json.loads((out / "analysis-chart.json").read_text())
    assert (out / "analysis-vqa.txt").exists()


def cli_examples() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.DOTALL)
    lines = [line.split(" # ")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("atelier ")]


def test_cli_examples_in_readme_parse():
    """Each `atelier ...` line of the README is a valid command line as written."""
    from atelier.cli.main import build_parser

    examples = cli_examples()
    commands = {tuple(a for a in args[:3] if not a.startswith("-"))[:2] for args in examples}
    assert len(examples) >= 10 and len(commands) >= 8, examples
    for args in examples:
        build_parser().parse_args(args)  # exits 2 on an unknown command or flag


def test_every_cli_command_has_help():
    from pathlib import Path

    cli = Path(sys.executable).parent / "atelier"  # the installed console script
    for command in ([], ["train"], ["train", "submit"], ["train", "watch"], ["train", "get"],
                    ["train", "list"], ["train", "cancel"], ["models", "list"],
                    ["models", "get"], ["generate"], ["analyze"]):
        result = subprocess.run([str(cli), *command, "--help"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and "usage: atelier" in result.stdout, command
