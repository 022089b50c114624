"""A stand-in Kubernetes API server on loopback for `atelier kube`, with a
stand-in kubelet: no cluster can run here, so this serves the few REST calls the
official client makes (ConfigMaps, batch Jobs, RayJobs and their status) and
*runs* each created workload's command locally, with the spec ConfigMap as its
mounted volume, reporting the outcome the way the Job and KubeRay controllers do."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/"
                   r"(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$")


class FakeKubernetes:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env  # the environment the "pods" run with (store settings...)
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.logs: dict[str, str] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.workers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def stop(self) -> None:
        for worker in self.workers:
            worker.join(600)
        self.server.shutdown()

    # -- the "kubelet" -------------------------------------------------------------------
    def _run(self, plural: str, namespace: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        if plural == "jobs":
            pod = obj["spec"]["template"]["spec"]
            command = pod["containers"][0]["args"]
            self._set_status(plural, namespace, name, {"active": 1})
        else:
            pod = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            command = shlex.split(obj["spec"]["entrypoint"])
            self._set_status(plural, namespace, name, {"jobDeploymentStatus": "Running",
                                                       "jobStatus": "RUNNING"})
        with tempfile.TemporaryDirectory() as volume_root:
            # Mount the ConfigMap volumes: write their data where the pod expects it.
            mounts = {}
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    data = self.objects[("configmaps", namespace,
                                         volume["configMap"]["name"])]["data"]
                    folder = Path(volume_root) / volume["name"]
                    folder.mkdir()
                    for key, text in data.items():
                        (folder / key).write_text(text)
                    mounts[volume["name"]] = folder
            for mount in pod["containers"][0].get("volumeMounts", []):
                if mount["name"] in mounts:
                    command = [part.replace(mount["mountPath"], str(mounts[mount["name"]]))
                               for part in command]
            result = subprocess.run(command, env=self.env, capture_output=True, text=True,
                                    timeout=900)
        self.logs[name] = result.stdout + result.stderr
        ok = result.returncode == 0
        if plural == "jobs":
            status = {"succeeded": 1} if ok else {"failed": 1}
            status["conditions"] = [{"type": "Complete" if ok else "Failed", "status": "True",
                                     "reason": "" if ok else "BackoffLimitExceeded",
                                     "message": "" if ok else f"exit code {result.returncode}"}]
        else:
            status = {"jobDeploymentStatus": "Complete" if ok else "Failed",
                      "jobStatus": "SUCCEEDED" if ok else "FAILED"}
        self._set_status(plural, namespace, name, status)

    def _set_status(self, plural, namespace, name, status) -> None:
        with self.lock:
            self.objects[(plural, namespace, name)]["status"] = status

    # -- the REST API --------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                match = _PATH.match(self.path.split("?", 1)[0])
                if not match:
                    self._reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    return None
                return match

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_POST(self):
                match = self._route()
                if not match:
                    return
                obj = self._body()
                key = (match["plural"], match["ns"], obj["metadata"]["name"])
                with fake.lock:
                    if key in fake.objects:
                        self._reply(409, {"kind": "Status", "code": 409,
                                          "reason": "AlreadyExists"})
                        return
                    obj["metadata"]["namespace"] = match["ns"]
                    fake.objects[key] = obj
                self._reply(201, obj)
                if match["plural"] in ("jobs", "rayjobs"):
                    worker = threading.Thread(target=fake._run,
                                              args=(match["plural"], match["ns"], obj))
                    fake.workers.append(worker)
                    worker.start()

            def do_PUT(self):
                match = self._route()
                if not match:
                    return
                obj = self._body()
                with fake.lock:
                    fake.objects[(match["plural"], match["ns"], match["name"])] = obj
                self._reply(200, obj)

            def do_GET(self):
                match = self._route()
                if not match:
                    return
                with fake.lock:
                    obj = fake.objects.get((match["plural"], match["ns"], match["name"]))
                    obj = json.loads(json.dumps(obj)) if obj else None
                if obj is None:
                    self._reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                else:
                    self._reply(200, obj)

        return Handler


def pod_environment(store: Path, model_cache: Path) -> dict[str, str]:
    """What the pods' envFrom/env give them, pointed at a local store."""
    import sys

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "ATELIER_STORAGE__LOCAL_ROOT": str(store),
            "ATELIER_MODELS__CACHE_DIR": str(model_cache),
            "ATELIER_LOGGING__FORMAT": "text", "ATELIER_LOGGING__LEVEL": "WARNING"}
