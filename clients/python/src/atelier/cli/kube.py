"""``atelier kube``: run a training job spec on Kubernetes as a RayJob or a batch Job."""

from __future__ import annotations

import argparse
from pathlib import Path

from atelier.cli.output import err, out, print_json


def register(commands) -> None:
    kube = commands.add_parser(
        "kube", help="training jobs as Kubernetes workloads (RayJob or batch Job)",
        description="Submit a TrainingJobSpec YAML to Kubernetes and watch it, without the "
                    "training service (needs `pip install 'atelier[k8s]'` and a kubeconfig or "
                    "in-cluster credentials).")
    sub = kube.add_subparsers(dest="kube_command", required=True, metavar="COMMAND")
    submit = sub.add_parser(
        "submit", help="create the spec ConfigMap and the workload, then watch it",
        description="Create ConfigMap atelier-job-<id> with the spec and a RayJob (or batch "
                    "Job) named atelier-train-<id> running `atelier-train run`, then report "
                    "its status until it ends. Exit 0 if it succeeded, 1 if it failed.")
    submit.add_argument("spec", type=Path, help="TrainingJobSpec as YAML (photos as "
                        "{file: path} entries are inlined)")
    submit.add_argument("--job-id", required=True, help="the job's id (resubmitting the "
                        "same id resumes it)")
    submit.add_argument("--image", required=True, help="atelier container image")
    submit.add_argument("-n", "--namespace", default="atelier", help="namespace (atelier)")
    submit.add_argument("--kind", choices=["rayjob", "job"], default="rayjob",
                        help="rayjob (KubeRay, the default) or job (plain batch/v1 Job)")
    submit.add_argument("--gpus", type=int, default=1, help="GPUs per training pod (1; 0: CPU)")
    submit.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or "
                        "~/.kube/config; in-cluster credentials inside a pod)")
    submit.add_argument("--context", help="kubeconfig context")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the objects as YAML and create nothing")
    submit.add_argument("--detach", action="store_true", help="return once created")
    submit.add_argument("--poll-interval", type=float, default=5.0, help="seconds (5)")
    submit.set_defaults(run=run_submit)


def run_submit(args: argparse.Namespace, connect) -> int:
    try:
        import yaml

        from atelier import kubernetes_jobs
        if not args.dry_run:
            import kubernetes  # noqa: F401
    except ImportError:
        raise ValueError("the kube commands need pyyaml and the kubernetes client: "
                         "pip install 'atelier[k8s]'") from None
    objects = kubernetes_jobs.render_job(args.spec, job_id=args.job_id,
                                         namespace=args.namespace, image=args.image,
                                         kind=args.kind, gpus=args.gpus)
    if args.dry_run:
        out.print(yaml.safe_dump_all(objects, sort_keys=False), markup=False, end="")
        return 0
    api = kubernetes_jobs.api_client(args.kubeconfig, args.context)
    kubernetes_jobs.submit(objects, api)
    workload = objects[-1]
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    if args.json:
        print_json({"created": name, "namespace": args.namespace})
    else:
        err.print(f"created {name} in {args.namespace}", markup=False)
    if args.detach:
        return 0

    def report(status) -> None:
        if args.json:
            print_json({"phase": status.phase, "detail": status.detail})
        else:
            err.print(f"{status.phase:<9} {status.detail}", markup=False)

    final = kubernetes_jobs.watch(workload, api, interval_s=args.poll_interval,
                                  on_status=report)
    if not args.json:
        out.print(f"{name} {final.phase}", markup=False)
    return 0 if final.phase == "SUCCEEDED" else 1
