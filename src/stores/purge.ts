/**
 * The purge of expired records, shared by the stores without native TTL
 * (SQLite, PostgreSQL, MySQL/MariaDB): one drain loop, run by each store's
 * background timer and by {@link purgeExpiredRecords} for a cron job.
 *
 * A drain deletes in batches (each one short statement on the `expires_at`
 * index, oldest first) and goes on while a batch came back full, yielding to
 * the event loop between batches, so a backlog is worked off at the
 * database's delete speed without holding a lock or the event loop for
 * longer than one batch.
 *
 * @module
 */
import type { IdempotencyStore } from '../engine/store.js';
import { ConfigError } from '../errors/index.js';

/**
 * Settings of a store's background purge (the `purge` option of the SQL stores).
 *
 * @example
 * ```ts
 * const purge: PurgeOptions = { intervalMs: 10_000, batch: 1000, onError: (error) => log.warn(error) };
 * ```
 */
export interface PurgeOptions {
  /**
   * Pause between the end of one drain and the start of the next, in ms.
   * Default 10 000. The first drain starts at a random point in the second
   * half of the first interval, so that processes started together do not
   * purge in step.
   */
  intervalMs?: number;
  /** Records deleted per batch: one short statement (or write transaction) each. Default 1000. */
  batch?: number;
  /** Told about a failed drain (the next one tries again). Default: ignored. */
  onError?: (error: unknown) => void;
}

/**
 * Options of {@link purgeExpiredRecords}.
 *
 * @example
 * ```ts
 * const options: PurgeRunOptions = { batch: 1000, maxMs: 50_000 };
 * ```
 */
export interface PurgeRunOptions {
  /** Records deleted per batch. Default 1000. */
  batch?: number;
  /** Stop after this long even when expired records remain, in ms. Default: until none remain. */
  maxMs?: number;
  /** Stop at the next batch boundary once aborted. */
  signal?: AbortSignal;
}

/**
 * What one drain did.
 *
 * @example
 * ```ts
 * const { deleted, done } = await purgeExpiredRecords(store);
 * ```
 */
export interface PurgeReport {
  /** Records deleted. */
  deleted: number;
  /** Batches run (statements sent). */
  batches: number;
  /** True when the last batch came back short: no expired record was left. */
  done: boolean;
  /** How long the drain took, in ms. */
  ms: number;
}

const DEFAULT_BATCH = 1000;
const DEFAULT_INTERVAL_MS = 10_000;

/** Let timers and I/O run between two batches (a synchronous store would otherwise hold the event loop). */
const yieldToEventLoop = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

function checkBatch(batch: number): number {
  if (!Number.isInteger(batch) || batch < 1) throw new ConfigError('purge batch must be a positive integer.');
  return batch;
}

/**
 * Delete every expired record of `store`, batch after batch, oldest first,
 * until a batch comes back short (or `maxMs` passes, or `signal` aborts).
 * The same loop the stores' background purge runs: call it from a cron job
 * or a scheduler when you turn the background purge off (`purge: false`).
 * A store with native TTL (Redis) answers its first batch with 0.
 *
 * @example
 * ```ts
 * import { purgeExpiredRecords } from 'oncely/stores/postgres';
 * const store = postgresStore({ pool, purge: false });
 * // every minute, from your scheduler:
 * const { deleted } = await purgeExpiredRecords(store, { batch: 1000, maxMs: 50_000 });
 * ```
 */
export async function purgeExpiredRecords(
  store: Pick<IdempotencyStore, 'purgeExpired'>,
  options: PurgeRunOptions = {},
): Promise<PurgeReport> {
  const batch = checkBatch(options.batch ?? DEFAULT_BATCH);
  const started = Date.now();
  const deadline = options.maxMs === undefined ? Number.POSITIVE_INFINITY : started + options.maxMs;
  let deleted = 0;
  let batches = 0;
  let done = false;
  while (options.signal?.aborted !== true && Date.now() < deadline) {
    const n = await store.purgeExpired(batch);
    deleted += n;
    batches++;
    if (n < batch) {
      done = true;
      break;
    }
    await yieldToEventLoop();
  }
  return { deleted, batches, done, ms: Date.now() - started };
}

/** A running background purge. */
export interface PurgeTimer {
  /** Stop the timer and wait for a drain in progress to end at its next batch boundary. */
  stop(): Promise<void>;
}

/** Validated settings of a background purge, or `undefined` when it is off. */
export interface PurgeSettings {
  intervalMs: number;
  batch: number;
  onError: ((error: unknown) => void) | undefined;
}

/**
 * Resolve a store's `purge` option (`false` turns the background purge off).
 * `legacyIntervalMs` and `legacyBatch` are the SQLite store's older options.
 */
export function purgeSettings(
  option: PurgeOptions | false | undefined,
  legacy: { intervalMs?: number; batch?: number } = {},
): PurgeSettings | undefined {
  if (option === false) return undefined;
  const intervalMs = option?.intervalMs ?? legacy.intervalMs ?? DEFAULT_INTERVAL_MS;
  const batch = checkBatch(option?.batch ?? legacy.batch ?? DEFAULT_BATCH);
  if (!Number.isFinite(intervalMs) || intervalMs < 0) throw new ConfigError('purge intervalMs must be a number ≥ 0.');
  if (intervalMs === 0) return undefined; // the older `purgeIntervalMs: 0` meant off
  return { intervalMs, batch, onError: option?.onError };
}

/**
 * Start a background purge of `store`: a drain every `intervalMs` (counted
 * from the end of the previous drain, so drains never overlap). The timer is
 * unref'd: it never keeps the process alive.
 */
export function startPurge(store: Pick<IdempotencyStore, 'purgeExpired'>, settings: PurgeSettings): PurgeTimer {
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  let running: Promise<void> | undefined;

  const schedule = (delay: number): void => {
    if (controller.signal.aborted) return;
    timer = setTimeout(tick, delay);
    timer.unref();
  };
  const tick = (): void => {
    timer = undefined;
    running = purgeExpiredRecords(store, { batch: settings.batch, signal: controller.signal }).then(
      () => undefined,
      (error: unknown) => {
        // Expired records are absent to every operation anyway; the next drain tries again.
        try {
          settings.onError?.(error);
        } catch {
          // A throwing error handler must not stop the purge.
        }
      },
    );
    void running.then(() => {
      running = undefined;
      schedule(settings.intervalMs);
    });
  };
  schedule(Math.round(settings.intervalMs * (0.5 + Math.random() / 2)));

  return {
    async stop() {
      controller.abort();
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
      await running;
    },
  };
}
