"""Every `atelier` command, run as the installed console script against the three
services running as their own processes: train (submit/watch/get/list/cancel),
models (list/get), generate and analyze, with their exit codes and --json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from atelier.dev.demo_assets import DOCUMENT_SCHEMA, bar_chart, document_page, toy_photo
from tests.clients.conftest import atelier_cli
from tests.conftest import free_port


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for pose in range(3):
        (folder / f"pose-{pose}.png").write_bytes(toy_photo(pose))
    (folder / "notes.txt").write_text("not a photo")  # ignored
    return folder


@pytest.fixture(scope="module")
def trained(local_services, photos_dir):
    """`train submit` without --detach: watches to the end, exit code 0 on success."""
    result = atelier_cli(
        "train", "submit", str(photos_dir), "--token", "sks", "--class", "toy",
        "--steps", "2", "--no-prior-preservation", "--resolution", "64", "--workers", "1",
        "--seed", "3", "--method", "lora", "--job-id", "cli-job", "--model-id", "cli-toy",
        server=local_services.targets["training"])
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_train_submit_shows_progress_and_the_model(trained):
    assert "submitted trainingJobs/cli-job (3 photos of 'a photo of sks toy')" in trained.stderr
    assert "2/2" in trained.stderr and "loss" in trained.stderr  # the progress bar
    assert "scores at step 2: dino " in trained.stderr
    assert "trainingJobs/cli-job  SUCCEEDED" in trained.stdout
    assert "models/cli-toy" in trained.stdout


def test_train_get_list_watch(local_services, trained):
    target = local_services.targets["training"]
    got = atelier_cli("--json", "train", "get", "cli-job", server=target)
    assert got.returncode == 0, got.stderr
    job = json.loads(got.stdout)
    assert job["state"] == "TRAINING_JOB_STATE_SUCCEEDED" and job["model"] == "models/cli-toy"
    assert job["spec"]["identifier_token"] == "sks"
    assert all("data" not in image for image in job["spec"]["instance_images"])

    human = atelier_cli("train", "get", "trainingJobs/cli-job", server=target)
    assert "step 2/2" in human.stdout

    listed = atelier_cli("--json", "train", "list", "--state", "succeeded", server=target)
    assert [j["name"] for j in json.loads(listed.stdout)["training_jobs"]] == [
        "trainingJobs/cli-job"]
    table = atelier_cli("train", "list", server=target)
    assert "trainingJobs/cli-job" in table.stdout and "succeeded" in table.stdout

    # Watching a finished job: its snapshot, then the stream ends; exit 0 as it succeeded.
    watched = atelier_cli("--json", "train", "watch", "cli-job", server=target)
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert events[0]["snapshot"]["state"] == "TRAINING_JOB_STATE_SUCCEEDED"


def test_train_detach_then_cancel(local_services, photos_dir, trained):
    target = local_services.targets["training"]
    submitted = atelier_cli(
        "train", "submit", str(photos_dir), "--token", "sks", "--class", "toy", "--steps",
        "5000", "--no-prior-preservation", "--resolution", "64", "--workers", "1",
        "--job-id", "cli-long", "--detach", server=target)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "trainingJobs/cli-long"
    cancelled = atelier_cli("train", "cancel", "cli-long", server=target)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = atelier_cli("train", "watch", "cli-long", server=target)
    assert watched.returncode == 1  # it did not succeed
    assert "CANCELLED" in watched.stdout
    again = atelier_cli("train", "cancel", "cli-long", server=target)
    assert again.returncode == 2 and "FAILED_PRECONDITION" in again.stderr
    deleted = atelier_cli("train", "delete", "cli-long", server=target)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted trainingJobs/cli-long" in deleted.stdout
    assert not (local_services.store / "atelier" / "training" / "jobs" / "cli-long").exists()
    gone = atelier_cli("train", "get", "cli-long", server=target)
    assert gone.returncode == 2 and "NOT_FOUND" in gone.stderr


def test_models_list_and_get(local_services, trained):
    target = local_services.targets["generation"]
    table = atelier_cli("models", "list", server=target)
    assert table.returncode == 0, table.stderr
    assert "models/cli-toy" in table.stdout and "fine_tuned_lora" in table.stdout
    listed = atelier_cli("--json", "models", "list", "--kind", "base", server=target)
    names = [m["name"] for m in json.loads(listed.stdout)["models"]]
    assert names and "models/cli-toy" not in names
    got = atelier_cli("--json", "models", "get", "cli-toy", server=target)
    model = json.loads(got.stdout)
    assert model["identifier_token"] == "sks" and model["training_job"] == "trainingJobs/cli-job"
    # The service scores subjects by default: the export's scores are on the model.
    assert model["scores"]["step"] == 2 and model["scores"]["images"] == 5


def test_generate_saves_images_with_progress(local_services, trained, tmp_path):
    target = local_services.targets["generation"]
    result = atelier_cli("generate", "a photo of sks toy on the moon", "--model", "cli-toy",
                         "-n", "2", "-o", str(tmp_path / "out"), "--steps", "3", "--seed", "5",
                         "--width", "64", "--height", "64", "--scheduler", "ddim", server=target)
    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr  # the step bar reached the end
    paths = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in paths] == ["a-photo-of-sks-toy-on-the-moon-0.png",
                                       "a-photo-of-sks-toy-on-the-moon-1.png"]
    assert f"{paths[0]}  seed 5" in result.stdout and f"{paths[1]}  seed 6" in result.stdout
    assert Image.open(paths[0]).size == (64, 64)

    # The same request with --json (unary Generate) gives the same pixels, within the
    # service's batching tolerance (2/255: here it runs in a batch of 1, not 2).
    again = atelier_cli("--json", "generate", "a photo of sks toy on the moon", "--model",
                        "cli-toy", "-n", "1", "-o", str(tmp_path / "json"), "--steps", "3",
                        "--seed", "5", "--width", "64", "--height", "64", "--stem", "x",
                        "--scheduler", "ddim",
                        server=target)
    reply = json.loads(again.stdout)
    assert reply["model"] == "models/cli-toy" and reply["seeds"] == ["5"]
    alone = np.asarray(Image.open(tmp_path / "json" / "x-0.png"), dtype=np.int16)
    assert np.abs(alone - np.asarray(Image.open(paths[0]), dtype=np.int16)).max() <= 2


def test_generate_with_lora_adapters(local_services, trained, tmp_path):
    """--lora NAME[:SCALE], repeatable: the model at scale 1 is --model itself, scale 0
    is the base; a bad scale is a usage error, an out-of-range one INVALID_ARGUMENT."""
    target = local_services.targets["generation"]

    def pixels(name, *flags):
        result = atelier_cli("--json", "generate", "a photo of sks toy", "-o",
                             str(tmp_path), "--stem", name, "--steps", "3", "--seed", "4",
                             "--width", "64", "--height", "64", *flags, server=target)
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(tmp_path / f"{name}-0.png"), dtype=np.int16)

    model = pixels("model", "--model", "cli-toy")
    assert np.array_equal(pixels("lora", "--lora", "models/cli-toy"), model)
    assert np.array_equal(pixels("off", "--lora", "cli-toy:0"), pixels("base"))
    assert not np.array_equal(pixels("half", "--lora", "cli-toy:0.5"), model)
    twice = atelier_cli("generate", "x", "--lora", "cli-toy", "--lora", "cli-toy:0.5",
                        server=target)
    assert twice.returncode == 2 and "listed twice" in twice.stderr
    bad = atelier_cli("generate", "x", "--lora", "cli-toy:strong", server=target)
    assert bad.returncode == 2 and "must be a number" in bad.stderr
    wide = atelier_cli("generate", "x", "--steps", "2", "--lora", "cli-toy:2.5",
                       server=target)
    assert wide.returncode == 2 and "adapters[0].scale" in wide.stderr


def test_generate_with_klein_reference_images(local_services, photos_dir, tmp_path):
    """--reference PATH, repeatable: klein's reference images, as the raw request."""
    import grpc

    from atelier.v1 import generation_pb2, generation_pb2_grpc

    target = local_services.targets["generation"]
    photos = sorted(photos_dir.glob("*.png"))[:2]
    result = atelier_cli("--json", "generate", "this toy on a beach", "--model", "tiny-klein",
                         "-o", str(tmp_path), "--stem", "klein", "--steps", "2", "--seed", "6",
                         *[arg for p in photos for arg in ("--reference", str(p))],
                         server=target)
    assert result.returncode == 0, result.stderr
    with grpc.insecure_channel(target) as channel:
        direct = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(
                model="models/tiny-klein", prompt="this toy on a beach", seed=6,
                num_inference_steps=2, reference_images=[p.read_bytes() for p in photos]),
            timeout=120)
    assert (tmp_path / "klein-0.png").read_bytes() == direct.images[0].data
    missing = atelier_cli("generate", "x", "--model", "tiny-klein", "--reference",
                          str(tmp_path / "absent.png"), server=target)
    assert missing.returncode != 0


