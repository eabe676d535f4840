/**
 * `npm start`: the reference system, configured from the environment
 * (see docs/reference.md). Prints `listening on http://HOST:PORT` once it
 * accepts requests; SIGINT or SIGTERM stop it cleanly (a second signal
 * exits at once).
 *
 * @module
 */
import { referenceOptionsFromEnv, startReference } from './app.js';

async function main(): Promise<void> {
  const options = referenceOptionsFromEnv(process.env);
  // SEAM (ledger): once reference/ledger lands, pass
  // `ledger: (db) => createLedger({ db, brokerUrl: process.env.BROKER_URL })`.
  const running = await startReference(options);
  console.log(`listening on ${running.url}`);
  console.error(
    `[reference] store ${options.storeUrl}, data ${options.dataDir}, idempotency ${options.idempotency ? 'on' : 'off'}`,
  );

  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) {
      console.error(`[reference] ${signal} again: exiting now`);
      process.exit(1);
    }
    stopping = true;
    console.error(`[reference] ${signal}: shutting down`);
    running.close().then(
      () => process.exit(0),
      (error: unknown) => {
        console.error('[reference] shutdown failed:', error);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main().catch((error: unknown) => {
  console.error(`[reference] cannot start: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
});
