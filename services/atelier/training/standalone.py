"""``atelier-train run SPEC``: run a training job without the gRPC service.

This is what a Kubernetes batch Job or a KubeRay RayJob executes. The spec is
YAML or JSON whose fields are TrainingJobSpec's (as in the API). The job is
validated and stored exactly as CreateTrainingJob would, then run in the
foreground against the same object store (Ray from ``RAY_ADDRESS`` or
``training.ray_address``, else a local Ray), so the service and the CLI can
watch it. Running it again with the same ``--job-id`` resumes an unfinished
job from its latest checkpoint. Exit code 0 when the job SUCCEEDED, 1 when it
failed or was cancelled, 2 for a bad spec or settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from google.protobuf import json_format

from atelier.kit.errors import AtelierError
from atelier.kit.settings import ConfigError, load_settings
from atelier.kit.structured_logging import configure_logging
from atelier.kubernetes_jobs import inline_image_files
from atelier.storage import open_store
from atelier.training.config import Settings
from atelier.training.jobs import JobStore, job_key
from atelier.training.runner import RunResult, describe_base_of_spec, run_job
from atelier.training.submission import submit_job
from atelier.v1 import training_pb2


def load_spec(path: Path) -> training_pb2.TrainingJobSpec:
    """Parse a YAML or JSON spec; instance image paths may be given as ``file:`` entries."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("the spec must be a mapping of TrainingJobSpec fields")
    return json_format.ParseDict(inline_image_files(data, path.parent),
                                 training_pb2.TrainingJobSpec())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate, store and run a job spec in the foreground")
    run.add_argument("spec", type=Path, help="YAML or JSON TrainingJobSpec")
    run.add_argument("--job-id", default="", help="job id (resumes it if it exists)")
    run.add_argument("--config", type=Path, default=None,
                     help="settings YAML (as the service's; env ATELIER_CONFIG_FILE)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(Settings, args.config)
    except ConfigError as exc:
        print(f"atelier-train: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging, "training-run")
    store = open_store(settings.storage)
    jobs = JobStore(store)
    if args.job_id and store.exists(job_key(args.job_id, "job.json")):
        job_id = args.job_id
    else:
        try:
            spec = load_spec(args.spec)
            job, _ = submit_job(jobs, settings.training, "", args.job_id, spec,
                                base=describe_base_of_spec(spec, settings.training, store,
                                                           settings.models.cache_dir))
        except (ValueError, json_format.ParseError) as exc:
            print(f"atelier-train: bad spec: {exc}", file=sys.stderr)
            return 2
        except AtelierError as exc:
            print(f"atelier-train: {exc.message}", file=sys.stderr)
            return 2
        job_id = JobStore.id_of(job)
    print(json.dumps({"job": f"trainingJobs/{job_id}", "store": store.describe()}), flush=True)
    state = run_job(store, settings.storage, settings.training, settings.models.cache_dir, job_id)
    final = jobs.load(job_id)
    print(json.dumps({"job": final.name, "state": state, "model": final.model,
                      "failure_reason": final.failure_reason}), flush=True)
    return 0 if state is RunResult.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
