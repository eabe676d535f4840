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
 * @example
 * ```ts
 * const cache = new ReplayCache({ maxEntries: 1_000 });
 * cache.put('id', { state: 'completed', fingerprint: null, outcome: '…', expiresAt: Date.now() + 60_000 });
 * cache.get('id'); // the record, until it expires or ages out
 * ```
 * @module
 */
import type { CompletedRecord } from '../engine/store.js';
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
 * The cache itself: `get`, `put`, `delete`. Stores use it inside `claim`;
 * see {@link ReplayCacheOptions} for the bounds.
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