def test_analyze_text_json_schema_and_stream(local_services, tmp_path):
    target = local_services.targets["analysis"]
    (tmp_path / "doc.png").write_bytes(document_page())
    (tmp_path / "chart.png").write_bytes(bar_chart())
    (tmp_path / "schema.json").write_text(json.dumps(DOCUMENT_SCHEMA))

    vqa = atelier_cli("analyze", str(tmp_path / "chart.png"), "-q", "What is shown?",
                      "--max-new-tokens", "8", server=target)
    assert vqa.returncode == 0, vqa.stderr
    assert vqa.stdout.strip() and "tokens" in vqa.stderr

    doc = atelier_cli("analyze", str(tmp_path / "doc.png"), "--task", "document", "--format",
                      "json", "--schema", str(tmp_path / "schema.json"), "--max-new-tokens",
                      "64", "-o", str(tmp_path / "answer.json"), server=target)
    assert doc.returncode == 0, doc.stderr
    Draft202012Validator(DOCUMENT_SCHEMA).validate(
        json.loads((tmp_path / "answer.json").read_text()))

    chart = atelier_cli("--json", "analyze", str(tmp_path / "chart.png"), "--task", "chart",
                        "--format", "json", "--max-new-tokens", "32", server=target)
    reply = json.loads(chart.stdout)
    assert reply["output_format"] == "OUTPUT_FORMAT_JSON"
    json.loads(reply["text"])

    streamed = atelier_cli("analyze", str(tmp_path / "chart.png"), "-q", "What is shown?",
                           "--max-new-tokens", "8", "--stream", server=target)
    assert streamed.returncode == 0 and streamed.stdout == vqa.stdout  # greedy: same answer


