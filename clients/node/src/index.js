// Node.js client of the atelier services. It reads the .proto files of protos/
// at run time with @grpc/proto-loader, so it always speaks the published API.
//
//   import { AtelierClient } from "@atelier/client";
//   const atelier = new AtelierClient({ generation: "127.0.0.1:50052" }, { token: "s3cret" });
//   const reply = await atelier.generate({ prompt: "a photo of sks toy on the moon",
//                                          model: "models/demo-sks-toy", seed: 7 });
//   fs.writeFileSync("moon.png", reply.images[0].data);

import { randomUUID } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));

/** Where the atelier .proto files live: the repository's protos/ folder. */
export const PROTO_ROOT = path.resolve(here, "../../../protos");
const OWN_PROTOS = path.resolve(here, "../protos");

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto files (snake_case)
  longs: Number, // int64 seeds fit in a double up to 2^53
  enums: String, // enum values by name, e.g. "TRAINING_JOB_STATE_SUCCEEDED"
  defaults: true,
  oneofs: true, // each oneof's set field is named by a virtual field (e.g. event)
  includeDirs: [PROTO_ROOT, OWN_PROTOS],
};

const definition = protoLoader.loadSync(
  ["atelier/v1/training.proto", "atelier/v1/generation.proto", "atelier/v1/analysis.proto",
   "grpc/health/v1/health.proto"],
  LOADER_OPTIONS,
);
const api = grpc.loadPackageDefinition(definition);

// google.rpc.Status and its detail messages, to decode grpc-status-details-bin.
const statusRoot = new protobuf.Root();
statusRoot.resolvePath = (origin, target) => {
  const own = path.join(OWN_PROTOS, target);
  return fs.existsSync(own) ? own : protobuf.util.path.resolve(origin, target);
};
statusRoot.loadSync("google/rpc/status.proto", { keepCase: true });

/** Local defaults of each service (make up / make demo). */
export const DEFAULT_TARGETS = {
  training: "127.0.0.1:50051",
  generation: "127.0.0.1:50052",
  analysis: "127.0.0.1:50053",
};

/** A failed call: the gRPC code (name and number), the message and the decoded details. */
export class AtelierError extends Error {
  constructor(error) {
    super(`${codeName(error.code)}: ${error.details}`);
    this.name = "AtelierError";
    this.code = error.code;
    this.codeName = codeName(error.code);
    this.details = error.details;
    this.fieldViolations = [];
    this.retryDelaySeconds = null;
    this.reason = "";
    this.requestId = (error.metadata?.get("x-request-id") ?? [""])[0];
    for (const detail of decodeDetails(error)) {
      if (detail.type === "google.rpc.BadRequest") {
        this.fieldViolations.push(...detail.value.field_violations);
      } else if (detail.type === "google.rpc.RetryInfo") {
        const d = detail.value.retry_delay ?? {};
        this.retryDelaySeconds = Number(d.seconds ?? 0) + (d.nanos ?? 0) / 1e9;
      } else if (detail.type === "google.rpc.ErrorInfo") {
        this.reason = detail.value.reason;
      }
    }
  }
}

function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

function decodeDetails(error) {
  const raw = error.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return [];
  const status = statusRoot.lookupType("google.rpc.Status").decode(raw);
  return status.details.flatMap((any) => {
    const name = any.type_url.split("/").pop();
    const type = statusRoot.lookup(name);
    if (!(type instanceof protobuf.Type)) return []; // a detail this client does not know
    return [{ type: name, value: type.toObject(type.decode(any.value),
                                                { longs: Number, defaults: true }) }];
  });
}

/** The Python client's retry policy: which failures are retried and how long to wait. */
export const DEFAULT_RETRY = Object.freeze({
  maxAttempts: 5, // tries in all, the first included; 1 turns retries off
  initialBackoffMs: 200, // upper bound of the first jittered wait
  maxBackoffMs: 10_000, // cap on any wait, a server's retry hint included
  multiplier: 2, // growth of the backoff bound per attempt
  retryResourceExhausted: true, // retry a full queue after the server's hint
});

/**
 * Milliseconds to wait before try `attempt + 1` after `error` (an AtelierError), or null
 * to give up. UNAVAILABLE: exponential backoff with full jitter. RESOURCE_EXHAUSTED: the
 * server's RetryInfo delay (else the backoff). Nothing else is retried.
 */
export function retryDelayMs(policy, attempt, error) {
  if (attempt >= policy.maxAttempts) return null;
  const bound = Math.min(policy.maxBackoffMs,
                         policy.initialBackoffMs * policy.multiplier ** (attempt - 1));
  if (error.code === grpc.status.UNAVAILABLE) return Math.random() * bound;
  if (error.code === grpc.status.RESOURCE_EXHAUSTED && policy.retryResourceExhausted) {
    return error.retryDelaySeconds !== null
      ? Math.min(policy.maxBackoffMs, error.retryDelaySeconds * 1000)
      : Math.random() * bound;
  }
  return null;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function unaryOnce(client, method, request, options) {
  return new Promise((resolve, reject) => {
    client[method](request, options.metadata, { deadline: deadline(options.timeoutMs) },
      (error, reply) => (error ? reject(new AtelierError(error)) : resolve(reply)));
  });
}

// Every unary call is safe to repeat: reads, generation, analysis, cancellation, and job
// submission, which always carries a request_id (one is made when the caller gives none).
async function unary(client, method, request, options) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await unaryOnce(client, method, request, options);
    } catch (error) {
      const wait = error instanceof AtelierError ? retryDelayMs(options.retry, attempt, error)
        : null;
      if (wait === null) throw error;
      await sleep(wait);
    }
  }
}

