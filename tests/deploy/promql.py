"""Every PromQL expression atelier ships (dashboards and alert rules), and the
metric names an expression refers to."""

from __future__ import annotations

import json
import re

from tests.deploy.manifests import K8S, by_kind, render

DASHBOARDS = K8S / "base" / "monitoring" / "dashboards"
#: Grafana's variables, as the test evaluates them: every namespace, a 1m rate window.
GRAFANA_VARIABLES = {"$namespace": ".*", "$__rate_interval": "1m"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}


def rule_groups() -> list[dict]:
    return by_kind(render("cpu-dev"), "PrometheusRule")["atelier"]["spec"]["groups"]


def rule_expressions() -> dict[str, str]:
    return {r.get("alert") or r["record"]: r["expr"] for g in rule_groups() for r in g["rules"]}


def dashboard_expressions() -> dict[str, str]:
    found = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                found[f"{path.stem} / {panel['title']} / {target['refId']}"] = expr
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)                     # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                     # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?(ms|[smhdwy])?\b", " ", text)   # numbers, durations
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group()
        rest = text[match.end():].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names
