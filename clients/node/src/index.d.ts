// Type declarations of the atelier Node client (src/index.js). Messages are the
// protos' messages as @grpc/proto-loader gives them: snake_case fields, enums by
// name, int64 as number, bytes as Buffer, and each oneof's set field named by a
// string field of the oneof's name. `npm test` checks these with `tsc --noEmit`.

import type { ChannelCredentials } from "@grpc/grpc-js";

/** Where the atelier .proto files live: the repository's protos/ folder. */
export const PROTO_ROOT: string;

/** Local defaults of each service (make up / make demo). */
export const DEFAULT_TARGETS: Readonly<Record<ServiceName, string>>;

export type ServiceName = "training" | "generation" | "analysis";

/** When to retry a failed call, and how long to wait first. */
export interface RetryPolicy {
  /** Tries in all, the first included; 1 turns retries off. */
  maxAttempts: number;
  /** Upper bound of the first jittered wait, milliseconds. */
  initialBackoffMs: number;
  /** Cap on any wait (a server's retry hint included), milliseconds. */
  maxBackoffMs: number;
  /** Growth of the backoff bound per attempt. */
  multiplier: number;
  /** Whether RESOURCE_EXHAUSTED is retried (after the server's RetryInfo delay). */
  retryResourceExhausted: boolean;
}

export const DEFAULT_RETRY: Readonly<RetryPolicy>;

/** Milliseconds to wait before try `attempt + 1` after `error`, or null to give up. */
export function retryDelayMs(policy: RetryPolicy, attempt: number,
                             error: AtelierError): number | null;

export interface ClientOptions {
  /** Bearer token sent as `authorization: Bearer <token>`. */
  token?: string;
  /** grpc.credentials.createSsl(...) for TLS or mTLS; default plaintext. */
  credentials?: ChannelCredentials;
  /** Deadline of each unary call, milliseconds (default 120 000). */
  timeoutMs?: number;
  /** Deadline of each stream, milliseconds (default 6 h). */
  streamTimeoutMs?: number;
  /** Fields of DEFAULT_RETRY to change. */
  retry?: Partial<RetryPolicy>;
}

export interface FieldViolation { field: string; description: string }

/** A failed call: the gRPC code (number and name), the message and the decoded details. */
export class AtelierError extends Error {
  constructor(error: { code: number; details: string; metadata?: unknown });
  readonly code: number;
  /** "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", ... */
  readonly codeName: string;
  readonly details: string;
  readonly fieldViolations: FieldViolation[];
  /** The server's RetryInfo delay, seconds; null when it sent none. */
  readonly retryDelaySeconds: number | null;
  /** The ErrorInfo reason, or "". */
  readonly reason: string;
  /** The id the server logged the call under (x-request-id). */
  readonly requestId: string;
}

// -- common -------------------------------------------------------------------------------
export interface ObjectRef { key: string; bucket?: string }
export interface ImageInput { data?: Buffer | Uint8Array; object?: ObjectRef; source?: "data" | "object" }
export type ImageFormat = "IMAGE_FORMAT_UNSPECIFIED" | "IMAGE_FORMAT_PNG" | "IMAGE_FORMAT_JPEG"
  | "IMAGE_FORMAT_WEBP";
export interface EncodedImage { data: Buffer; format: ImageFormat; width: number; height: number }
export interface Duration { seconds: number; nanos: number }
export interface Timestamp { seconds: number; nanos: number }
export interface Timings { queue_wait: Duration | null; compute: Duration | null; total: Duration | null }

// -- models -------------------------------------------------------------------------------
export type ModelKind = "MODEL_KIND_UNSPECIFIED" | "MODEL_KIND_BASE" | "MODEL_KIND_FINE_TUNED_FULL"
  | "MODEL_KIND_FINE_TUNED_LORA";
export interface SubjectScores {
  step: number; dino: number; clip_i: number; clip_t: number; drift: number; images: number;
}
export interface Model {
  name: string; display_name: string; kind: ModelKind; source: string; base_model: string;
  identifier_token: string; class_prompt: string; training_job: string;
  load_state: string; memory_bytes: number; default_resolution: number;
  create_time: Timestamp | null; owner: string; family: string; modes: string[];
  scores: SubjectScores | null; default_steps: number; default_guidance_scale: number;
  takes_reference_images: boolean; guided: boolean; size_multiple: number;
}

