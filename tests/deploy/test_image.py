"""The container image's Dockerfile installs what the manifests run: the commands
the Deployments, RayJob and batch Job call are console scripts of the package, and
the image runs as the non-root user the manifests require."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO_ROOT
from tests.deploy.manifests import K8S, by_kind, render

DOCKERFILE = (REPO_ROOT / "deploy" / "images" / "Dockerfile").read_text()


def test_manifest_commands_are_console_scripts():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for deployment in by_kind(render("gpu"), "Deployment").values():
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] in scripts
    for template in ("rayjob.yaml", "batch-job.yaml"):
        assert "atelier-train run /etc/atelier/job/spec.yaml" in re.sub(
            r'",\s*"', " ", (K8S / "templates" / template).read_text())
    assert "atelier-train" in scripts and "atelier-server" in scripts


def test_image_runs_as_the_manifests_user_with_the_pinned_torch():
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.MULTILINE)
    assert user and user.group(1) != "0"
    for deployment in by_kind(render("cpu-dev"), "Deployment").values():
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
            user.group(1))
    assert '"torch==2.14.1"' in DOCKERFILE and ".[server,gateway,tracking,k8s]" in DOCKERFILE
    assert "COPY deploy/k8s/templates" in DOCKERFILE  # packaged for `atelier kube`
