/**
 * In-process store: for tests, development and single-process services.
 * Records live in this process's memory: several processes each have their
 * own (a duplicate sent to another process runs again), and a restart loses
 * every record.
 *
 * Bounded in entries and bytes, for the whole store and per scope (the
 * owner a claim names, {@link ClaimInput.scope}; claims without one share
 * the scope `''`). The rules:
 * - A record is never dropped while it is within its retention: no
 *   eviction, so one scope can never push out another scope's records, and a
 *   completed record always replays until it expires.
 * - When a bound is reached, a claim that would create a record fails with
 *   {@link StoreFullError} (HTTP 503 `store-full`), after the expired records
 *   are reclaimed. Replays, duplicates in flight and takeovers of an expired
 *   lease still answer. `claimMany` undoes the claims its batch made before
 *   throwing (all or nothing).
 * - `complete` always stores the outcome (the operation ran; dropping its
 *   outcome would run it again), so a store may hold more than its bound by
 *   the outcomes of the claims in progress when it filled up; the next new
 *   claim of that scope is refused.
 *
 * Bytes are an estimate of what each record holds: 2 bytes per UTF-16 code
 * unit of the outcome, id, token, fingerprint and scope (an upper bound: V8 stores
 * Latin-1 strings at 1 byte per character), plus {@link RECORD_OVERHEAD_BYTES}
 * for the record object, the map slot and the expiry queue.
 *
 * @example
 * ```ts
 * import { memoryStore } from 'oncely/stores/memory';
 * const store = memoryStore({ maxEntries: 100_000, maxBytesPerScope: 8 * 1024 * 1024 });
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
import { ConfigError, StoreFullError } from '../errors/index.js';

/**
 * Options of {@link memoryStore}.
 *
 * @example
 * ```ts
 * const options: MemoryStoreOptions = { maxBytes: 64 * 1024 * 1024, maxBytesPerScope: 4 * 1024 * 1024 };
 * ```
 */
export interface MemoryStoreOptions {
  /** Most records held at once (in progress and completed). Default 100 000. */
  maxEntries?: number;
  /** Most bytes held at once, as estimated (see the module documentation). Default 64 MiB. */
  maxBytes?: number;
  /** Most records one scope holds at once. Default `maxEntries` (no share of its own). */
  maxEntriesPerScope?: number;
  /** Most bytes one scope holds at once. Default `maxBytes` (no share of its own). */
  maxBytesPerScope?: number;
  /** Clock, for tests. Default `Date.now`. */
  now?: () => number;
}

/**
 * What one scope holds.
 *
 * @example
 * ```ts
 * const { entries, bytes }: MemoryScopeUsage = store.usage('acct_42');
 * ```
 */
export interface MemoryScopeUsage {
  /** Records held (expired ones included until reclaimed). */
  readonly entries: number;
  /** Estimated bytes held. */
  readonly bytes: number;
}

/**
 * The store {@link memoryStore} returns, with its size for monitoring.
 *
 * @example
 * ```ts
 * const store: MemoryStore = memoryStore();
 * console.log(store.size, store.bytes, store.usage('acct_42'));
 * ```
 */
export interface MemoryStore extends IdempotencyStore {
  /** Records currently held (expired ones included until reclaimed). */
  readonly size: number;
  /** Estimated bytes currently held. */
  readonly bytes: number;
  /** What one scope holds (`''` for claims without a scope). */
  usage(scope: string): MemoryScopeUsage;
}

/**
 * Fixed estimate, in bytes, of what a record costs beyond its strings: the
 * record object and its boxed numbers, its slot in the map, and its items in
 * the expiry queue. On Node.js 20 (x64) a completed record with a 64-character
 * id, a 67-character fingerprint and an empty outcome measured about 1,010
 * bytes of heap in all; the estimate for it is 768 + 2 × 174 characters = 1,116.
 */
export const RECORD_OVERHEAD_BYTES = 768;

interface Usage {
  entries: number;
  bytes: number;
}

interface Entry {
  state: 'in_progress' | 'completed';
  token: string;
  fingerprint: string | null;
  leaseUntil: number;
  expiresAt: number;
  outcome: string | null;
  bytes: number;
  scope: string;
  usage: Usage;
}

