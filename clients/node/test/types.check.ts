// Compiled by `tsc --noEmit` in `npm test`: the declarations describe the client as a
// TypeScript backend uses it (a wrong field or type here fails the check).
import { AtelierClient, AtelierError, DEFAULT_RETRY, retryDelayMs } from "../src/index.js";
import type { GenerateResponse, TrainingJob, WatchTrainingJobEvent } from "../src/index.js";

export async function usage(): Promise<void> {
  const client = new AtelierClient({ generation: "127.0.0.1:50052" },
                                   { token: "s3cret", retry: { maxAttempts: 3 } });
  const reply: GenerateResponse = await client.generate({ prompt: "a fox", seed: 7,
                                                         adapters: [{ model: "sks-dog" }] });
  const first: Buffer = reply.images[0].data;
  const placed = await client.generate({ prompt: "this fox in the snow", model: "tiny-klein",
                                         reference_images: [first] });
  console.log(placed.seeds[0]);
  const created = await client.createTrainingJobResponse({ spec: {
    identifier_token: "sks", webhook: { url: "https://hooks.example.com/atelier",
                                        events: ["WEBHOOK_EVENT_STATE_CHANGED"] } } });
  const secret: string = created.webhook_secret;
  const job: TrainingJob = await client.getTrainingJob(created.training_job.name);
  for await (const event of client.watchTrainingJob(job.name)) {
    const e: WatchTrainingJobEvent = event;
    if (e.event === "checkpoint_saved") console.log(e.checkpoint_saved.step);
    if (e.event === "state_changed") console.log(e.state_changed.state);
  }
  for await (const piece of client.analyzeStream({ instruction: "What is shown?" })) {
    if (piece.event === "delta") console.log(piece.delta.length);
    else console.log(piece.result.usage?.completion_tokens);
  }
  try {
    await client.getModel("models/absent");
  } catch (error) {
    if (error instanceof AtelierError) {
      const wait = retryDelayMs(DEFAULT_RETRY, 1, error);
      console.log(error.codeName, error.fieldViolations.map((v) => v.field), wait, secret,
                  first.length);
    }
  }
  client.close();
}
