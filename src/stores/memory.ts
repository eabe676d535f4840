/**
 * In-process store: for tests and single-process services. Bounded in
 * entries and bytes; completed records beyond the bounds are evicted oldest
 * first (an evicted key may run again, so size the bounds above your
 * retention window's traffic). Records in progress are never evicted: when
 * only those remain, a claim fails with {@link StoreFullError}; `claimMany`
 * then undoes the claims its batch made before throwing (all or nothing).
 *
 * @example
 * ```ts
 * import { memoryStore } from 'oncely/stores/memory';
 * const store = memoryStore({ maxEntries: 100_000 });
 * ```
 * @module
 */
import type {
  ClaimInput,
  ClaimResult,
  IdempotencyStore,
  StoreCapabilities,
  StoredRecord,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { StoreFullError } from '../errors/index.js';

/** Options of {@link memoryStore}. */
export interface MemoryStoreOptions {
  /** Most records kept at once. Default 100 000. */
  maxEntries?: number;
  /** Most bytes of stored outcomes kept at once (UTF-16 length × 2 approximates). Default 64 MiB. */
  maxBytes?: number;
  /** Clock, for tests. Default `Date.now`. */
  now?: () => number;
}

interface Entry {
  state: 'in_progress' | 'completed';
  token: string;
  fingerprint: string | null;
  leaseUntil: number;
  expiresAt: number;
  outcome: string | null;
  bytes: number;
}

/** The store {@link memoryStore} returns, with its size for monitoring. */
export interface MemoryStore extends IdempotencyStore {
  /** Records currently held (expired ones included until purged). */
  readonly size: number;
  /** Bytes of outcomes currently held. */
  readonly bytes: number;
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: false, serverClock: false, shared: false, synchronous: true };

/** Create an in-memory store. See the module documentation for its bounds. */
export function memoryStore(options: MemoryStoreOptions = {}): MemoryStore {
  const { maxEntries = 100_000, maxBytes = 64 * 1024 * 1024, now = Date.now } = options;
  // Map keeps insertion order; completing a record re-inserts it, so the
  // first entries are the oldest completions (the eviction candidates).
  const entries = new Map<string, Entry>();
  let bytes = 0;

  const live = (id: string, at: number): Entry | undefined => {
    const entry = entries.get(id);
    if (entry === undefined) return undefined;
    if (entry.expiresAt <= at) {
      remove(id, entry);
      return undefined;
    }
    return entry;
  };
  const remove = (id: string, entry: Entry): void => {
    entries.delete(id);
    bytes -= entry.bytes;
  };
  const makeRoom = (extraBytes: number): boolean => {
    if (entries.size < maxEntries && bytes + extraBytes <= maxBytes) return true;
    const at = now();
    for (const [id, entry] of entries) {
      if (entry.state === 'completed' || entry.expiresAt <= at) remove(id, entry);
      if (entries.size < maxEntries && bytes + extraBytes <= maxBytes) return true;
    }
    return false;
  };

  const claimSync = (id: string, input: ClaimInput): ClaimResult => {
    const at = now();
    const entry = live(id, at);
    if (entry === undefined) {
      if (!makeRoom(0)) throw new StoreFullError();
      const token = newToken();
      const leaseUntil = at + input.leaseMs;
      entries.set(id, {
        state: 'in_progress',
        token,
        fingerprint: input.fingerprint,
        leaseUntil,
        expiresAt: at + Math.max(input.ttlMs, input.leaseMs),
        outcome: null,
        bytes: 0,
      });
      return { status: 'acquired', token, takeover: false, leaseUntil };
    }
    if (entry.state === 'completed') {
      return {
        status: 'completed',
        record: {
          state: 'completed',
          fingerprint: entry.fingerprint,
          outcome: entry.outcome ?? '',
          expiresAt: entry.expiresAt,
        },
      };
    }
    if (entry.leaseUntil <= at && entry.fingerprint === input.fingerprint) {
      entry.token = newToken();
      entry.leaseUntil = at + input.leaseMs;
      entry.expiresAt = Math.max(entry.expiresAt, at + Math.max(input.ttlMs, input.leaseMs));
      return { status: 'acquired', token: entry.token, takeover: true, leaseUntil: entry.leaseUntil };
    }
    return { status: 'in_progress', fingerprint: entry.fingerprint, leaseUntil: entry.leaseUntil, now: at };
  };

  const owned = (id: string, token: string): Entry | undefined => {
    const entry = live(id, now());
    return entry !== undefined && entry.state === 'in_progress' && entry.token === token ? entry : undefined;
  };

  return {
    name: 'memory',
    capabilities: CAPABILITIES,
    get size() {
      return entries.size;
    },
    get bytes() {
      return bytes;
    },
    async claim(id, input) {
      return claimSync(id, input);
    },
    async claimMany(ids, input) {
      // All or nothing: the caller gets no tokens when one claim throws, so
      // the records this batch created or took over would otherwise stay
      // claimed under tokens nobody holds. Nothing else is restored
      // (a completed record evicted to make room stays evicted).
      const results: ClaimResult[] = [];
      try {
        for (const id of ids) results.push(claimSync(id, input));
      } catch (error) {
        for (const [i, result] of results.entries()) {
          if (result.status === 'acquired') {
            const entry = owned(ids[i]!, result.token);
            if (entry !== undefined) remove(ids[i]!, entry);
          }
        }
        throw error;
      }
      return results;
    },
    async renew(id, token, leaseMs) {
      const entry = owned(id, token);
      if (entry === undefined) return false;
      const at = now();
      entry.leaseUntil = at + leaseMs;
      entry.expiresAt = Math.max(entry.expiresAt, entry.leaseUntil);
      return true;
    },
    async complete(id, token, outcome, ttlMs) {
      const entry = owned(id, token);
      if (entry === undefined) return false;
      const size = outcome.length * 2;
      entries.delete(id);
      bytes -= entry.bytes;
      makeRoom(size);
      entry.state = 'completed';
      entry.outcome = outcome;
      entry.bytes = size;
      entry.expiresAt = now() + ttlMs;
      entries.set(id, entry);
      bytes += size;
      return true;
    },
    async release(id, token) {
      const entry = owned(id, token);
      if (entry === undefined) return false;
      remove(id, entry);
      return true;
    },
    async get(id): Promise<StoredRecord | null> {
      const entry = live(id, now());
      if (entry === undefined) return null;
      return entry.state === 'completed'
        ? { state: 'completed', fingerprint: entry.fingerprint, outcome: entry.outcome ?? '', expiresAt: entry.expiresAt }
        : {
            state: 'in_progress',
            fingerprint: entry.fingerprint,
            leaseUntil: entry.leaseUntil,
            expiresAt: entry.expiresAt,
          };
    },
    async delete(id) {
      const entry = entries.get(id);
      if (entry === undefined) return false;
      remove(id, entry);
      return entry.expiresAt > now();
    },
    async purgeExpired(limit) {
      const at = now();
      let purged = 0;
      for (const [id, entry] of entries) {
        if (purged >= limit) break;
        if (entry.expiresAt <= at) {
          remove(id, entry);
          purged++;
        }
      }
      return purged;
    },
    async close() {
      entries.clear();
      bytes = 0;
    },
  };
}