/** An item of the expiry queue: stale once its entry was removed or its `expiresAt` moved. */
interface Due {
  at: number;
  id: string;
  entry: Entry;
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: false, serverClock: false, shared: false, synchronous: true };
/** Expired records reclaimed by each claim in passing (all of them when a bound is reached). */
const RECLAIM_PER_CLAIM = 16;

function positive(name: string, value: number): number {
  if (!(value > 0)) throw new ConfigError(`memoryStore: ${name} must be a positive number.`);
  return value;
}

/** Create an in-memory store. See the module documentation for its bounds and where it fits. */
export function memoryStore(options: MemoryStoreOptions = {}): MemoryStore {
  const maxEntries = positive('maxEntries', options.maxEntries ?? 100_000);
  const maxBytes = positive('maxBytes', options.maxBytes ?? 64 * 1024 * 1024);
  const maxEntriesPerScope = positive('maxEntriesPerScope', options.maxEntriesPerScope ?? maxEntries);
  const maxBytesPerScope = positive('maxBytesPerScope', options.maxBytesPerScope ?? maxBytes);
  const now = options.now ?? Date.now;
  const entries = new Map<string, Entry>();
  const scopes = new Map<string, Usage>();
  let bytes = 0;
  // Min-heap of expiry deadlines. Every change of an entry's expiresAt pushes
  // a new item; the old one goes stale and is skipped when it comes due.
  let queue: Due[] = [];

  const sizeOf = (id: string, entry: Entry): number =>
    RECORD_OVERHEAD_BYTES +
    2 * (id.length + entry.token.length + entry.scope.length + (entry.fingerprint?.length ?? 0) + (entry.outcome?.length ?? 0));

  const push = (item: Due): void => {
    let i = queue.push(item) - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (queue[parent]!.at <= item.at) break;
      queue[i] = queue[parent]!;
      i = parent;
    }
    queue[i] = item;
  };
  const siftDown = (start: number): void => {
    const item = queue[start]!;
    let i = start;
    for (;;) {
      let child = 2 * i + 1;
      if (child >= queue.length) break;
      if (child + 1 < queue.length && queue[child + 1]!.at < queue[child]!.at) child++;
      if (queue[child]!.at >= item.at) break;
      queue[i] = queue[child]!;
      i = child;
    }
    queue[i] = item;
  };
  const pop = (): void => {
    const last = queue.pop()!;
    if (queue.length > 0) {
      queue[0] = last;
      siftDown(0);
    }
  };
  /** Stale items pile up when records are released or deleted: rebuild the queue from the records then. */
  const compact = (): void => {
    if (queue.length <= 2 * entries.size + 1024) return;
    queue = [...entries].map(([id, entry]) => ({ at: entry.expiresAt, id, entry }));
    for (let i = (queue.length >> 1) - 1; i >= 0; i--) siftDown(i);
  };
  const schedule = (id: string, entry: Entry): void => {
    push({ at: entry.expiresAt, id, entry });
    compact();
  };

  /** Count `entry` (already sized) in the totals of the store and its scope. */
  const add = (id: string, entry: Entry): void => {
    entries.set(id, entry);
    entry.usage.entries++;
    entry.usage.bytes += entry.bytes;
    bytes += entry.bytes;
  };
  const resize = (id: string, entry: Entry): void => {
    const size = sizeOf(id, entry);
    entry.usage.bytes += size - entry.bytes;
    bytes += size - entry.bytes;
    entry.bytes = size;
  };
  const remove = (id: string, entry: Entry): void => {
    if (entries.get(id) !== entry) return;
    entries.delete(id);
    bytes -= entry.bytes;
    entry.usage.entries--;
    entry.usage.bytes -= entry.bytes;
    if (entry.usage.entries === 0) scopes.delete(entry.scope);
  };
  /** Remove up to `limit` expired records, soonest-expired first; answers how many. */
  const reclaim = (at: number, limit = Number.POSITIVE_INFINITY): number => {
    let removed = 0;
    while (removed < limit && queue.length > 0 && queue[0]!.at <= at) {
      const { id, entry } = queue[0]!;
      pop();
      if (entries.get(id) === entry && entry.expiresAt <= at) {
        remove(id, entry);
        removed++;
      }
    }
    return removed;
  };

  const live = (id: string, at: number): Entry | undefined => {
    const entry = entries.get(id);
    if (entry === undefined) return undefined;
    if (entry.expiresAt <= at) {
      remove(id, entry);
      return undefined;
    }
    return entry;
  };

  const create = (id: string, input: ClaimInput, at: number): ClaimResult => {
    const scope = input.scope ?? '';
    const usage = scopes.get(scope) ?? { entries: 0, bytes: 0 };
    const leaseUntil = at + input.leaseMs;
    const entry: Entry = {
      state: 'in_progress',
      token: newToken(),
      fingerprint: input.fingerprint,
      leaseUntil,
      expiresAt: at + Math.max(input.ttlMs, input.leaseMs),
      outcome: null,
      bytes: 0,
      scope,
      usage,
    };
    entry.bytes = sizeOf(id, entry);
    const full = (): boolean =>
      entries.size + 1 > maxEntries ||
      bytes + entry.bytes > maxBytes ||
      usage.entries + 1 > maxEntriesPerScope ||
      usage.bytes + entry.bytes > maxBytesPerScope;
    // Every expired record goes before a refusal, whoever it belongs to.
    if (full()) reclaim(at);
    if (entries.size + 1 > maxEntries || bytes + entry.bytes > maxBytes) {
      throw new StoreFullError('The idempotency store is full of records within their retention; nothing was done.');
    }
    if (usage.entries + 1 > maxEntriesPerScope || usage.bytes + entry.bytes > maxBytesPerScope) {
      throw new StoreFullError(
        "This caller's share of the idempotency store is full of records within their retention; nothing was done.",
      );
    }
    scopes.set(scope, usage);
    add(id, entry);
    schedule(id, entry);
    return { status: 'acquired', token: entry.token, takeover: false, leaseUntil };
  };

  const claimSync = (id: string, input: ClaimInput): ClaimResult => {
    const at = now();
    // A few expired records go on every claim (more than a claim adds, so
    // the store keeps itself clean without a timer, in bounded time per call).
    reclaim(at, RECLAIM_PER_CLAIM);
    const entry = live(id, at);
    if (entry === undefined) return create(id, input, at);
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
      // A takeover keeps the record (and its place in its scope's share).
      entry.token = newToken();
      entry.leaseUntil = at + input.leaseMs;
      const expiresAt = Math.max(entry.expiresAt, at + Math.max(input.ttlMs, input.leaseMs));
      resize(id, entry);
      if (expiresAt !== entry.expiresAt) {
        entry.expiresAt = expiresAt;
        schedule(id, entry);
      }
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
    usage(scope) {
      const usage = scopes.get(scope);
      return { entries: usage?.entries ?? 0, bytes: usage?.bytes ?? 0 };
    },
    async claim(id, input) {
      return claimSync(id, input);
    },
    async claimMany(ids, input) {
      // All or nothing: the caller gets no tokens when one claim throws, so
      // the records this batch created or took over would otherwise stay
      // claimed under tokens nobody holds.
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
      entry.leaseUntil = now() + leaseMs;
      if (entry.leaseUntil > entry.expiresAt) {
        entry.expiresAt = entry.leaseUntil;
        schedule(id, entry);
      }
      return true;
    },
    async complete(id, token, outcome, ttlMs) {
      const entry = owned(id, token);
      if (entry === undefined) return false;
      // Stored even beyond a bound: the operation ran, and dropping its
      // outcome would run it again. The bound refuses the next new claim.
      entry.state = 'completed';
      entry.outcome = outcome;
      entry.expiresAt = now() + ttlMs;
      resize(id, entry);
      schedule(id, entry);
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
      return reclaim(now(), Math.max(0, Math.floor(limit)));
    },
    async close() {
      entries.clear();
      scopes.clear();
      queue = [];
      bytes = 0;
    },
  };
}
