/**
 * `npm start`: the reference system, configured from the environment
 * (see docs/reference.md). Prints `listening on http://HOST:PORT` once it
 * accepts requests; SIGINT or SIGTERM stop it cleanly (a second signal
 * exits at once).
 *
 * @module
 */
import { type RunningReference, referenceOptionsFromEnv, startReference } from './app.js';
import { redact } from './db.js';

let running: RunningReference | undefined;
let stopping = false;

/** Longest wait for requests in flight at shutdown before exiting anyway, ms. */
const SHUTDOWN_GRACE_MS = 15_000;

function shutdown(): void {
  if (running === undefined) return; // still starting: main() closes it once started
  setTimeout(() => {
    console.error(`[reference] requests still running after ${SHUTDOWN_GRACE_MS} ms: exiting`);
    process.exit(1);
  }, SHUTDOWN_GRACE_MS).unref();
  running.close().then(
    () => process.exit(0),
    (error: unknown) => {
      console.error('[reference] shutdown failed:', error);
      process.exit(1);
    },
  );
}

// Installed before anything is printed: whoever sees "listening on" may signal at once.
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    if (stopping) {
      console.error(`[reference] ${signal} again: exiting now`);
      process.exit(1);
    }
    stopping = true;
    console.error(`[reference] ${signal}: shutting down`);
    shutdown();
  });
}

async function main(): Promise<void> {
  const options = referenceOptionsFromEnv(process.env);
  running = await startReference(options);
  if (stopping) return shutdown();
  console.error(
    `[reference] store ${redact(options.storeUrl ?? '')}, database ${running.database}, ` +
      `transactional mode ${running.transactional.on ? 'on' : 'off'} (${running.transactional.why}), ` +
      `idempotency ${options.idempotency ? 'on' : 'off'}, ` +
      `events ${options.brokerUrl ? 'via broker' : 'in-process'}, ` +
      `encryption ${options.encryptionKeys ? `on (sealing key ${options.encryptionKeys[0]!.id}, ${options.encryptionKeys.length} key(s))` : 'off'}`,
  );
  console.log(`listening on ${running.url}`);
}

main().catch((error: unknown) => {
  console.error(`[reference] cannot start: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
});
