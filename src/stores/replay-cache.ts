/**
 * A bounded, in-process cache of completed records for a shared store.
 *
 * A completed record is final: until it expires (or an operator deletes
 * it) every claim of its id answers the same outcome. So once a process has
 * seen a replay, the next copies of that request, which come in storms
 * (a client retrying, a load balancer resending, a user double-clicking),
 * can be answered without asking the store again. Only records seen through
 * a replay are cached, never fresh completions, so the miss path keeps
 * nothing in memory.
 *
 * Staleness is bounded twice: an entry is dropped at the record's own
 * expiry, and at the latest `maxAgeMs` after it was cached, so a record
 * deleted in the store by hand is replayed by other processes for at most
 * that long (never re-run: the safe direction for a payment).
 *
 * {@link withReplayCache} puts the cache in front of any store; the Redis
 * store's `replayCache` option is that same wrapper. {@link ReplayCache} is
 * the bounded map underneath.
 *
 * @example
 * ```ts
 * import { withReplayCache } from 'oncely/stores/replay-cache';
 * import { postgresStore } from 'oncely/stores/postgres';
 *
 * const store = withReplayCache(postgresStore({ pool }), { maxEntries: 1_000 });
 * ```
 * @module
 */
import type { ClaimInput, ClaimResult, CompletedRecord, IdempotencyStore } from '../engine/store.js';
import { ConfigError } from '../errors/index.js';

/**
 * Bounds of a {@link ReplayCache}.
 *
 * @example
 * ```ts
 * const options: ReplayCacheOptions = { maxEntries: 10_000, maxBytes: 16 * 1024 * 1024, maxAgeMs: 60_000 };
 * ```
 */
export interface ReplayCacheOptions {
  /** Records kept at most; the oldest cached goes first. Default 10,000. */
  maxEntries?: number;
  /** Bytes of outcomes kept at most (UTF-16 length × 2, an upper bound). Default 16 MiB. */
  maxBytes?: number;
  /** Longest time an entry is trusted after it was cached, ms. Default 60,000. */
  maxAgeMs?: number;
  /** Clock, epoch ms. Default `Date.now`. */
  now?: () => number;
}

interface Entry {
  readonly record: CompletedRecord;
  /** Drop after this (epoch ms): the earlier of the record's expiry and the entry's maximum age. */
  readonly until: number;
  readonly bytes: number;
}

/**
 * The cache itself: `get`, `put`, `delete`. {@link withReplayCache} uses it
 * in front of a store; see {@link ReplayCacheOptions} for the bounds.
 *
 * @example
 * ```ts
 * const cache = new ReplayCache();
 * const hit = cache.get(id);
 * if (hit) return { status: 'completed', record: hit };
 * ```
 */
export class ReplayCache {
  readonly #entries = new Map<string, Entry>();
  readonly #maxEntries: number;
  readonly #maxBytes: number;
  readonly #maxAgeMs: number;
  readonly #now: () => number;
  #bytes = 0;

  /** @throws {@link ConfigError} when a bound is not a positive number. */
  constructor(options: ReplayCacheOptions = {}) {
    const { maxEntries = 10_000, maxBytes = 16 * 1024 * 1024, maxAgeMs = 60_000, now = Date.now } = options;
    for (const [name, value] of [
      ['maxEntries', maxEntries],
      ['maxBytes', maxBytes],
      ['maxAgeMs', maxAgeMs],
    ] as const) {
      if (!(value > 0)) throw new ConfigError(`replay cache: ${name} must be a positive number, got ${value}`);
    }
    this.#maxEntries = maxEntries;
    this.#maxBytes = maxBytes;
    this.#maxAgeMs = maxAgeMs;
    this.#now = now;
  }

  /** Records held now. */
  get size(): number {
    return this.#entries.size;
  }