// -- generation ---------------------------------------------------------------------------
export interface AdapterRef { model: string; scale?: number }
export interface GenerateRequest {
  prompt: string; model?: string; negative_prompt?: string; num_images?: number;
  width?: number; height?: number; num_inference_steps?: number; guidance_scale?: number;
  guidance_rescale?: number; seed?: number; scheduler?: string; output_format?: ImageFormat;
  quality?: number; init_image?: Buffer | Uint8Array; mask_image?: Buffer | Uint8Array;
  strength?: number; adapters?: AdapterRef[]; num_candidates?: number;
  /** FLUX.2 [klein]: encoded images of the subject, a style or a scene. */
  reference_images?: (Buffer | Uint8Array)[];
}
export interface Candidate { seed: number; subject_similarity: number }
export interface GenerateResponse {
  images: EncodedImage[]; seeds: number[]; model: string; timings: Timings | null;
  denoise_seconds: number; decode_seconds: number; subject_similarity: number[];
  candidates: Candidate[];
}
export type GenerateStreamEvent =
  | { event: "progress"; progress: { step: number; total_steps: number; batch_size: number } }
  | { event: "preview"; preview: { step: number; images: EncodedImage[] } }
  | { event: "result"; result: GenerateResponse };
export interface ListModelsRequest { page_size?: number; page_token?: string; kind?: ModelKind }

// -- analysis -----------------------------------------------------------------------------
export type AnalysisTask = "ANALYSIS_TASK_UNSPECIFIED" | "ANALYSIS_TASK_VQA" | "ANALYSIS_TASK_DOCUMENT"
  | "ANALYSIS_TASK_CHART" | "ANALYSIS_TASK_VIDEO" | "ANALYSIS_TASK_OCR" | "ANALYSIS_TASK_GENERAL"
  | "ANALYSIS_TASK_GROUNDING";
export type OutputFormat = "OUTPUT_FORMAT_UNSPECIFIED" | "OUTPUT_FORMAT_TEXT"
  | "OUTPUT_FORMAT_MARKDOWN" | "OUTPUT_FORMAT_JSON";
export interface DecodingParams {
  max_new_tokens?: number; temperature?: number; top_p?: number; top_k?: number;
  repetition_penalty?: number; seed?: number;
}
export interface AnalyzeRequest {
  images?: ImageInput[]; video?: Record<string, unknown>; instruction?: string;
  task?: AnalysisTask; target_language?: string; output_format?: OutputFormat;
  json_schema?: string; decoding?: DecodingParams; priority?: number;
}
export interface AnalyzeResponse {
  text: string; output_format: OutputFormat; finish_reason: string;
  usage: { prompt_tokens: number; image_tokens: number; completion_tokens: number } | null;
  timings: Timings | null; time_to_first_token_seconds: number;
}
export type AnalyzeStreamEvent =
  | { event: "delta"; delta: string }
  | { event: "result"; result: AnalyzeResponse };

// -- training -----------------------------------------------------------------------------
export type TrainingJobState = "TRAINING_JOB_STATE_UNSPECIFIED" | "TRAINING_JOB_STATE_QUEUED"
  | "TRAINING_JOB_STATE_PREPARING" | "TRAINING_JOB_STATE_TRAINING"
  | "TRAINING_JOB_STATE_EXPORTING" | "TRAINING_JOB_STATE_SUCCEEDED"
  | "TRAINING_JOB_STATE_FAILED" | "TRAINING_JOB_STATE_CANCELLED"
  | "TRAINING_JOB_STATE_CANCELLING";
export type WebhookEvent = "WEBHOOK_EVENT_STATE_CHANGED" | "WEBHOOK_EVENT_CHECKPOINT_SAVED"
  | "WEBHOOK_EVENT_VALIDATION_IMAGE" | "WEBHOOK_EVENT_SCORES";
