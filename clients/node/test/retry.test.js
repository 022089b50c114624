// The retry policy against a grpc-js GenerationService on loopback that refuses the
// first calls: UNAVAILABLE is retried with backoff, RESOURCE_EXHAUSTED after the
// server's RetryInfo delay, other codes and a disabled policy are not retried, and a
// stream is retried before its first message.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

import { AtelierClient, PROTO_ROOT, retryDelayMs, DEFAULT_RETRY } from "../src/index.js";

const OWN = path.resolve(PROTO_ROOT, "../clients/node/protos");
const api = grpc.loadPackageDefinition(protoLoader.loadSync(
  ["atelier/v1/generation.proto"],
  { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
    includeDirs: [PROTO_ROOT, OWN] }));
const rpc = new protobuf.Root();
rpc.resolvePath = (origin, target) => (fs.existsSync(path.join(OWN, target))
  ? path.join(OWN, target) : protobuf.util.path.resolve(origin, target));
rpc.loadSync("google/rpc/status.proto", { keepCase: true });

/** A RESOURCE_EXHAUSTED status whose details carry RetryInfo(delay). */
function queueFull(delaySeconds) {
  const info = rpc.lookupType("google.rpc.RetryInfo");
  const status = rpc.lookupType("google.rpc.Status");
  const seconds = Math.floor(delaySeconds);
  const details = status.encode(status.create({
    code: grpc.status.RESOURCE_EXHAUSTED, message: "the queue is full",
    details: [{ type_url: "type.googleapis.com/google.rpc.RetryInfo",
                value: info.encode(info.create({ retry_delay: {
                  seconds, nanos: Math.round((delaySeconds - seconds) * 1e9) } })).finish() }],
  })).finish();
  const metadata = new grpc.Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(details));
  return { code: grpc.status.RESOURCE_EXHAUSTED, details: "the queue is full", metadata };
}

let server;
let target;
const script = { failures: [], calls: [] }; // failures: what the next calls answer

function answer(name, reply) {
  script.calls.push({ name, at: Date.now() });
  const failure = script.failures.shift();
  return failure ? { failure } : { reply };
}

before(async () => {
  server = new grpc.Server();
  server.addService(api.atelier.v1.GenerationService.service, {
    ListModels: (_call, callback) => {
      const { failure, reply } = answer("ListModels", { models: [{ name: "models/x" }] });
      callback(failure ?? null, reply);
    },
    GetModel: (_call, callback) => {
      const { failure } = answer("GetModel", null);
      callback(failure ?? { code: grpc.status.NOT_FOUND, details: "no such model" });
    },
    GenerateStream: (call) => {
      const { failure } = answer("GenerateStream", null);
      if (failure) return call.emit("error", failure);
      call.write({ progress: { step: 1, total_steps: 1, batch_size: 1 } });
      call.write({ result: { model: "models/x" } });
      call.end();
    },
  });
  const port = await new Promise((resolve, reject) => server.bindAsync(
    "127.0.0.1:0", grpc.ServerCredentials.createInsecure(),
    (error, bound) => (error ? reject(error) : resolve(bound))));
  target = `127.0.0.1:${port}`;
});

after(() => server.forceShutdown());

const unavailable = { code: grpc.status.UNAVAILABLE, details: "draining" };

test("UNAVAILABLE is retried with backoff until it succeeds", async () => {
  script.calls = [];
  script.failures = [unavailable, unavailable];
  const client = new AtelierClient({ generation: target }, { retry: { initialBackoffMs: 50 } });
  const models = await client.listModels();
  assert.deepEqual(models.map((m) => m.name), ["models/x"]);
  assert.equal(script.calls.length, 3);
  client.close();
});

test("RESOURCE_EXHAUSTED waits for the server's retry hint", async () => {
  script.calls = [];
  script.failures = [queueFull(0.4)];
  const client = new AtelierClient({ generation: target });
  await client.listModels();
  assert.equal(script.calls.length, 2);
  assert.ok(script.calls[1].at - script.calls[0].at >= 390,
            `retried after ${script.calls[1].at - script.calls[0].at} ms`);
  client.close();
});

test("other codes, exhausted attempts and a disabled policy are not retried", async () => {
  const client = new AtelierClient({ generation: target }, { retry: { initialBackoffMs: 10 } });
  script.calls = [];
  await assert.rejects(client.getModel("models/absent"), (e) => e.codeName === "NOT_FOUND");
  assert.equal(script.calls.length, 1);
  script.calls = [];
  script.failures = Array(6).fill(unavailable);
  await assert.rejects(client.listModels(), (e) => e.codeName === "UNAVAILABLE");
  assert.equal(script.calls.length, DEFAULT_RETRY.maxAttempts);
  script.failures = [];
  const once = new AtelierClient({ generation: target }, { retry: { maxAttempts: 1 } });
  script.calls = [];
  script.failures = [queueFull(0.1)];
  await assert.rejects(once.listModels(), (e) => e.codeName === "RESOURCE_EXHAUSTED" &&
    Math.abs(e.retryDelaySeconds - 0.1) < 1e-6);
  assert.equal(script.calls.length, 1);
  client.close();
  once.close();
});

test("a stream is retried before its first message, as an async iterator", async () => {
  script.calls = [];
  script.failures = [unavailable];
  const client = new AtelierClient({ generation: target }, { retry: { initialBackoffMs: 20 } });
  const kinds = [];
  for await (const event of client.generateStream({ prompt: "x" })) kinds.push(event.event);
  assert.deepEqual(kinds, ["progress", "result"]);
  assert.equal(script.calls.length, 2);
  client.close();
});

test("the delay rule matches the Python client's", () => {
  const hint = { code: grpc.status.RESOURCE_EXHAUSTED, retryDelaySeconds: 30 };
  assert.equal(retryDelayMs(DEFAULT_RETRY, 1, hint), DEFAULT_RETRY.maxBackoffMs);
  assert.equal(retryDelayMs(DEFAULT_RETRY, 5, hint), null);
  const bounded = retryDelayMs(DEFAULT_RETRY, 3, { code: grpc.status.UNAVAILABLE });
  assert.ok(bounded >= 0 && bounded <= 800);
  assert.equal(retryDelayMs(DEFAULT_RETRY, 1, { code: grpc.status.INVALID_ARGUMENT }), null);
});
