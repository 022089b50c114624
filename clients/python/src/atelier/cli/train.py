"""``atelier train``: submit, watch, get, list, cancel and delete DreamBooth jobs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from atelier.cli.output import as_dict, err, out, print_json, print_table, progress_bar
from atelier.client.enums import short_name, short_names
from atelier.client.media import images_in
from atelier.client.sweep import SCORES, Sweep, load_spec, parse_grid
from atelier.client.training import TrainingClient, dreambooth_spec, job_name
from atelier.v1 import training_pb2 as T

_STATE = "TRAINING_JOB_STATE_"


def register(commands) -> None:
    train = commands.add_parser("train", help="DreamBooth training jobs",
                                description="Submit and follow DreamBooth training jobs.")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="COMMAND")

    submit = sub.add_parser(
        "submit", help="submit a job from a folder of 3-5 photos, then watch it",
        description="Submit a DreamBooth job for the photos in IMAGES_DIR, then show its "
                    "progress (step/max, loss, ETA) until it ends. Exit code 0 only if it "
                    "SUCCEEDED; --detach returns after the submission.")
    submit.add_argument("images_dir", type=Path, help="folder with the subject's photos "
                        "(.png/.jpg/.jpeg/.webp)")
    submit.add_argument("--token", dest="identifier_token", required=True, metavar="WORD",
                        help="the rare identifier the subject is bound to, e.g. sks")
    submit.add_argument("--class", dest="class_noun", required=True, metavar="NOUN",
                        help="the subject's class, e.g. dog (prompts: 'a photo of sks dog')")
    submit.add_argument("--base-model", default="", help="base model (server default if unset)")
    submit.add_argument("--steps", type=int, default=0, help="max train steps (server default)")
    submit.add_argument("--method", choices=short_names(T.FineTuneMethod, "FINE_TUNE_METHOD_"),
                        help="full fine-tune or LoRA (server default)")
    submit.add_argument("--no-prior-preservation", action="store_true",
                        help="turn class-prior preservation off")
    submit.add_argument("--num-class-images", type=int, default=0,
                        help="class prior images (server default)")
    submit.add_argument("--train-text-encoder", action="store_true",
                        help="train the text encoder too")
    submit.add_argument("--resolution", type=int, default=0, help="square training size, px")
    submit.add_argument("--learning-rate", type=float, help="UNet learning rate")
    submit.add_argument("--seed", type=int, help="seed for an exactly repeatable run")
    submit.add_argument("--workers", type=int, default=0, help="Ray Train workers")
    submit.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per worker")
    submit.add_argument("--model-id", default="", help="id of the model it exports "
                        "(models/<id>; the job id by default)")
    submit.add_argument("--job-id", default="", help="id of the job (server picks one)")
    submit.add_argument("--request-id", help="idempotency key: resubmitting with the same "
                        "key returns the first job")
    submit.add_argument("--detach", action="store_true", help="return once submitted")
    submit.set_defaults(run=run_submit)

    watch = sub.add_parser("watch", help="follow a job until it ends",
                           description="Show a job's progress until it ends. Exit code 0 "
                                       "only if it SUCCEEDED.")
    watch.add_argument("job", help="trainingJobs/<id> or <id>")
    watch.set_defaults(run=run_watch)

    get = sub.add_parser("get", help="show one job", description="Show one job.")
    get.add_argument("job", help="trainingJobs/<id> or <id>")
    get.set_defaults(run=run_get)

    ls = sub.add_parser("list", help="list jobs, newest first",
                        description="List jobs, newest first.")
    ls.add_argument("--state", action="append", default=[],
                    choices=short_names(T.TrainingJobState, _STATE),
                    help="only jobs in this state (repeatable)")
    ls.add_argument("--limit", type=int, default=0, help="at most this many jobs (0: all)")
    ls.set_defaults(run=run_list)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job",
                            description="Cancel a queued or running job; its last "
                                        "checkpoint is kept.")
    cancel.add_argument("job", help="trainingJobs/<id> or <id>")
    cancel.set_defaults(run=run_cancel)
    sweep = sub.add_parser(
        "sweep", help="submit a grid of jobs, wait, and name the best model by its scores",
        description="Submit the product of the --grid values over SPEC as ordinary jobs "
                    "(request ids derived from the spec and the grid: rerunning the same "
                    "command resumes the same sweep), show one progress bar per job until "
                    "all end, then print their subject scores and the best model. Exit "
                    "code 0 when a best model was found.")
    sweep.add_argument("spec", type=Path, help="TrainingJobSpec as YAML or JSON (photos as "
                       "{file: path} entries)")
    sweep.add_argument("--grid", action="append", required=True, metavar="FIELD=V1,V2",
                       help="a spec field path and its values (repeatable), e.g. "
                            "learning_rate=1e-6,2e-6 or lora.rank=4,8")
    sweep.add_argument("--best-by", choices=SCORES, default="dino",
                       help="the score that names the best model (drift: lowest; "
                            "default dino)")
    sweep.add_argument("--detach", action="store_true", help="return once submitted")
    sweep.add_argument("--poll-interval", type=float, default=1.0, help="seconds (1)")
    sweep.set_defaults(run=run_sweep)

    delete = sub.add_parser("delete", help="delete a finished job and all it stored",
                            description="Delete a finished job: its record, photos, "
                                        "checkpoints and events (not its model).")
    delete.add_argument("job", help="trainingJobs/<id> or <id>")
    delete.set_defaults(run=run_delete)


def _printable(job: T.TrainingJob) -> T.TrainingJob:
    """A copy without the photos' bytes, which would flood a terminal."""
    job = T.TrainingJob.FromString(job.SerializeToString())
    for image in job.spec.instance_images:
        if image.HasField("data"):
            image.data = b""
    return job