  /** The completed record of `id`, when it is cached and neither expired nor aged out. */
  get(id: string): CompletedRecord | undefined {
    const entry = this.#entries.get(id);
    if (entry === undefined) return undefined;
    if (entry.until > this.#now()) return entry.record;
    this.delete(id);
    return undefined;
  }

  /** Remember a completed record seen in the store. Too large to fit at all: not kept. */
  put(id: string, record: CompletedRecord): void {
    const bytes = record.outcome.length * 2 + id.length * 2;
    if (bytes > this.#maxBytes) return;
    const until = Math.min(record.expiresAt, this.#now() + this.#maxAgeMs);
    this.delete(id);
    while (this.#entries.size >= this.#maxEntries || this.#bytes + bytes > this.#maxBytes) {
      const oldest = this.#entries.keys().next();
      if (oldest.done) break;
      this.delete(oldest.value);
    }
    this.#entries.set(id, { record, until, bytes });
    this.#bytes += bytes;
  }

  /** Forget `id` (the store deleted it). */
  delete(id: string): void {
    const entry = this.#entries.get(id);
    if (entry === undefined) return;
    this.#entries.delete(id);
    this.#bytes -= entry.bytes;
  }

  /** Forget everything. */
  clear(): void {
    this.#entries.clear();
    this.#bytes = 0;
  }
}

// Claims and deletes in flight for one id. `generation` moves whenever a
// delete of the id starts or ends; a claim caches its answer only if it did
// not move while the claim was out.
interface Flight {
  users: number;
  generation: number;
}

/**
 * Put a {@link ReplayCache} in front of `store`: a claim of an id whose
 * replay this wrapper has already seen is answered from the cache, without
 * asking the store; everything else goes to the store. Only replays are
 * cached (a claim the store answers `completed`), never fresh completions.
 * `claimMany` is forwarded as it is (one round trip anyway) and caches the
 * replays it sees. `delete` forgets the id, and a replay that the store
 * answered before that delete but that arrives after it is not cached.
 *
 * Records deleted in the store behind this wrapper's back (another process,
 * an operator) are still replayed from the cache until the entry expires
 * or ages out (`maxAgeMs`): see the module documentation.
 *
 * @param store The store to wrap; its name and capabilities are kept.
 * @param options Bounds of the cache. Default: 10,000 records, 16 MiB, 60 s.
 * @returns A store with the same contract as `store`.
 * @throws {@link ConfigError} when a bound is not a positive number.
 *
 * @example
 * ```ts
 * import { withReplayCache } from 'oncely/stores/replay-cache';
 * import { mysqlStore } from 'oncely/stores/mysql';
 *
 * const store = withReplayCache(mysqlStore({ pool }), { maxAgeMs: 30_000 });
 * ```
 */
export function withReplayCache(store: IdempotencyStore, options: ReplayCacheOptions = {}): IdempotencyStore {
  const cache = new ReplayCache(options);
  // Kept only while something is in flight for the id, so it stays small.
  const flights = new Map<string, Flight>();
  const board = (id: string): Flight => {
    let flight = flights.get(id);
    if (flight === undefined) {
      flight = { users: 0, generation: 0 };
      flights.set(id, flight);
    }
    flight.users++;
    return flight;
  };
  const land = (id: string, flight: Flight): void => {
    if (--flight.users === 0) flights.delete(id);
  };
  const seen = (id: string, result: ClaimResult, flight: Flight, generation: number): ClaimResult => {
    if (result.status === 'completed' && flight.generation === generation) cache.put(id, result.record);
    return result;
  };

  // Methods are closures over `store`, never `this`, so the object can be
  // spread into a richer one (the Redis store adds its prefix and keyOf).
  const wrapped: IdempotencyStore = {
    name: store.name,
    capabilities: store.capabilities,
    async claim(id: string, input: ClaimInput): Promise<ClaimResult> {
      const cached = cache.get(id);
      if (cached !== undefined) return { status: 'completed', record: cached };
      const flight = board(id);
      const generation = flight.generation;
      try {
        return seen(id, await store.claim(id, input), flight, generation);
      } finally {
        land(id, flight);
      }
    },
    renew: (id, token, leaseMs) => store.renew(id, token, leaseMs),
    complete: (id, token, outcome, ttlMs) => store.complete(id, token, outcome, ttlMs),
    release: (id, token) => store.release(id, token),
    get: (id) => store.get(id),
    async delete(id: string): Promise<boolean> {
      cache.delete(id);
      const flight = board(id);
      flight.generation++;
      try {
        return await store.delete(id);
      } finally {
        // Again at the end, and forget again: a claim sent while the delete
        // was in flight may have read the record before it went (and, had
        // it come back first, cached it).
        flight.generation++;
        cache.delete(id);
        land(id, flight);
      }
    },
    purgeExpired: (limit) => store.purgeExpired(limit),
    async close(): Promise<void> {
      cache.clear();
      await store.close();
    },
  };
  // Sessions and transactions pass through: a replay is only ever cached from a claim's answer.
  if (store.sessions !== undefined) Object.assign(wrapped, { sessions: store.sessions });
  if (store.transactions !== undefined) Object.assign(wrapped, { transactions: store.transactions });
  const claimMany = store.claimMany;
  if (claimMany !== undefined) {
    wrapped.claimMany = async (ids, input) => {
      const boarded = ids.map((id) => board(id));
      const generations = boarded.map((flight) => flight.generation);
      try {
        const results = await claimMany.call(store, ids, input);
        return results.map((result, i) => seen(ids[i]!, result, boarded[i]!, generations[i]!));
      } finally {
        for (const [i, flight] of boarded.entries()) land(ids[i]!, flight);
      }
    };
  }
  return wrapped;
}