/** A TrainingJobSpec (see protos/atelier/v1/training.proto for every field). */
export interface TrainingJobSpec {
  base_model?: string; instance_images?: ImageInput[]; identifier_token?: string;
  instance_prompt?: string; class_prompt?: string;
  prior_preservation?: { enabled?: boolean; loss_weight?: number; num_class_images?: number;
                         class_image_steps?: number; source?: string };
  method?: "FINE_TUNE_METHOD_FULL" | "FINE_TUNE_METHOD_LORA"; resolution?: number;
  max_train_steps?: number; learning_rate?: number; seed?: number;
  resources?: { num_workers?: number; gpus_per_worker?: number; cpus_per_worker?: number };
  validation_prompts?: string[]; model_id?: string;
  webhook?: { url: string; events?: WebhookEvent[] };
  [field: string]: unknown;
}
export interface TrainingProgress {
  step: number; max_steps: number; loss: number; instance_loss: number; prior_loss: number;
  learning_rate: number; steps_per_second: number; samples_per_second: number;
}
export interface WebhookDelivery {
  event_id: string; event: string; attempts: number; status_code: number;
  delivered: boolean; error: string; time: Timestamp | null;
}
export interface TrainingJob {
  name: string; spec: TrainingJobSpec; state: TrainingJobState; failure_reason: string;
  progress: TrainingProgress | null; model: string; latest_checkpoint: string;
  request_id: string; create_time: Timestamp | null; start_time: Timestamp | null;
  end_time: Timestamp | null; update_time: Timestamp | null; owner: string;
  scores: SubjectScores[]; exported_step: number; webhook_deliveries: WebhookDelivery[];
}
export interface CreateTrainingJobRequest {
  spec: TrainingJobSpec; request_id?: string; training_job_id?: string;
}
export interface CreateTrainingJobResponse { training_job: TrainingJob; webhook_secret: string }
export interface ListTrainingJobsRequest {
  page_size?: number; page_token?: string; states?: TrainingJobState[];
}
export interface ListTrainingJobsResponse { training_jobs: TrainingJob[]; next_page_token: string }
export type WatchTrainingJobEvent = { event_time: Timestamp | null } & (
  | { event: "snapshot"; snapshot: TrainingJob }
  | { event: "state_changed"; state_changed: { state: TrainingJobState; reason: string } }
  | { event: "progress"; progress: TrainingProgress }
  | { event: "checkpoint_saved"; checkpoint_saved: { step: number; location: string;
                                                     save_seconds: number } }
  | { event: "validation_image"; validation_image: { step: number; prompt: string;
                                                     image: ObjectRef } }
  | { event: "scores"; scores: SubjectScores }
  | { event: "checkpoint_skipped"; checkpoint_skipped: { step: number; location: string;
                                                         reason: string } });

/** Clients of the three services. Unary calls retry per the retry policy; streams
 *  retry only before their first message. */
export class AtelierClient {
  constructor(targets?: Partial<Record<ServiceName, string>>, options?: ClientOptions);
  /** "SERVING", "NOT_SERVING", ... of one service. */
  health(service: ServiceName): Promise<string>;
  createTrainingJob(request: CreateTrainingJobRequest): Promise<TrainingJob>;
  createTrainingJobResponse(request: CreateTrainingJobRequest): Promise<CreateTrainingJobResponse>;
  getTrainingJob(name: string): Promise<TrainingJob>;
  listTrainingJobs(request?: ListTrainingJobsRequest): Promise<ListTrainingJobsResponse>;
  cancelTrainingJob(name: string): Promise<TrainingJob>;
  /** Resolves to the number of objects removed. */
  deleteTrainingJob(name: string): Promise<number>;
  watchTrainingJob(name: string): AsyncGenerator<WatchTrainingJobEvent, void, undefined>;
  generate(request: GenerateRequest): Promise<GenerateResponse>;
  generateStream(request: GenerateRequest, previewIntervalSteps?: number
  ): AsyncGenerator<GenerateStreamEvent, void, undefined>;
  listModels(request?: ListModelsRequest): Promise<Model[]>;
  getModel(name: string): Promise<Model>;
  deleteModel(name: string): Promise<number>;
  analyze(request: AnalyzeRequest): Promise<AnalyzeResponse>;
  analyzeStream(request: AnalyzeRequest): AsyncGenerator<AnalyzeStreamEvent, void, undefined>;
  close(): void;
}