def describe(job: T.TrainingJob) -> None:
    p = job.progress
    out.print(f"{job.name}  {short_name(T.TrainingJobState, job.state, _STATE).upper()}")
    out.print(f"  subject     {job.spec.instance_prompt!r} "
              f"({len(job.spec.instance_images)} photos)", markup=False)
    out.print(f"  progress    step {p.step}/{p.max_steps}  loss {p.loss:.4f}")
    if job.latest_checkpoint:
        out.print(f"  checkpoint  {job.latest_checkpoint}", markup=False)
    if job.model:
        out.print(f"  model       {job.model}", markup=False)
    if job.failure_reason:
        out.print(f"  reason      {job.failure_reason}", markup=False)
    if job.scores:
        last = job.scores[-1]
        out.print(f"  scores      step {last.step}: dino {last.dino:.4f}  clip-i "
                  f"{last.clip_i:.4f}  clip-t {last.clip_t:.4f}  drift {last.drift:.4f}")


def follow(client: TrainingClient, name: str, as_json: bool) -> T.TrainingJob:
    """Stream a job's events (bar or NDJSON) until it ends; return the final job."""
    if as_json:
        for event in client.watch_job(name):
            print_json(event)
        return client.get_job(name)
    with progress_bar("loss") as bar:
        task = bar.add_task("queued", total=None, loss="-")
        for event in client.watch_job(name):
            kind = event.WhichOneof("event")
            if kind == "snapshot":
                job = event.snapshot
                bar.update(task, description=short_name(T.TrainingJobState, job.state, _STATE),
                           total=job.progress.max_steps or job.spec.max_train_steps or None,
                           completed=job.progress.step)
            elif kind == "state_changed":
                bar.update(task, description=short_name(
                    T.TrainingJobState, event.state_changed.state, _STATE))
            elif kind == "progress":
                bar.update(task, completed=event.progress.step,
                           total=event.progress.max_steps or None,
                           loss=f"{event.progress.loss:.4f}")
            elif kind == "checkpoint_saved":
                bar.console.print(f"  checkpoint at step {event.checkpoint_saved.step}")
            elif kind == "scores":
                sc = event.scores
                bar.console.print(f"  scores at step {sc.step}: dino {sc.dino:.4f}  clip-i "
                                  f"{sc.clip_i:.4f}  clip-t {sc.clip_t:.4f}  drift "
                                  f"{sc.drift:.4f}")
    job = client.get_job(name)
    describe(job)
    return job


def _outcome(job: T.TrainingJob) -> int:
    return 0 if job.state == T.TRAINING_JOB_STATE_SUCCEEDED else 1


def run_submit(args: argparse.Namespace, connect) -> int:
    photos = images_in(args.images_dir)
    if not photos:
        raise ValueError(f"no .png/.jpg/.jpeg/.webp images in {args.images_dir}")
    fields = {"base_model": args.base_model, "max_train_steps": args.steps,
              "resolution": args.resolution, "model_id": args.model_id,
              "learning_rate": args.learning_rate, "seed": args.seed}
    if args.workers or args.gpus_per_worker:
        fields["resources"] = T.TrainingResources(num_workers=args.workers,
                                                  gpus_per_worker=args.gpus_per_worker)
    spec = dreambooth_spec(photos, identifier_token=args.identifier_token,
                           class_noun=args.class_noun,
                           prior_preservation=not args.no_prior_preservation,
                           num_class_images=args.num_class_images, method=args.method,
                           train_text_encoder=args.train_text_encoder, **fields)
    with TrainingClient(connect("training")) as client:
        job = client.create_job(spec, job_id=args.job_id, request_id=args.request_id)
        if args.json:
            print_json(_printable(job))
        else:
            err.print(f"submitted {job.name} ({len(photos)} photos of "
                      f"{spec.instance_prompt!r})", markup=False)
        if args.detach:
            if not args.json:
                out.print(job.name)
            return 0
        return _outcome(follow(client, job.name, args.json))


