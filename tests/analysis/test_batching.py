"""Batched answers equal unbatched ones; streaming; BatchAnalyze; queue and cancellation."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from atelier.v1 import analysis_pb2 as A
from atelier.v1 import analysis_pb2_grpc, common_pb2
from tests.analysis.conftest import image, start_analysis
from tests.conftest import wait_until
from tests.kit.test_server import sample, scrape

SIZES = [(64, 64), (256, 128), (96, 200), (128, 128), (200, 64), (160, 96)]


def requests():
    out = []
    for i, (w, h) in enumerate(SIZES):
        fields = dict(images=[image(w, h, i)], instruction=f"question {i}: what is shown?",
                      task=A.ANALYSIS_TASK_VQA,
                      decoding=A.DecodingParams(max_new_tokens=6 + 4 * i))
        if i == 5:  # a question in text alone, batched with the image questions
            fields.update(images=[], task=A.ANALYSIS_TASK_GENERAL)
        if i == 3:
            fields.update(output_format=A.OUTPUT_FORMAT_JSON,
                          json_schema=json.dumps({"type": "object",
                                                  "properties": {"a": {"type": "string"}},
                                                  "required": ["a"]}))
        out.append(A.AnalyzeRequest(**fields))
    return out


def test_batched_greedy_output_equals_unbatched(analysis_server, stub):
    reqs = requests()
    alone = [stub.Analyze(r, timeout=120) for r in reqs]
    before = sample(scrape(analysis_server.server.metrics_port),
                    "atelier_analysis_batch_size_count")
    together: dict[int, A.AnalyzeResponse] = {}
    barrier = threading.Barrier(len(reqs))

    def run(i):
        barrier.wait()
        together[i] = stub.Analyze(reqs[i], timeout=120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = scrape(analysis_server.server.metrics_port)
    batches = sample(samples, "atelier_analysis_batch_size_count") - before
    assert batches < len(reqs), "the concurrent requests were not batched"
    for i, reply in enumerate(alone):
        assert together[i].text == reply.text, f"request {i} changed in a batch"
        assert together[i].usage.completion_tokens == reply.usage.completion_tokens
    # Different budgets were honoured inside one batch.
    assert [r.usage.completion_tokens for r in alone[:3]] != [alone[0].usage.completion_tokens] * 3


def test_stream_deltas_then_result_with_ttft(stub):
    request = A.AnalyzeRequest(images=[image(128, 64)], instruction="describe",
                               decoding=A.DecodingParams(max_new_tokens=12))
    events = list(stub.AnalyzeStream(A.AnalyzeStreamRequest(request=request), timeout=120))
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    result = events[-1].result
    assert events[-1].WhichOneof("event") == "result"
    assert len(deltas) >= 2
    assert "".join(deltas).strip() == result.text
    assert 0 < result.time_to_first_token_seconds <= result.timings.total.ToNanoseconds() / 1e9
    assert result.text == stub.Analyze(request, timeout=120).text


def test_batch_analyze_order_errors_and_consistency(stub):
    images = [image(64, 64, 1), common_pb2.ImageInput(data=b"not an image"),
              image(128, 96, 2), image(96, 96, 3)]
    results = list(stub.BatchAnalyze(A.BatchAnalyzeRequest(
        images=images, instruction="what is this?", task=A.ANALYSIS_TASK_VQA,
        decoding=A.DecodingParams(max_new_tokens=8)), timeout=120))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert results[1].WhichOneof("outcome") == "error"
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images[1]" in results[1].error.message
    for i in (0, 2, 3):
        single = stub.Analyze(A.AnalyzeRequest(
            images=[images[i]], instruction="what is this?", task=A.ANALYSIS_TASK_VQA,
            decoding=A.DecodingParams(max_new_tokens=8)), timeout=120)
        assert results[i].result.text == single.text


def test_batch_analyze_shared_json(stub):
    schema = {"type": "object", "properties": {"kind": {"enum": ["bar", "pie"]}},
              "required": ["kind"]}
    results = list(stub.BatchAnalyze(A.BatchAnalyzeRequest(
        images=[image(64, 64, s) for s in range(3)], task=A.ANALYSIS_TASK_CHART,
        output_format=A.OUTPUT_FORMAT_JSON, json_schema=json.dumps(schema),
        decoding=A.DecodingParams(max_new_tokens=8)), timeout=120))
    assert all(json.loads(r.result.text)["kind"] in ("bar", "pie") for r in results)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.BatchAnalyze(A.BatchAnalyzeRequest(images=[image()], instruction="x",
                                                     output_format=A.OUTPUT_FORMAT_JSON,
                                                     json_schema="{bad"), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


#: A request that generates for a long while (the tiny model reaches 3000 tokens
#: without an end-of-turn token on it).
LONG = A.AnalyzeRequest(images=[image(64, 64, 1)], instruction="x",
                        decoding=A.DecodingParams(max_new_tokens=3000))


def test_queue_full_and_cancellation_free_slots(backend, tmp_path, model_cache):
    server = start_analysis(tmp_path, model_cache, backend, max_batch_size=1,
                            max_queue_length=1, max_new_tokens=4000,
                            vllm={"max_num_seqs": 1})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
            long = LONG
            running = stub.AnalyzeStream(A.AnalyzeStreamRequest(request=long), timeout=120)
            next(running)  # generating
            waiting = stub.Analyze.future(long, timeout=120)
            wait_until(lambda: sample(scrape(server.server.metrics_port),
                                       "atelier_analysis_queue_depth") == 1)
            with pytest.raises(grpc.RpcError) as err:
                stub.Analyze(long, timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = error_details_pb2.RetryInfo()
            next(d for d in rpc_status.from_call(err.value).details
                 if d.Is(retry.DESCRIPTOR)).Unpack(retry)
            assert retry.retry_delay.ToMilliseconds() >= 500
            # Cancel both: the running row stops and the waiting one leaves the queue.
            waiting.cancel()
            wait_until(lambda: sample(scrape(server.server.metrics_port),
                                       "atelier_analysis_queue_depth") == 0)
            running.cancel()
            started = time.monotonic()
            reply = stub.Analyze(A.AnalyzeRequest(
                images=[image()], instruction="x", decoding=A.DecodingParams(max_new_tokens=2)),
                timeout=60)
            assert reply.usage.completion_tokens <= 2
            assert time.monotonic() - started < 30
            with pytest.raises(grpc.RpcError) as err:
                stub.Analyze(long, timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stub.Analyze(A.AnalyzeRequest(images=[image()], instruction="x",
                                          decoding=A.DecodingParams(max_new_tokens=2)),
                         timeout=60)
    finally:
        server.stop()


def test_metrics(backend, analysis_server, stub):
    stub.Analyze(A.AnalyzeRequest(images=[image()], instruction="x", task=A.ANALYSIS_TASK_OCR,
                                  decoding=A.DecodingParams(max_new_tokens=3)), timeout=60)
    samples = scrape(analysis_server.server.metrics_port)
    assert sample(samples, "atelier_analysis_requests_total", task="OCR") >= 1
    assert sample(samples, "atelier_analysis_time_to_first_token_seconds_count") >= 1
    assert sample(samples, "atelier_analysis_generated_tokens_total") >= 3
    assert sample(samples, "atelier_analysis_generate_tokens_per_second") > 0
    assert sample(samples, "atelier_analysis_image_tokens_per_request_sum") >= 6
    assert sample(samples, "atelier_analysis_queue_depth") == 0
    if backend == "transformers":
        assert sample(samples, "atelier_analysis_batch_size_count") >= 1
    else:  # vLLM's own engine series, next to atelier's
        names = {name for name, _ in samples}
        assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                "vllm:num_requests_waiting"} <= names, sorted(names)


def test_a_full_queue_refuses_before_decoding(tmp_path, model_cache):
    server = start_analysis(tmp_path, model_cache, max_batch_size=1, max_queue_length=1,
                            max_new_tokens=4000)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
            long = LONG
            running = stub.AnalyzeStream(A.AnalyzeStreamRequest(request=long), timeout=120)
            next(running)
            waiting = stub.Analyze.future(long, timeout=120)
            wait_until(lambda: sample(scrape(server.server.metrics_port),
                                      "atelier_analysis_queue_depth") == 1)
            # Bytes that are no image at all: refused for capacity, so they were never
            # decoded (a decode would have answered INVALID_ARGUMENT).
            garbage = A.AnalyzeRequest(images=[common_pb2.ImageInput(data=b"\x89PNG junk")],
                                       instruction="x")
            with pytest.raises(grpc.RpcError) as err:
                stub.Analyze(garbage, timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Nor is anything fetched from the store for it (a missing object would
            # have answered NOT_FOUND).
            missing = A.AnalyzeRequest(images=[common_pb2.ImageInput(
                object=common_pb2.ObjectRef(key="uploads/anonymous/none.png"))], instruction="x")
            with pytest.raises(grpc.RpcError) as err:
                stub.Analyze(missing, timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            waiting.cancel()
            running.cancel()
            wait_until(lambda: sample(scrape(server.server.metrics_port),
                                      "atelier_analysis_queue_depth") == 0)
            with pytest.raises(grpc.RpcError) as err:  # with room, it is decoded: bad image
                stub.Analyze(garbage, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


def test_decode_budget_queues_requests_and_refuses_what_never_fits(tmp_path, model_cache):
    from tests.analysis.conftest import png

    one = 300 * 300 * 16  # one 300x300 image's estimated decode bytes
    server = start_analysis(tmp_path, model_cache, max_decode_bytes=max(2**20, one + one // 2))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
            request = A.AnalyzeRequest(
                images=[common_pb2.ImageInput(data=png(300, 300, 1))], instruction="x",
                decoding=A.DecodingParams(max_new_tokens=2))
            calls = [stub.Analyze.future(request, timeout=120) for _ in range(4)]
            assert all(call.result().usage.completion_tokens <= 2 for call in calls)
            samples = scrape(server.server.metrics_port)
            assert sample(samples, "atelier_analysis_decode_budget_bytes_in_use") == 0
            too_big = A.AnalyzeRequest(images=[image(300, 300)] * 2, instruction="x")
            with pytest.raises(grpc.RpcError) as err:
                stub.Analyze(too_big, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "MiB" in err.value.details()
    finally:
        server.stop()


def test_waiting_requests_are_taken_by_priority_then_arrival():
    """Batching policy, without a model: lower priority values first, ties in arrival
    order; a request already generating is not pre-empted (it is not in the queue)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from atelier.analysis.backend import Sampling
    from atelier.analysis.batching import AnalysisBatcher, AnalysisJob
    from atelier.analysis.metrics import AnalysisMetrics

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1],
                                                              pad_token_id=0))
    batcher = AnalysisBatcher(model=model, tokenizer=None, grammars=None, device="cpu",
                              max_batch_size=2, max_queue_length=10, batch_wait_ms=0,
                              metrics=AnalysisMetrics(CollectorRegistry()))
    jobs = {}
    for name, priority in [("a", 0), ("b", 5), ("c", -3), ("d", 0), ("e", -3)]:
        jobs[name] = AnalysisJob(inputs={}, budget=1, sampling=Sampling(), emit=lambda e: None,
                                 priority=priority)
        batcher.submit(jobs[name])
    order = []
    while len(batcher.queue):
        order.append([next(k for k, j in jobs.items() if j is job)
                      for job in batcher._next_batch()])
    assert order == [["c", "e"], ["a", "d"], ["b"]]


def test_priority_out_of_range_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Analyze(A.AnalyzeRequest(images=[image()], instruction="x", priority=5000),
                     timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in err.value.details()
