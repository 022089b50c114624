// The Node client against the three atelier services, started here as their own
// processes on free loopback ports (the Python environment comes from
// ATELIER_PYTHON, or the repository's .venv). It makes photos with the base model,
// trains a subject on them, generates the subject, and analyzes the result.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { AtelierClient, AtelierError, PROTO_ROOT } from "../src/index.js";

const REPO = path.resolve(PROTO_ROOT, "..");
const PYTHON = process.env.ATELIER_PYTHON ?? path.join(REPO, ".venv", "bin", "python");
const SERVICES = ["training", "generation", "analysis"];

let client;
const processes = {};
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "atelier-node-"));

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitServing(service, timeoutMs = 300_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (processes[service].exitCode !== null) {
      throw new Error(`${service} exited with ${processes[service].exitCode}`);
    }
    try {
      if ((await client.health(service)) === "SERVING") return;
    } catch {
      // not listening yet
    }
    if (Date.now() > end) throw new Error(`${service} not SERVING in time`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

before(async () => {
  const targets = {};
  for (const service of SERVICES) {
    const [port, metricsPort] = [await freePort(), await freePort()];
    targets[service] = `127.0.0.1:${port}`;
    processes[service] = spawn(PYTHON, ["-m", `atelier.${service}`], {
      cwd: REPO,
      stdio: ["ignore", "inherit", "inherit"],
      env: { ...process.env, ATELIER_GRPC__PORT: String(port),
             ATELIER_METRICS__PORT: String(metricsPort),
             ATELIER_STORAGE__LOCAL_ROOT: path.join(tmp, "store"),
             ATELIER_LOGGING__LEVEL: "WARNING", ATELIER_LOGGING__FORMAT: "text",
             ATELIER_TRAINING__POLL_INTERVAL_S: "0.2" },
    });
  }
  client = new AtelierClient(targets);
  await Promise.all(SERVICES.map((service) => waitServing(service)));
});

after(async () => {
  client?.close();
  const exits = await Promise.all(SERVICES.map((service) => new Promise((resolve) => {
    const proc = processes[service];
    if (proc.exitCode !== null) return resolve(proc.exitCode);
    proc.on("exit", (code) => resolve(code));
    proc.kill("SIGTERM");
  })));
  fs.rmSync(tmp, { recursive: true, force: true });
  assert.deepEqual(exits, [0, 0, 0], "every service drains and exits 0");
});

test("train a subject, generate it, analyze the result", { timeout: 600_000 }, async () => {
  // Photos of a "subject": three images from the base model.
  const base = await client.generate({ prompt: "a photo of a toy", num_images: 3, seed: 1,
                                       num_inference_steps: 2, width: 64, height: 64 });
  assert.equal(base.images.length, 3);
  assert.deepEqual(base.seeds, [1, 2, 3]);

  const job = await client.createTrainingJob({
    request_id: "node-test-1",
    training_job_id: "node-job",
    spec: {
      instance_images: base.images.map((image) => ({ data: image.data })),
      identifier_token: "sks", instance_prompt: "a photo of sks toy",
      class_prompt: "a photo of a toy", prior_preservation: { enabled: false },
      method: "FINE_TUNE_METHOD_LORA", resolution: 64, max_train_steps: 2, seed: 3,
      resources: { num_workers: 1 }, model_id: "node-toy",
    },
  });
  assert.equal(job.name, "trainingJobs/node-job");

  const kinds = new Set();
  for await (const event of client.watchTrainingJob(job.name)) kinds.add(event.event);
  assert.ok(kinds.has("snapshot") && kinds.has("progress"), [...kinds].join(","));
  const done = await client.getTrainingJob(job.name);
  assert.equal(done.state, "TRAINING_JOB_STATE_SUCCEEDED", done.failure_reason);
  assert.equal(done.model, "models/node-toy");

  const models = await client.listModels({ kind: "MODEL_KIND_FINE_TUNED_LORA" });
  assert.deepEqual(models.map((m) => m.name), ["models/node-toy"]);

  const steps = [];
  let result;
  for await (const event of client.generateStream({
    prompt: "a photo of sks toy on the moon", model: "models/node-toy", seed: 42,
    num_inference_steps: 3, scheduler: "ddim", width: 64, height: 64 })) {
    if (event.event === "progress") steps.push(event.progress.step);
    if (event.event === "result") result = event.result;
  }
  assert.deepEqual(steps, [1, 2, 3]);
  assert.equal(result.model, "models/node-toy");
  assert.deepEqual([...result.images[0].data.subarray(1, 4)], [...Buffer.from("PNG")]);

  // The same subject as a per-request adapter at scale 1 is the same image.
  const asAdapter = await client.generate({
    prompt: "a photo of sks toy on the moon", adapters: [{ model: "node-toy", scale: 1 }],
    seed: 42, num_inference_steps: 3, scheduler: "ddim", width: 64, height: 64 });
  assert.equal(asAdapter.model, "models/tiny-sd");
  assert.deepEqual(asAdapter.images[0].data, result.images[0].data);
  await assert.rejects(client.generate({ prompt: "x", num_inference_steps: 2,
                                         adapters: [{ model: "node-toy", scale: 3 }] }),
    (error) => error.codeName === "INVALID_ARGUMENT" &&
      error.fieldViolations[0].field === "adapters[0].scale");

  const schema = { type: "object", properties: { subject: { type: "string" },
                                                  count: { type: "integer" } },
                   required: ["subject", "count"], additionalProperties: false };
  const answer = await client.analyze({
    images: [{ data: result.images[0].data }], task: "ANALYSIS_TASK_VQA",
    instruction: "What is in the picture?", output_format: "OUTPUT_FORMAT_JSON",
    json_schema: JSON.stringify(schema), decoding: { max_new_tokens: 48 } });
  const parsed = JSON.parse(answer.text);
  assert.equal(typeof parsed.subject, "string");
  assert.ok(Number.isInteger(parsed.count));
  assert.deepEqual(Object.keys(parsed).sort(), ["count", "subject"]);

  let streamed = "";
  for await (const event of client.analyzeStream({
    images: [{ data: result.images[0].data }], instruction: "Describe it.",
    decoding: { max_new_tokens: 6 } })) {
    if (event.event === "delta") streamed += event.delta;
  }
  assert.ok(streamed.length > 0);
});

test("FLUX.2 [klein] takes reference images", { timeout: 300_000 }, async () => {
  const plain = await client.generate({ prompt: "a toy on a beach", model: "tiny-klein",
                                        seed: 3, num_inference_steps: 2 });
  const placed = await client.generate({ prompt: "this toy on a beach", model: "tiny-klein",
                                         seed: 3, num_inference_steps: 2,
                                         reference_images: [plain.images[0].data] });
  assert.equal(placed.model, "models/tiny-klein");
  assert.notDeepEqual(placed.images[0].data, plain.images[0].data);
  const model = await client.getModel("models/tiny-klein");
  assert.equal(model.family, "MODEL_FAMILY_FLUX2_KLEIN");
  assert.equal(model.takes_reference_images, true);
  await assert.rejects(client.generate({ prompt: "x", model: "tiny-klein", guidance_scale: 3,
                                         num_inference_steps: 2 }),
    (error) => error.codeName === "INVALID_ARGUMENT" &&
      error.fieldViolations[0].field === "guidance_scale");
});

test("errors carry the code and the field violations", async () => {
  await assert.rejects(client.generate({ prompt: "x", width: 1001, num_inference_steps: 2 }),
    (error) => {
      assert.ok(error instanceof AtelierError);
      assert.equal(error.codeName, "INVALID_ARGUMENT");
      assert.deepEqual(error.fieldViolations.map((v) => v.field), ["width"]);
      assert.ok(error.requestId);
      return true;
    });
  await assert.rejects(client.getTrainingJob("trainingJobs/absent"),
    (error) => error.codeName === "NOT_FOUND");
  await assert.rejects(client.cancelTrainingJob("trainingJobs/node-job"),
    (error) => error.codeName === "FAILED_PRECONDITION");
});
