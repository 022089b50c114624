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

from google.protobuf import json_format

from atelier.kit.errors import AtelierError
from atelier.kit.settings import ConfigError, load_settings
from atelier.kit.structured_logging import configure_logging
from atelier.kubernetes_jobs import load_spec
from atelier.storage import ObjectStore, open_store
from atelier.training.bases import describe_base_of_spec
from atelier.training.config import Settings
from atelier.training.jobs import JobStore, job_key
from atelier.training.runner import RunResult, run_job
from atelier.training.submission import submit_job


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
            job_id = submit_spec_file(settings, store, args.spec, args.job_id)
        except (ValueError, json_format.ParseError) as exc:
            print(f"atelier-train: bad spec: {exc}", file=sys.stderr)
            return 2
        except AtelierError as exc:
            print(f"atelier-train: {exc.message}", file=sys.stderr)
            return 2
    print(json.dumps({"job": f"trainingJobs/{job_id}", "store": store.describe()}), flush=True)
    state = run_job(store, settings.storage, settings.training, settings.models.cache_dir, job_id)
    final = jobs.load(job_id)
    print(json.dumps({"job": final.name, "state": state, "model": final.model,
                      "failure_reason": final.failure_reason}), flush=True)
    return 0 if state is RunResult.SUCCEEDED else 1



def submit_spec_file(settings: Settings, store: ObjectStore, path: Path, job_id: str = "") -> str:
    """Validate and store the job a spec file describes, as the service would; its id."""
    spec = load_spec(path)
    job, _ = submit_job(JobStore(store), settings.training, "", job_id, spec,
                        base=describe_base_of_spec(spec, settings.training, store,
                                                   settings.models.cache_dir))
    return JobStore.id_of(job)

if __name__ == "__main__":
    sys.exit(main())
