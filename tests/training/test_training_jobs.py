"""DreamBooth jobs end to end on a training service process (local Ray, 2 CPU
workers): a loadable model in the store, checkpoints, exact resume after a worker
dies and after a service restart, cancellation, the class-prior cache, and the
standalone entrypoint. The reference job also reports to everything a job talks
to: a webhook receiver (failing at first), a real MLflow server and W&B offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from atelier.storage import open_store
from atelier.training import checkpoints
from atelier.training.evaluation import read_scores
from atelier.training.jobs import JobStore
from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2
from tests.conftest import REPO_ROOT, wait_until
from tests.kit.test_server import sample, scrape
from tests.training.conftest import S, spec, start_training, subject_photo, watch_to_end
from tests.training.integrations import MlflowServer, Receiver, wandb_records

STEPS = 6
#: A short one-worker job without priors, checkpointing every step.
QUICK = dict(max_train_steps=4, checkpointing=S.CheckpointPolicy(every_n_steps=1),
             resources=S.TrainingResources(num_workers=1),
             prior_preservation=S.PriorPreservation(enabled=False))


def resume_spec(**overrides):
    # Text encoder on, 2 workers and 2 accumulated micro-steps: accumulation under DDP
    # with text-encoder training is covered by every run compared here; so are the EMA
    # (saved in each checkpoint) and the latent cache (stored with the job), and the
    # subject scores of every checkpoint (rendered with the EMA weights on rank 0).
    return spec(max_train_steps=STEPS, gradient_accumulation_steps=2,
                checkpointing=S.CheckpointPolicy(every_n_steps=2, keep_last=2),
                validation_prompts=["a photo of sks toy on the moon"],
                ema=S.EmaConfig(enabled=True, decay=0.9),
                evaluation=S.SubjectEvaluation(enabled=True, num_inference_steps=2),
                options=S.TrainingOptions(cache_latents=True, random_flip=True), **overrides)


def tensorboard_scalars(store, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``prefix``, by tag: the
    files' records (length, CRC, an Event proto, CRC) read back directly."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for info in store.list(prefix):
        data, at = store.get_bytes(info.key), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def final_state(store, job_id):
    step = checkpoints.latest_step(store, job_id)
    state = store.get_json(f"{checkpoints.checkpoint_prefix(job_id, step)}/state.json")
    weights = {**checkpoints.load_trainable(store, job_id, step),
               **{f"ema/{k}": v for k, v in
                  checkpoints.load_ema_weights(store, job_id, step).items()}}
    return step, weights, state["losses"], [s.as_dict() for s in read_scores(store, job_id)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, minio_settings_module, model_cache):
    """An uninterrupted 2-worker run on the S3 (MinIO) code path; later runs compare to it.
    It posts its events to a receiver that fails twice first, and logs to MLflow and to
    W&B (offline)."""
    root = tmp_path_factory.mktemp("trackers")
    receiver = Receiver(fail_first=2).start()
    mlflow = MlflowServer(root)
    server = start_training(minio_settings_module, model_cache,
                            mlflow_tracking_uri=mlflow.uri, mlflow_experiment="dreambooth",
                            wandb__project="atelier-tests", wandb__mode="offline",
                            wandb__dir=str(root / "wandb"),
                            webhook_allowed_hosts='["127.0.0.1/32"]',
                            webhook_retry_first_s=0.2)
    channel = grpc.insecure_channel(server.target)
    from atelier.v1 import training_pb2_grpc

    stub = training_pb2_grpc.TrainingServiceStub(channel)
    created = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
        request_id="req-reference", training_job_id="reference", spec=resume_spec(
            webhook=S.Webhook(url=receiver.url))), timeout=60)
    events = watch_to_end(stub, created.training_job.name)
    store = open_store(minio_settings_module)
    result = {"server": server, "stub": stub, "store": store, "events": events,
              "settings": minio_settings_module, "receiver": receiver, "mlflow": mlflow,
              "wandb_dir": root / "wandb", "secret": created.webhook_secret,
              "created": created.training_job, "final": final_state(store, "reference")}
    yield result
    channel.close()
    server.stop()
    mlflow.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def minio_settings_module(s3_endpoint):
    import uuid

    from atelier.kit.settings import StorageSettings

    return StorageSettings(backend="minio", bucket=f"atelier-train-{uuid.uuid4().hex[:8]}",
                           region="us-east-1", retry_backoff_s=0.01, **s3_endpoint)


def test_job_goes_to_a_loadable_model(reference, tmp_path, model_cache):
    stub, store, events = reference["stub"], reference["store"], reference["events"]
    assert reference["created"].state == S.TRAINING_JOB_STATE_QUEUED
    assert events[0].HasField("snapshot")
    states = [e.state_changed.state for e in events if e.HasField("state_changed")]
    assert states[-4:] == [S.TRAINING_JOB_STATE_PREPARING, S.TRAINING_JOB_STATE_TRAINING,
                           S.TRAINING_JOB_STATE_EXPORTING, S.TRAINING_JOB_STATE_SUCCEEDED]
    saved = [e.checkpoint_saved.step for e in events if e.HasField("checkpoint_saved")]
    assert saved == [2, 4, 6]
    assert [e.validation_image.step for e in events if e.HasField("validation_image")] == \
        [2, 4, 6]
    assert any(e.HasField("progress") for e in events)
    scored = [e.scores for e in events if e.HasField("scores")]
    # Scored on the validation prompt (it names the identifier): one image a checkpoint.
    assert [s.step for s in scored] == [2, 4, 6] and all(s.images == 1 for s in scored)

    job = stub.GetTrainingJob(S.GetTrainingJobRequest(name="trainingJobs/reference"),
                              timeout=30).training_job
    assert job.state == S.TRAINING_JOB_STATE_SUCCEEDED and job.model == "models/reference"
    assert job.progress.step == STEPS and job.progress.max_steps == STEPS
    assert job.spec.instance_images[0].HasField("object")  # images moved to the store
    assert list(job.scores) == scored and job.exported_step == STEPS  # the last, by default
    # Keep-last-2: only steps 4 and 6 remain, on the S3 store.
    assert checkpoints.complete_steps(store, "reference") == [4, 6]
    assert store.exists("training/jobs/reference/checkpoints/step-00000006/optimizer.pt")
    assert store.exists("training/jobs/reference/checkpoints/step-00000006/rng-rank1.pt")
    assert any(store.list("training/jobs/reference/tensorboard/"))
    logged = tensorboard_scalars(store, "training/jobs/reference/tensorboard/")
    assert [step for step, _ in logged["eval/dino"]] == [2, 4, 6]
    assert [v for _, v in logged["eval/dino"]] == pytest.approx([s.dino for s in scored])
    assert JobStore(store).read_mark("reference", "class-priors")["generated"] == 4
    assert any(store.list("training/jobs/reference/cache/"))  # the latent cache
    assert store.get_json(f"{checkpoints.checkpoint_prefix('reference', 6)}/state.json"
                          )["ema"]["optimization_step"] == STEPS
    manifest = store.get_json("models/reference/manifest.json")
    assert manifest["kind"] == "lora" and manifest["weights"]["text_encoder"] == "text_encoder"
    assert manifest["base_model"] == "models/tiny-sd" and manifest["identifier_token"] == "sks"
    assert manifest["scores"]["step"] == STEPS and len(manifest["subject_images"]) == 4

    # Idempotent submission: the same request_id returns the same job (and secret).
    again = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
        request_id="req-reference", spec=resume_spec()), timeout=60)
    assert again.training_job.name == "trainingJobs/reference"
    assert again.webhook_secret == reference["secret"]

    # GenerationService lists the exported model and generates with it.
    from tests.generation.conftest import start_generation

    gen = start_generation(tmp_path, model_cache,
                           storage=reference["settings"])
    try:
        with grpc.insecure_channel(gen.target) as channel:
            gstub = generation_pb2_grpc.GenerationServiceStub(channel)
            model = gstub.GetModel(generation_pb2.GetModelRequest(name="models/reference"),
                                   timeout=30).model
            assert model.identifier_token == "sks"
            assert model.training_job == "trainingJobs/reference"
            assert model.scores == job.scores[-1]
            reply = gstub.Generate(generation_pb2.GenerateRequest(
                model="models/reference", prompt="a photo of sks toy on the moon",
                num_inference_steps=4, seed=1, width=64, height=64), timeout=120)
            assert len(reply.images) == 1 and reply.model == "models/reference"
    finally:
        gen.stop()


def test_webhooks_deliver_signed_events_with_retries(reference):
    from standardwebhooks import Webhook

    receiver, secret = reference["receiver"], reference["secret"]
    assert secret.startswith("whsec_")
    stub, name = reference["stub"], "trainingJobs/reference"

    def delivered() -> S.TrainingJob | None:
        job = stub.GetTrainingJob(S.GetTrainingJobRequest(name=name), timeout=30).training_job
        kinds = [d.event for d in job.webhook_deliveries]
        return job if job.webhook_deliveries and all(
            d.delivered for d in job.webhook_deliveries) and kinds.count(
            S.WEBHOOK_EVENT_STATE_CHANGED) == 5 else None

    deadline = time.monotonic() + 60
    while (job := delivered()) is None:
        assert time.monotonic() < deadline, "the webhook events were not all delivered"
        time.sleep(0.2)
    verifier = Webhook(secret)
    bodies = {}
    for headers, body, status in receiver.posts:
        bodies.setdefault(headers["webhook-id"], []).append(status)
        verifier.verify(body, headers)  # raises on a bad signature or a stale timestamp
        assert json.loads(body)["data"]["name"] == name
    with pytest.raises(Exception, match="signature"):
        verifier.verify(receiver.posts[-1][1] + b" ", receiver.posts[-1][0])
    # The first event (QUEUED) got two 503s and then went through, with the same id.
    first = job.webhook_deliveries[0]
    assert bodies[first.event_id] == [503, 503, 204]
    assert first.attempts == 3 and first.status_code == 204 and first.delivered
    assert all(d.attempts == 1 for d in job.webhook_deliveries[1:])
    events = [json.loads(body) for _, body, status in receiver.posts if status == 204]
    states = [e["data"]["state"] for e in events if e["type"] == "training_job.state_changed"]
    assert states == ["TRAINING_JOB_STATE_QUEUED", "TRAINING_JOB_STATE_PREPARING",
                      "TRAINING_JOB_STATE_TRAINING", "TRAINING_JOB_STATE_EXPORTING",
                      "TRAINING_JOB_STATE_SUCCEEDED"]
    assert [e["data"]["step"] for e in events
            if e["type"] == "training_job.checkpoint_saved"] == [2, 4, 6]
    assert [e["data"]["step"] for e in events
            if e["type"] == "training_job.validation_image"] == [2, 4, 6]
    delivered_ids = [h["webhook-id"] for h, _, status in receiver.posts if status == 204]
    assert len(set(delivered_ids)) == len(delivered_ids) == len(job.webhook_deliveries)


def test_webhook_targets_on_private_networks_are_refused(reference):
    for url, why in (("http://10.1.2.3/hook", "private"), ("http://[::1]:9/hook", "loopback"),
                     ("http://169.254.169.254/latest", "link-local"),
                     ("ftp://127.0.0.1/hook", "http")):
        with pytest.raises(grpc.RpcError) as caught:
            reference["stub"].CreateTrainingJob(S.CreateTrainingJobRequest(
                spec=spec(webhook=S.Webhook(url=url))), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "spec.webhook.url" in caught.value.details() and why in caught.value.details()


def test_mlflow_holds_the_run(reference):
    from mlflow import MlflowClient

    client = MlflowClient(reference["mlflow"].uri)
    experiment = client.get_experiment_by_name("dreambooth")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "reference" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["concepts.0.identifier_token"] == "sks" and params["max_train_steps"] == "6"
    assert params["concepts.0.prior.enabled"] == "True" and params["ema.decay"] == "0.9"
    losses = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
              for key in ("train/instance_loss", "train/prior_loss", "train/loss")}
    for key in losses:
        assert losses[key] and losses[key][-1][0] == STEPS
    assert all(value > 0 for _, value in losses["train/prior_loss"])
    scores = client.get_metric_history(run.info.run_id, "eval/dino")
    assert [m.step for m in scores] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert artifacts == {f"validation/step-{s:08d}-0.png" for s in (2, 4, 6)}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        manifest = json.loads(Path(client.download_artifacts(
            run.info.run_id, "model/manifest.json", folder)).read_text())
        image = Path(client.download_artifacts(run.info.run_id,
                                               "validation/step-00000006-0.png", folder))
        stored = reference["store"].get_bytes(
            "training/jobs/reference/validation/step-00000006-0.png")
        from PIL import Image

        assert Image.open(image).size == Image.open(io.BytesIO(stored)).size
    assert manifest == reference["store"].get_json("models/reference/manifest.json")


def test_wandb_offline_run(reference):
    (run_dir,) = (reference["wandb_dir"] / "wandb").glob("offline-run-*-atelier-reference")
    history: dict[str, list[tuple[int, float]]] = {}
    config, images = {}, []
    for record in wandb_records(run_dir / "run-atelier-reference.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            for key, value in items.items():
                if key.startswith("train/"):
                    history.setdefault(key, []).append((items["_step"], value))
                elif key.startswith("validation/") and key.endswith("/path"):
                    images.append((items["_step"], value))
    assert config["concepts.0.identifier_token"] == "sks"
    assert config["max_train_steps"] == STEPS and config["ema.decay"] == 0.9
    assert history["train/prior_loss"] and history["train/instance_loss"]
    assert history["train/instance_loss"][-1][0] == STEPS
    assert [step for step, _ in images] == [2, 4, 6]
    assert all((run_dir / "files" / path).is_file() for _, path in images)
    # The offline run was also copied to the job's folder in the store.
    assert any(reference["store"].list("training/jobs/reference/wandb/"))


def test_training_metrics(reference):
    samples = scrape(reference["server"].metrics_port)
    assert sample(samples, "atelier_training_steps_total") >= STEPS
    assert sample(samples, "atelier_training_jobs", state="SUCCEEDED") >= 1
    assert sample(samples, "atelier_training_step_seconds_count") >= 1
    assert sample(samples, "atelier_training_checkpoint_save_seconds_count") >= 1


def test_exact_resume_after_a_worker_dies(reference, minio_settings_module, model_cache):
    server = start_training(minio_settings_module, model_cache, faults={"fail_once_at_step": 3})
    try:
        from atelier.v1 import training_pb2_grpc

        with grpc.insecure_channel(server.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                training_job_id="worker-dies", spec=resume_spec()), timeout=60)
            events = watch_to_end(stub, "trainingJobs/worker-dies")
        assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_SUCCEEDED
        store = reference["store"]
        assert JobStore(store).read_mark("worker-dies", "injected-failure") == {"step": 3}
        _assert_same_run(final_state(store, "worker-dies"), reference["final"])
    finally:
        server.stop()


def test_exact_resume_after_a_service_restart(reference, minio_settings_module, model_cache):
    """The service goes away mid-job, and the newest checkpoint is truncated while it is
    down: the restarted service skips it (an event says so) for the one before, and the
    run ends exactly as the uninterrupted one."""
    from atelier.v1 import training_pb2_grpc

    first = start_training(minio_settings_module, model_cache, faults={"hold_at_step": 5})
    with grpc.insecure_channel(first.target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        stub.CreateTrainingJob(S.CreateTrainingJobRequest(
            training_job_id="restarted", spec=resume_spec()), timeout=60)
        for event in stub.WatchTrainingJob(
                S.WatchTrainingJobRequest(name="trainingJobs/restarted"), timeout=300):
            if event.HasField("scores") and event.scores.step == 4:
                scored = event.scores
                break
    # While it runs, the job's latest scores are metrics (gone once it ends).
    wait_until(lambda: sample(scrape(first.metrics_port), "atelier_training_subject_score",
                              job="restarted", score="dino") == pytest.approx(scored.dino))
    first.stop()  # the service goes away mid-job
    store = reference["store"]
    assert JobStore(store).load("restarted").state == S.TRAINING_JOB_STATE_TRAINING
    assert checkpoints.complete_steps(store, "restarted") == [2, 4]
    newest = f"{checkpoints.checkpoint_prefix('restarted', 4)}/trainable.safetensors"
    data = store.get_bytes(newest)
    store.put_bytes(newest, data[:len(data) // 2])
    second = start_training(minio_settings_module, model_cache)  # resumes it on start
    try:
        with grpc.insecure_channel(second.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            events = watch_to_end(stub, "trainingJobs/restarted")
        assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_SUCCEEDED
        skipped = [e.checkpoint_skipped for _, e in JobStore(store).events_after("restarted")
                   if e.HasField("checkpoint_skipped")]
        assert [s.step for s in skipped] == [4]
        assert "trainable.safetensors is corrupt" in skipped[0].reason
        _assert_same_run(final_state(store, "restarted"), reference["final"])
    finally:
        second.stop()


def _assert_same_run(got, want):
    step, weights, losses, scores = got
    want_step, want_weights, want_losses, want_scores = want
    assert step == want_step == STEPS
    assert losses == want_losses, "the loss curve differs from the uninterrupted run"
    # The same pictures scored the same way: the base images were kept with the job.
    assert [s["step"] for s in scores] == [2, 4, 6] and scores == want_scores
    assert weights.keys() == want_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], want_weights[name], rtol=0, atol=1e-6)


def assert_listens_on_loopback_only(pid: int) -> None:
    """Every listening socket of the process and its descendants (Ray's GCS, raylet,
    workers and agents among them) is bound to a loopback address."""
    import ipaddress

    import psutil

    root = psutil.Process(pid)
    listening = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(name, c.laddr.ip, c.laddr.port) for c in connections
                      if c.status == psutil.CONN_LISTEN]
    assert any(name.startswith(("gcs_server", "raylet")) for name, _, _ in listening)
    exposed = [entry for entry in listening
               if not (ip := ipaddress.ip_address(entry[1])).is_loopback
               and not (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_cancel_running_and_queued_jobs(local_settings, model_cache):
    from atelier.v1 import training_pb2_grpc

    server = start_training(local_settings, model_cache, faults={"hold_at_step": 2})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            running = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                training_job_id="to-cancel", spec=spec(**QUICK)), timeout=60).training_job
            queued = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                training_job_id="queued", spec=spec(**QUICK)), timeout=60).training_job
            cancelled = stub.CancelTrainingJob(S.CancelTrainingJobRequest(name=queued.name),
                                               timeout=30).training_job
            assert cancelled.state == S.TRAINING_JOB_STATE_CANCELLED
            for event in stub.WatchTrainingJob(S.WatchTrainingJobRequest(name=running.name),
                                               timeout=300):
                if event.HasField("checkpoint_saved") and event.checkpoint_saved.step == 2:
                    break
            # With Ray up and its train workers running: nothing listens beyond loopback.
            assert_listens_on_loopback_only(server.proc.pid)
            answer = stub.CancelTrainingJob(S.CancelTrainingJobRequest(name=running.name),
                                            timeout=30).training_job
            assert answer.state == S.TRAINING_JOB_STATE_CANCELLING  # not yet CANCELLED
            events = watch_to_end(stub, running.name)
            assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_CANCELLED
            store = open_store(local_settings)
            assert checkpoints.latest_step(store, "to-cancel") == 2  # the last one is kept
            with pytest.raises(grpc.RpcError) as err:
                stub.CancelTrainingJob(S.CancelTrainingJobRequest(name=running.name),
                                       timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # Late watchers get the current state first, then the stream ends.
            late = watch_to_end(stub, running.name)
            assert len(late) == 1 and late[0].snapshot.state == S.TRAINING_JOB_STATE_CANCELLED
            listed = stub.ListTrainingJobs(S.ListTrainingJobsRequest(
                states=[S.TRAINING_JOB_STATE_CANCELLED]), timeout=30).training_jobs
            assert {j.name for j in listed} == {running.name, queued.name}
            page = stub.ListTrainingJobs(S.ListTrainingJobsRequest(page_size=1), timeout=30)
            assert len(page.training_jobs) == 1 and page.next_page_token
    finally:
        server.stop()


def test_class_prior_cache_is_reused_and_invalidated(local_settings, model_cache):
    from atelier.v1 import training_pb2_grpc

    server = start_training(local_settings, model_cache)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            one_step = dict(max_train_steps=1, resources=S.TrainingResources(num_workers=1))
            for job_id, class_prompt in (("first", "a photo of a toy"),
                                         ("same-class", "a photo of a toy"),
                                         ("new-class", "a photo of a robot")):
                stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                    training_job_id=job_id, spec=spec(class_prompt=class_prompt, **one_step)),
                    timeout=60)
                events = watch_to_end(stub, f"trainingJobs/{job_id}")
                assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_SUCCEEDED
        jobs = JobStore(open_store(local_settings))
        first, same, new = (jobs.read_mark(j, "class-priors")
                            for j in ("first", "same-class", "new-class"))
        assert first["generated"] == 4
        assert same == {**first, "generated": 0}  # reused, nothing generated
        assert new["keys"] != first["keys"] and new["generated"] == 4
    finally:
        server.stop()


def test_standalone_entrypoint(local_settings, tmp_path, model_cache):
    """`atelier-train run spec.yaml`, as a Kubernetes Job runs it, writes to the store; a
    training service on the same store finds the job and delivers its webhook (only the
    events the spec asks for)."""
    for i in range(3):
        (tmp_path / f"photo{i}.png").write_bytes(subject_photo(i))
    receiver = Receiver().start()
    allowed = '["127.0.0.1/32"]'
    (tmp_path / "spec.yaml").write_text(
        "instance_images:\n" + "".join(f"  - file: photo{i}.png\n" for i in range(3)) +
        "identifier_token: sks\ninstance_prompt: a photo of sks toy\n"
        "resolution: 64\nmax_train_steps: 2\nseed: 3\n"
        "checkpointing: {every_n_steps: 1, keep_last: 1}\n"
        f"webhook: {{url: '{receiver.url}', events: [WEBHOOK_EVENT_STATE_CHANGED]}}\n")
    env = {**os.environ, "ATELIER_STORAGE__LOCAL_ROOT": str(local_settings.local_root),
           "ATELIER_STORAGE__BUCKET": local_settings.bucket,
           "ATELIER_MODELS__CACHE_DIR": str(model_cache),
           "ATELIER_TRAINING__LOCAL_RAY_CPUS": "1", "ATELIER_LOGGING__LEVEL": "WARNING",
           "ATELIER_TRAINING__WEBHOOK_ALLOWED_HOSTS": allowed}
    server = start_training(local_settings, model_cache, webhook_allowed_hosts=allowed,
                            discover_jobs_interval_s=1)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "atelier.training.standalone", "run",
             str(tmp_path / "spec.yaml"), "--job-id", "from-k8s"], env=env,
            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        final = json.loads(result.stdout.strip().splitlines()[-1])
        assert final["state"] == "TRAINING_JOB_STATE_SUCCEEDED"
        assert final["model"] == "models/from-k8s"
        store = open_store(local_settings)
        job = JobStore(store).load("from-k8s")
        assert job.state == S.TRAINING_JOB_STATE_SUCCEEDED

        def states() -> list[str]:
            return [json.loads(body)["data"]["state"] for _, body, _ in receiver.posts]

        wait_until(lambda: "TRAINING_JOB_STATE_SUCCEEDED" in states(), timeout=60)
        assert states() == ["TRAINING_JOB_STATE_QUEUED", "TRAINING_JOB_STATE_PREPARING",
                            "TRAINING_JOB_STATE_TRAINING", "TRAINING_JOB_STATE_EXPORTING",
                            "TRAINING_JOB_STATE_SUCCEEDED"]  # no checkpoint events
        from standardwebhooks import Webhook

        verifier = Webhook(store.get_bytes("training/jobs/from-k8s/webhook-secret").decode())
        for headers, body, _ in receiver.posts:
            verifier.verify(body, headers)
    finally:
        server.stop()
        receiver.stop()
    bad = tmp_path / "bad.yaml"
    bad.write_text("identifier_token: sks\ninstance_prompt: no token here\n")
    result = subprocess.run([sys.executable, "-m", "atelier.training.standalone", "run",
                             str(bad)], env=env, capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 2 and "instance_prompt" in result.stderr


def test_a_job_survives_a_store_outage_longer_than_the_retry_budget(minio_settings,
                                                                     model_cache):
    """The store goes away mid-job for far longer than the store's retries last. The
    run fails, and so does recording that; the job must not be left TRAINING forever:
    it is re-queued, and resumes and ends once the store is back."""
    from atelier.v1 import training_pb2_grpc
    from tests.conftest import wait_until
    from tests.storage.test_minio_retries import FlakyProxy

    proxy = FlakyProxy(minio_settings.endpoint)
    through_proxy = minio_settings.model_copy(update={
        "endpoint": proxy.address, "max_retries": 2, "retry_backoff_s": 0.05,
        "connect_timeout_s": 1.0, "read_timeout_s": 5.0})  # a retry budget under 1 s
    server = start_training(through_proxy, model_cache, faults={"hold_at_step": 2},
                            max_worker_failures=0)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                training_job_id="outage", spec=spec(**QUICK)), timeout=60).training_job

            def progress_step() -> int:
                return stub.GetTrainingJob(S.GetTrainingJobRequest(name=job.name),
                                           timeout=30).training_job.progress.step

            wait_until(lambda: progress_step() >= 2, timeout=300)  # held at step 2
            proxy.down = True
            time.sleep(12)  # the outage: many times the retry budget
            proxy.down = False
            store = open_store(minio_settings)
            jobs = JobStore(store)

            def preparing_events() -> int:
                return sum(1 for _, e in jobs.events_after("outage")
                           if e.state_changed.state == S.TRAINING_JOB_STATE_PREPARING)

            # Re-queued: the job runs its phases again once the store answers.
            wait_until(lambda: preparing_events() >= 2, timeout=120)
            state = stub.GetTrainingJob(S.GetTrainingJobRequest(name=job.name),
                                        timeout=30).training_job.state
            if state not in (S.TRAINING_JOB_STATE_SUCCEEDED, S.TRAINING_JOB_STATE_FAILED):
                wait_until(lambda: progress_step() >= 2, timeout=300)
                stub.CancelTrainingJob(S.CancelTrainingJobRequest(name=job.name), timeout=30)
            events = watch_to_end(stub, job.name, timeout=300)
            final = events[-1].snapshot.state if events[-1].HasField("snapshot") else \
                events[-1].state_changed.state
            assert final in (S.TRAINING_JOB_STATE_SUCCEEDED, S.TRAINING_JOB_STATE_CANCELLED)
    finally:
        proxy.down = False
        server.stop()
        proxy.close()


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sdxl_concepts() -> list:
    """Two subjects: one with captions, a mask file, an alpha mask and images of three
    aspect ratios (base-model prior); one with class images from the SDXL base."""
    import io

    from PIL import Image

    from atelier.v1 import common_pb2

    def photo(pose, size):
        return Image.open(io.BytesIO(subject_photo(pose))).resize(size)

    wide, tall = photo(0, (240, 96)), photo(1, (96, 240))
    with_alpha = photo(2, (128, 128)).convert("RGBA")
    with_alpha.putalpha(Image.new("L", (128, 128), 255).crop((0, 0, 128, 128)))
    mask = Image.new("L", wide.size, 0)
    mask.paste(255, (40, 10, 200, 90))
    first = S.Concept(identifier_token="sks", instance_prompt="a photo of sks toy",
                      class_prompt="a photo of a toy", images=[
                          S.InstanceImage(image=common_pb2.ImageInput(data=_png(wide)),
                                          caption="a wide photo of sks toy",
                                          mask=common_pb2.ImageInput(data=_png(mask))),
                          S.InstanceImage(image=common_pb2.ImageInput(data=_png(tall)),
                                          caption="sks toy standing tall"),
                          S.InstanceImage(image=common_pb2.ImageInput(data=_png(with_alpha)),
                                          mask_from_alpha=True)],
                      prior_preservation=S.PriorPreservation(
                          enabled=True, loss_weight=0.5, source=S.PRIOR_SOURCE_BASE_MODEL))
    second = S.Concept(identifier_token="zwx", instance_prompt="a photo of zwx robot",
                       class_prompt="a photo of a robot", images=[
                           S.InstanceImage(image=common_pb2.ImageInput(
                               data=subject_photo(p, size=128))) for p in (3, 4)],
                       prior_preservation=S.PriorPreservation(
                           enabled=True, num_class_images=2, class_image_steps=2))
    return [first, second]


def test_sdxl_lora_job_with_the_data_pipeline_to_a_served_model(local_settings, tmp_path,
                                                                model_cache, tiny_sdxl):
    """A 2-worker SDXL LoRA job with two concepts, captions, buckets, masks, EMA, both
    text encoders at their own rates and both kinds of prior, from CreateTrainingJob to
    a model GenerationService serves."""
    from atelier.v1 import training_pb2_grpc

    server = start_training(local_settings, model_cache)  # tiny-sdxl is a default base
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                training_job_id="xl", spec=S.TrainingJobSpec(
                    base_model="models/tiny-sdxl", concepts=sdxl_concepts(), resolution=128,
                    max_train_steps=4, seed=5, method=S.FINE_TUNE_METHOD_LORA,
                    text_encoder=S.TextEncoderTraining(enabled=True, learning_rate=5e-5),
                    text_encoder_2=S.TextEncoderTraining(enabled=True, learning_rate=2e-5),
                    ema=S.EmaConfig(enabled=True, decay=0.9),
                evaluation=S.SubjectEvaluation(enabled=True, num_inference_steps=2),
                    options=S.TrainingOptions(aspect_ratio_bucketing=True, random_flip=True,
                                              masked_loss_outside_weight=0.1, snr_gamma=5.0),
                    resources=S.TrainingResources(num_workers=2),
                    checkpointing=S.CheckpointPolicy(every_n_steps=2),
                    validation_prompts=["a photo of sks toy"])), timeout=60).training_job
            assert job.spec.concepts[0].images[0].mask.HasField("object")
            events = watch_to_end(stub, job.name)
            assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_SUCCEEDED, \
                stub.GetTrainingJob(S.GetTrainingJobRequest(name=job.name)).training_job
        store = open_store(local_settings)
        assert JobStore(store).read_mark("xl", "class-priors")["count"] == 2  # concept 2 only
        manifest = store.get_json("models/xl/manifest.json")
        assert manifest["family"] == "stable-diffusion-xl" and manifest["kind"] == "lora"
        assert manifest["weights"]["text_encoder"] and manifest["weights"]["text_encoder_2"]
        assert [c["identifier_token"] for c in manifest["concepts"]] == ["sks", "zwx"]
        losses = store.get_json(f"{checkpoints.checkpoint_prefix('xl', 4)}/state.json")["losses"]
        assert len(losses) == 4 and all(row[2] > 0 for row in losses)  # a prior term each step
    finally:
        server.stop()

    from tests.generation.conftest import start_generation

    gen = start_generation(tmp_path, model_cache, storage=local_settings)
    try:
        with grpc.insecure_channel(gen.target) as channel:
            gstub = generation_pb2_grpc.GenerationServiceStub(channel)
            model = gstub.GetModel(generation_pb2.GetModelRequest(name="models/xl"),
                                   timeout=30).model
            assert model.family == model_pb2.MODEL_FAMILY_STABLE_DIFFUSION_XL
            reply = gstub.Generate(generation_pb2.GenerateRequest(
                model="models/xl", prompt="a photo of zwx robot", num_inference_steps=3,
                seed=1, width=128, height=128), timeout=120)
            assert len(reply.images) == 1 and reply.model == "models/xl"
    finally:
        gen.stop()