def test_exit_codes_and_error_details(local_services, tmp_path):
    gen = local_services.targets["generation"]
    bad = atelier_cli("generate", "x", "--width", "1001", "--steps", "2", server=gen)
    assert bad.returncode == 2
    assert "INVALID_ARGUMENT" in bad.stderr and "width:" in bad.stderr
    missing = atelier_cli("models", "get", "no-such-model", server=gen)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    nobody = atelier_cli("--retries", "2", "--timeout", "5", "models", "list",
                         server=f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 3 and "UNAVAILABLE" in nobody.stderr
    usage = atelier_cli("generate")  # the prompt is missing
    assert usage.returncode == 2 and "usage:" in usage.stderr
    no_file = atelier_cli("analyze", str(tmp_path / "absent.png"),
                          server=local_services.targets["analysis"])
    assert no_file.returncode == 2 and "no such file" in no_file.stderr
    empty = atelier_cli("train", "submit", str(tmp_path), "--token", "sks", "--class", "dog",
                        server=local_services.targets["training"])
    assert empty.returncode == 2 and "no .png" in empty.stderr


def test_server_from_the_environment(local_services):
    import os

    env = {**os.environ, "ATELIER_GENERATION_SERVER": local_services.targets["generation"]}
    result = atelier_cli("--json", "models", "list", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"]