def run_watch(args: argparse.Namespace, connect) -> int:
    with TrainingClient(connect("training")) as client:
        return _outcome(follow(client, args.job, args.json))


def run_get(args: argparse.Namespace, connect) -> int:
    with TrainingClient(connect("training")) as client:
        job = client.get_job(args.job)
    if args.json:
        print_json(_printable(job))
    else:
        describe(job)
    return 0


def run_list(args: argparse.Namespace, connect) -> int:
    jobs = []
    with TrainingClient(connect("training")) as client:
        for job in client.list_jobs(states=args.state):
            jobs.append(job)
            if args.limit and len(jobs) >= args.limit:
                break
    if args.json:
        print_json({"training_jobs": [as_dict(_printable(j)) for j in jobs]})
        return 0
    table = Table("name", "state", "step", "loss", "model", box=None)
    for job in jobs:
        table.add_row(job.name, short_name(T.TrainingJobState, job.state, _STATE),
                      f"{job.progress.step}/{job.progress.max_steps}",
                      f"{job.progress.loss:.4f}", job.model or "-")
    print_table(table)
    return 0


def run_cancel(args: argparse.Namespace, connect) -> int:
    with TrainingClient(connect("training")) as client:
        job = client.cancel_job(args.job)
    if args.json:
        print_json(_printable(job))
    else:
        out.print(f"{job.name}  {short_name(T.TrainingJobState, job.state, _STATE).upper()}")
    return 0


def run_delete(args: argparse.Namespace, connect) -> int:
    with TrainingClient(connect("training")) as client:
        removed = client.delete_job(args.job)
    if args.json:
        print_json({"job": job_name(args.job), "deleted_objects": removed})
    else:
        out.print(f"deleted {job_name(args.job)} ({removed} objects)", markup=False)
    return 0


def _point(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def run_sweep(args: argparse.Namespace, connect) -> int:
    sweep = Sweep(load_spec(args.spec), parse_grid(args.grid))
    with TrainingClient(connect("training")) as client:
        runs = sweep.submit(client)
        if not args.json:
            err.print(f"sweep {sweep.sweep_id}: {len(runs)} jobs", markup=False)
        if args.detach:
            for run in runs:
                if args.json:
                    print_json({"job": run.job.name, "point": run.point})
                else:
                    out.print(f"{run.job.name}  {_point(run.point)}", markup=False)
            return 0
        if args.json:
            runs = sweep.wait(client, runs, poll_interval_s=args.poll_interval)
        else:
            with progress_bar(eta=False) as bar:
                tasks = [bar.add_task(run.job.name.removeprefix("trainingJobs/"), total=None)
                         for run in runs]

                def update(current) -> None:
                    for task, run in zip(tasks, current, strict=True):
                        p = run.job.progress
                        state = short_name(T.TrainingJobState, run.job.state, _STATE)
                        bar.update(task, completed=p.step, total=p.max_steps or None,
                                   description=f"{state:<10} {_point(run.point)}")

                runs = sweep.wait(client, runs, on_update=update,
                                  poll_interval_s=args.poll_interval)
    best = Sweep.best(runs, args.best_by)
    if args.json:
        print_json({"sweep": sweep.sweep_id, "best_by": args.best_by,
                    "best_model": best.job.model if best else "",
                    "runs": [{"job": r.job.name, "point": r.point,
                              "state": short_name(T.TrainingJobState, r.job.state, _STATE),
                              "model": r.job.model,
                              "scores": as_dict(r.scores) if r.scores else None,
                              "failure_reason": r.job.failure_reason} for r in runs]})
    else:
        table = Table("job", *sweep.grid, "state", *SCORES, "model", box=None)
        for run in runs:
            sc = run.scores
            table.add_row(run.job.name.removeprefix("trainingJobs/"),
                          *(str(run.point[k]) for k in sweep.grid),
                          short_name(T.TrainingJobState, run.job.state, _STATE),
                          *(f"{getattr(sc, n):.4f}" if sc else "-" for n in SCORES),
                          run.job.model or "-")
        print_table(table)
        if best is not None:
            out.print(f"best by {args.best_by}: {best.job.model} "
                      f"({args.best_by} {getattr(best.scores, args.best_by):.4f}; "
                      f"{_point(best.point)})", markup=False)
        else:
            out.print("no job exported a scored model", markup=False)
    return 0 if best is not None else 1