// Streams are retried only before their first message (later, events would repeat).
async function* stream(client, method, request, options) {
  for (let attempt = 1; ; attempt += 1) {
    const call = client[method](request, options.metadata,
      { deadline: deadline(options.streamTimeoutMs) });
    let received = false;
    try {
      for await (const message of call) {
        received = true;
        yield message;
      }
      return;
    } catch (error) {
      const failure = error.code !== undefined ? new AtelierError(error) : error;
      const wait = !received && failure instanceof AtelierError
        ? retryDelayMs(options.retry, attempt, failure) : null;
      if (wait === null) throw failure;
      await sleep(wait);
    } finally {
      call.cancel();
    }
  }
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

/**
 * Clients of the three services. `targets` maps service name to host:port;
 * `options`: token (bearer), credentials (grpc.credentials.createSsl(...) for TLS/mTLS),
 * timeoutMs (unary deadline, default 120 s), streamTimeoutMs (default 6 h), retry
 * (fields of DEFAULT_RETRY to change; { maxAttempts: 1 } turns retries off).
 */
export class AtelierClient {
  constructor(targets = {}, options = {}) {
    const all = { ...DEFAULT_TARGETS, ...targets };
    const credentials = options.credentials ?? grpc.credentials.createInsecure();
    // round_robin spreads calls over every address the target resolves to (a
    // headless Service's pods, "dns:///atelier-generation-headless:50052").
    const channelOptions = { "grpc.max_receive_message_length": 64 * 1024 * 1024,
                             "grpc.max_send_message_length": 64 * 1024 * 1024,
                             "grpc.service_config": JSON.stringify(
                               { loadBalancingConfig: [{ round_robin: {} }] }) };
    const v1 = api.atelier.v1;
    this.training = new v1.TrainingService(all.training, credentials, channelOptions);
    this.generation = new v1.GenerationService(all.generation, credentials, channelOptions);
    this.analysis = new v1.AnalysisService(all.analysis, credentials, channelOptions);
    this.healthClients = Object.fromEntries(Object.entries(all).map(
      ([name, target]) => [name, new api.grpc.health.v1.Health(target, credentials,
                                                                channelOptions)]));
    const metadata = new grpc.Metadata();
    if (options.token) metadata.set("authorization", `Bearer ${options.token}`);
    this.options = { metadata, timeoutMs: options.timeoutMs ?? 120_000,
                     streamTimeoutMs: options.streamTimeoutMs ?? 6 * 3600_000,
                     retry: { ...DEFAULT_RETRY, ...options.retry } };
  }

  /** "SERVING", "NOT_SERVING", ... of one service (training, generation or analysis). */
  async health(service) {
    const names = { training: "TrainingService", generation: "GenerationService",
                    analysis: "AnalysisService" };
    const reply = await unaryOnce(this.healthClients[service], "Check",
      { service: `atelier.v1.${names[service]}` }, { ...this.options, timeoutMs: 2000 });
    return reply.status;
  }

  // -- training --------------------------------------------------------------------------
  /** Submit a job; `request` is a CreateTrainingJobRequest ({ spec, request_id, ... }). */
  async createTrainingJob(request) {
    return (await this.createTrainingJobResponse(request)).training_job;
  }

  /** As createTrainingJob, the whole response: { training_job, webhook_secret }. */
  async createTrainingJobResponse(request) {
    const idempotent = { ...request, request_id: request.request_id || randomUUID() };
    return unary(this.training, "CreateTrainingJob", idempotent, this.options);
  }

  async getTrainingJob(name) {
    return (await unary(this.training, "GetTrainingJob", { name }, this.options)).training_job;
  }

  async listTrainingJobs(request = {}) {
    return unary(this.training, "ListTrainingJobs", request, this.options);
  }

  async cancelTrainingJob(name) {
    return (await unary(this.training, "CancelTrainingJob", { name }, this.options))
      .training_job;
  }

  /** Delete a finished job and all it stored; resolves to the objects removed. */
  async deleteTrainingJob(name) {
    return (await unary(this.training, "DeleteTrainingJob", { name }, this.options))
      .deleted_objects;
  }

  /** Async iterator over a job's events (snapshot, state changes, progress...). */
  watchTrainingJob(name) {
    return stream(this.training, "WatchTrainingJob", { name }, this.options);
  }

  // -- generation ------------------------------------------------------------------------
  /** Images for a GenerateRequest ({ prompt, model, num_images, seed, ...,
   *  adapters: [{ model: "sks-dog", scale: 0.8 }] }). */
  generate(request) {
    return unary(this.generation, "Generate", request, this.options);
  }

  /** Async iterator: progress per step, optional previews, then { result }. */
  generateStream(request, previewIntervalSteps = 0) {
    return stream(this.generation, "GenerateStream",
      { request, preview_interval_steps: previewIntervalSteps }, this.options);
  }

  async listModels(request = {}) {
    return (await unary(this.generation, "ListModels", request, this.options)).models;
  }

  async getModel(name) {
    return (await unary(this.generation, "GetModel", { name }, this.options)).model;
  }

  /** Delete a fine-tuned model; resolves to the objects removed. */
  async deleteModel(name) {
    return (await unary(this.generation, "DeleteModel", { name }, this.options))
      .deleted_objects;
  }

  // -- analysis --------------------------------------------------------------------------
  /** An answer for an AnalyzeRequest ({ images: [{ data }], task, output_format, ... }). */
  analyze(request) {
    return unary(this.analysis, "Analyze", request, this.options);
  }

  /** Async iterator: { delta } text pieces, then { result }. */
  analyzeStream(request) {
    return stream(this.analysis, "AnalyzeStream", { request }, this.options);
  }

  close() {
    for (const client of [this.training, this.generation, this.analysis,
                          ...Object.values(this.healthClients)]) {
      client.close();
    }
  }
}
