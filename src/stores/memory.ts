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
 * for the record's slot in the store's arrays, its hash table entry and its
 * expiry item.
 *
 * Records are kept in a few large arrays rather than an object each, so
 * that what the garbage collector traces per record is its strings, and a
 * claim costs about the same with a thousand records held as with a million
 * (`bench/memory-store.ts` measures both).
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
import { randomBytes } from 'node:crypto';
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
 * Fixed estimate, in bytes, of what a record costs beyond its strings: its
 * slot in the store's arrays (with their room to grow), its hash table entry
 * and its expiry item. On Node.js 20 (x64), 400,000 completed records with a
 * 64-character id, a 67-character fingerprint and an empty outcome took 117
 * bytes each of arrays, and 160 for the two strings: 277 in all. The
 * estimate for one is 768 + 2 × 171 characters = 1,110: an upper bound with
 * room to spare, kept from when a record was an object of its own, so that a
 * configured bound holds as many records as it did.
 */
export const RECORD_OVERHEAD_BYTES = 768;

const CAPABILITIES: StoreCapabilities = { nativeTtl: false, serverClock: false, shared: false, synchronous: true };
/** Expired records reclaimed by each claim in passing (all of them when a bound is reached). */
const RECLAIM_PER_CLAIM = 16;
/** Width of an expiry bucket, ms: records expiring within one bucket's width are reclaimed together. */
const BUCKET_MS = 1_000;
/** Slot states. */
const FREE = 0;
const IN_PROGRESS = 1;
const COMPLETED = 2;
/** Per slot: numbers (lease deadline, expiry, bytes), integers (state, generation, scope, expiry bucket, id hash), strings (id, token, fingerprint, outcome). */
const NUMS = 3;
const INTS = 5;
const STRS = 4;

function positive(name: string, value: number): number {
  if (!(value > 0)) throw new ConfigError(`memoryStore: ${name} must be a positive number.`);
  return value;
}

/**
 * A string as one flat string: outcomes and fingerprints come built by
 * concatenation (a rope of several heap objects); a retained record keeps
 * one. `Number()` flattens a rope in V8 (its result is thrown away).
 */
function flat(s: string): string {
  Number(s);
  return s;
}

/**
 * A 32-bit hash of an id, seeded per store (so that nobody can choose ids
 * that collide): FNV-1a over its UTF-16 code units, then mixed.
 */
function hashOf(id: string, seed: number): number {
  let h = seed ^ id.length;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  return h ^ (h >>> 12);
}

/** Create an in-memory store. See the module documentation for its bounds and where it fits. */
export function memoryStore(options: MemoryStoreOptions = {}): MemoryStore {
  const maxEntries = positive('maxEntries', options.maxEntries ?? 100_000);
  const maxBytes = positive('maxBytes', options.maxBytes ?? 64 * 1024 * 1024);
  const maxEntriesPerScope = positive('maxEntriesPerScope', options.maxEntriesPerScope ?? maxEntries);
  const maxBytesPerScope = positive('maxBytesPerScope', options.maxBytesPerScope ?? maxBytes);
  const now = options.now ?? Date.now;

  // Records live in numbered slots of three arrays (numbers in a typed array,
  // small integers in another, strings in a plain one), not in an object each:
  // a store holding a million records holds their strings and a few big
  // arrays, with no per-record objects, closures or boxed numbers for the
  // garbage collector to trace. A slot's fields sit side by side, so a record
  // is one or two cache lines. A freed slot is reused (last freed, first
  // reused); its generation tells a stale expiry item from the current one.
  //
  // Ids find their slot through a hash table of our own (open addressing,
  // linear probing, in one Int32Array of (hash, slot + 1) pairs, at most half
  // full): a Map keyed by the ids costs several times more per lookup once it
  // holds 100,000 of them (hashing each new id string, then cache misses in
  // its chains and key comparisons), and it grew with the store. Here a
  // lookup is one hash of the id, a probe that compares integers, and one
  // string comparison on a hit.
  const seed = (Math.random() * 0x100000000) | 0;
  // Fencing tokens: a random prefix of this store's own and a counter, 36
  // characters as a UUID. They only have to differ from every other token of
  // this store (it is neither shared nor kept across restarts), which a
  // counter guarantees; a UUID per claim allocated ten times as much.
  const tokenPrefix = randomBytes(10).toString('hex');
  let tokenSeq = 0;
  const newToken = (): string => tokenPrefix + (++tokenSeq).toString(16).padStart(16, '0');
  let table = new Int32Array(2 * 1024);
  let mask = 1023;
  let capacity = 0;
  let nums = new Float64Array(0);
  let ints = new Int32Array(0);
  let strs: Array<string | null> = [];
  let freeSlots: number[] = [];
  let used = 0;
  let bytes = 0;

  // Scopes: index → name, records and bytes; a scope with no record left is forgotten.
  const scopeIndex = new Map<string, number>();
  const scopeNames: string[] = [];
  const scopeEntries: number[] = [];
  const scopeBytes: number[] = [];
  const freeScopes: number[] = [];

  // Expiry: a wheel of buckets, one per BUCKET_MS of expiry time, each a
  // flat array of (slot, generation) pairs (small integers: nothing for the
  // garbage collector to follow), and a min-heap of the bucket numbers in use
  // (a few thousand at most). Adding is an append to the bucket of the
  // record's expiry; a bucket is reclaimed whole once its time has passed, in
  // the order records were added. A record whose expiry moved later stays in
  // its bucket and moves when that bucket comes due; one whose expiry moved
  // earlier is added again (its old item goes stale, as do those of removed
  // records; the wheel is rebuilt when stale items pile up).
  const base = now();
  const buckets = new Map<number, number[]>();
  let bucketHeap: number[] = [];
  let items = 0;
  const bucketOf = (at: number): number => Math.ceil((at - base) / BUCKET_MS);

  const heapPush = (key: number): void => {
    let i = bucketHeap.push(key) - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (bucketHeap[parent]! <= key) break;
      bucketHeap[i] = bucketHeap[parent]!;
      i = parent;
    }
    bucketHeap[i] = key;
  };
  const heapPop = (): void => {
    const last = bucketHeap.pop()!;
    const n = bucketHeap.length;
    if (n === 0) return;
    let i = 0;
    for (;;) {
      let child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && bucketHeap[child + 1]! < bucketHeap[child]!) child++;
      if (bucketHeap[child]! >= last) break;
      bucketHeap[i] = bucketHeap[child]!;
      i = child;
    }
    bucketHeap[i] = last;
  };
  /** File `slot` under the bucket of its current expiry. */
  const file = (slot: number): void => {
    const key = bucketOf(nums[slot * NUMS + 1]!);
    let bucket = buckets.get(key);
    if (bucket === undefined) {
      bucket = [];
      buckets.set(key, bucket);
      heapPush(key);
    }
    bucket.push(slot, ints[slot * INTS + 1]!);
    ints[slot * INTS + 3] = key;
    items++;
  };
  /** A record's expiry moved: a later one stays in its bucket (moved when it comes due), an earlier one is filed again. */
  const refile = (slot: number): void => {
    if (bucketOf(nums[slot * NUMS + 1]!) < ints[slot * INTS + 3]!) file(slot);
  };
  /** Stale items pile up when records are released or deleted: rebuild the wheel from the records then. */
  const compact = (): void => {
    if (items <= 2 * used + 1024) return;
    buckets.clear();
    bucketHeap = [];
    items = 0;
    for (let slot = 0; slot < capacity; slot++) if (ints[slot * INTS] !== FREE) file(slot);
  };

  const grow = (): void => {
    const next = Math.max(1024, capacity * 2);
    const n = new Float64Array(next * NUMS);
    n.set(nums);
    nums = n;
    const i = new Int32Array(next * INTS);
    i.set(ints);
    ints = i;
    strs.length = next * STRS;
    strs.fill(null, capacity * STRS);
    capacity = next;
  };

  /** The slot of `id` (hash `h`), or -1. */
  const find = (id: string, h: number): number => {
    for (let i = h & mask; ; i = (i + 1) & mask) {
      const v = table[2 * i + 1]!;
      if (v === 0) return -1;
      if (table[2 * i] === h && strs[(v - 1) * STRS] === id) return v - 1;
    }
  };
  const link = (h: number, slot: number): void => {
    let i = h & mask;
    while (table[2 * i + 1] !== 0) i = (i + 1) & mask;
    table[2 * i] = h;
    table[2 * i + 1] = slot + 1;
  };
  /** Take `slot` out of the table, moving later entries of its run back (no tombstones). */
  const unlink = (slot: number): void => {
    let i = ints[slot * INTS + 4]! & mask;
    while (table[2 * i + 1] !== slot + 1) i = (i + 1) & mask;
    for (let j = (i + 1) & mask; table[2 * j + 1] !== 0; j = (j + 1) & mask) {
      const home = table[2 * j]! & mask;
      // The entry at j may move to i unless its home lies cyclically in (i, j].
      if (i <= j ? home <= i || home > j : home <= i && home > j) {
        table[2 * i] = table[2 * j]!;
        table[2 * i + 1] = table[2 * j + 1]!;
        i = j;
      }
    }
    table[2 * i] = 0;
    table[2 * i + 1] = 0;
  };
  const growTable = (): void => {
    const old = table;
    table = new Int32Array(old.length * 2);
    mask = old.length - 1;
    for (let i = 1; i < old.length; i += 2) if (old[i] !== 0) link(old[i - 1]!, old[i]! - 1);
  };

  const scopeSlot = (scope: string): number => {
    let s = scopeIndex.get(scope);
    if (s === undefined) {
      s = freeScopes.pop() ?? scopeNames.length;
      scopeNames[s] = scope;
      scopeEntries[s] = 0;
      scopeBytes[s] = 0;
      scopeIndex.set(scope, s);
    }
    return s;
  };

  const sizeOf = (id: string, token: string | null, scope: number, fingerprint: string | null, outcome: string | null): number =>
    RECORD_OVERHEAD_BYTES +
    2 * (id.length + (token?.length ?? 0) + scopeNames[scope]!.length + (fingerprint?.length ?? 0) + (outcome?.length ?? 0));

  const remove = (slot: number): void => {
    const s = slot * STRS;
    unlink(slot);
    const scope = ints[slot * INTS + 2]!;
    const size = nums[slot * NUMS + 2]!;
    bytes -= size;
    scopeBytes[scope]! -= size;
    if (--scopeEntries[scope]! === 0) {
      scopeIndex.delete(scopeNames[scope]!);
      freeScopes.push(scope);
    }
    ints[slot * INTS] = FREE;
    // Small integers only (its items in the wheel hold it).
    ints[slot * INTS + 1] = (ints[slot * INTS + 1]! + 1) & 0x3fffffff;
    strs[s] = null;
    strs[s + 1] = null;
    strs[s + 2] = null;
    strs[s + 3] = null;
    freeSlots.push(slot);
    used--;
  };
  const resize = (slot: number, size: number): void => {
    const scope = ints[slot * INTS + 2]!;
    const old = nums[slot * NUMS + 2]!;
    scopeBytes[scope]! += size - old;
    bytes += size - old;
    nums[slot * NUMS + 2] = size;
  };

  /** Go through one bucket's items: remove the records expired at `at` (up to `limit`), move those that expire later; answers how many it removed. */
  const sweep = (key: number, bucket: number[], at: number, limit: number): number => {
    let removed = 0;
    let kept = 0;
    let i = 0;
    for (; i < bucket.length && removed < limit; i += 2) {
      const slot = bucket[i]!;
      const gen = bucket[i + 1]!;
      items--;
      if (ints[slot * INTS + 1] !== gen || ints[slot * INTS] === FREE || ints[slot * INTS + 3] !== key) continue;
      const expires = nums[slot * NUMS + 1]!;
      if (expires <= at) {
        remove(slot);
        removed++;
      } else if (bucketOf(expires) !== key) {
        file(slot);
      } else {
        // Same bucket, not expired yet (a bucket swept before its time): it stays.
        bucket[kept++] = slot;
        bucket[kept++] = gen;
        items++;
      }
    }
    // What the limit left unswept stays, after what was kept.
    for (; i < bucket.length; i++) bucket[kept++] = bucket[i]!;
    bucket.length = kept;
    return removed;
  };

  /**
   * Remove up to `limit` expired records, oldest buckets first; answers how
   * many. Whole buckets go once their time has passed; `thorough` also
   * looks through the bucket whose time has not passed yet, for records that
   * expired in it already (before a refusal, and when purging).
   */
  const reclaim = (at: number, limit: number, thorough: boolean): number => {
    let removed = 0;
    while (removed < limit && bucketHeap.length > 0) {
      const key = bucketHeap[0]!;
      if (base + key * BUCKET_MS > at) break;
      const bucket = buckets.get(key)!;
      removed += sweep(key, bucket, at, limit - removed);
      if (bucket.length > 0) break;
      buckets.delete(key);
      heapPop();
    }
    if (thorough && removed < limit) {
      const key = bucketOf(at);
      const bucket = buckets.get(key);
      if (bucket !== undefined) removed += sweep(key, bucket, at, limit - removed);
    }
    return removed;
  };

  /** The slot of a record within its retention (an expired one is removed), or -1. */
  const live = (id: string, h: number, at: number): number => {
    const slot = find(id, h);
    if (slot < 0) return -1;
    if (nums[slot * NUMS + 1]! <= at) {
      remove(slot);
      return -1;
    }
    return slot;
  };

  const create = (id: string, h: number, input: ClaimInput, at: number): ClaimResult => {
    const scope = input.scope ?? '';
    const token = newToken();
    const fingerprint = input.fingerprint === null ? null : flat(input.fingerprint);
    const size = RECORD_OVERHEAD_BYTES + 2 * (id.length + token.length + scope.length + (fingerprint?.length ?? 0));
    let known = scopeIndex.get(scope);
    if (
      used + 1 > maxEntries ||
      bytes + size > maxBytes ||
      (known !== undefined && (scopeEntries[known]! + 1 > maxEntriesPerScope || scopeBytes[known]! + size > maxBytesPerScope)) ||
      (known === undefined && (1 > maxEntriesPerScope || size > maxBytesPerScope))
    ) {
      // Every expired record goes before a refusal, whoever it belongs to.
      reclaim(at, Number.POSITIVE_INFINITY, true);
      if (used + 1 > maxEntries || bytes + size > maxBytes) {
        throw new StoreFullError('The idempotency store is full of records within their retention; nothing was done.');
      }
      known = scopeIndex.get(scope);
      const held = known === undefined ? 0 : scopeEntries[known]!;
      const heldBytes = known === undefined ? 0 : scopeBytes[known]!;
      if (held + 1 > maxEntriesPerScope || heldBytes + size > maxBytesPerScope) {
        throw new StoreFullError(
          "This caller's share of the idempotency store is full of records within their retention; nothing was done.",
        );
      }
    }
    if (used === capacity) grow();
    if (2 * (used + 1) > mask + 1) growTable();
    const slot = freeSlots.length > 0 ? freeSlots.pop()! : used;
    const scopeAt = scopeSlot(scope);
    const until = at + input.leaseMs;
    const n = slot * NUMS;
    nums[n] = until;
    nums[n + 1] = at + Math.max(input.ttlMs, input.leaseMs);
    nums[n + 2] = size;
    const k = slot * INTS;
    ints[k] = IN_PROGRESS;
    ints[k + 2] = scopeAt;
    ints[k + 4] = h;
    const s = slot * STRS;
    strs[s] = id;
    strs[s + 1] = token;
    strs[s + 2] = fingerprint;
    strs[s + 3] = null;
    link(h, slot);
    used++;
    bytes += size;
    scopeEntries[scopeAt]!++;
    scopeBytes[scopeAt]! += size;
    file(slot);
    compact();
    return { status: 'acquired', token, takeover: false, leaseUntil: until };
  };

  const claimSync = (id: string, input: ClaimInput): ClaimResult => {
    const at = now();
    // A few expired records go on every claim (more than a claim adds, so
    // the store keeps itself clean without a timer, in bounded time per call).
    if (bucketHeap.length > 0 && base + bucketHeap[0]! * BUCKET_MS <= at) reclaim(at, RECLAIM_PER_CLAIM, false);
    const h = hashOf(id, seed);
    const slot = live(id, h, at);
    if (slot < 0) return create(id, h, input, at);
    const n = slot * NUMS;
    const s = slot * STRS;
    if (ints[slot * INTS] === COMPLETED) {
      return {
        status: 'completed',
        record: { state: 'completed', fingerprint: strs[s + 2]!, outcome: strs[s + 3] ?? '', expiresAt: nums[n + 1]! },
      };
    }
    if (nums[n]! <= at && strs[s + 2] === input.fingerprint) {
      // A takeover keeps the record (and its place in its scope's share).
      const token = newToken();
      strs[s + 1] = token;
      nums[n] = at + input.leaseMs;
      nums[n + 1] = Math.max(nums[n + 1]!, at + Math.max(input.ttlMs, input.leaseMs));
      resize(slot, sizeOf(id, token, ints[slot * INTS + 2]!, strs[s + 2]!, null));
      return { status: 'acquired', token, takeover: true, leaseUntil: nums[n]! };
    }
    return { status: 'in_progress', fingerprint: strs[s + 2]!, leaseUntil: nums[n]!, now: at };
  };

  /** The slot of a live record in progress under `token`, or -1. */
  const owned = (id: string, token: string): number => {
    const slot = live(id, hashOf(id, seed), now());
    return slot >= 0 && ints[slot * INTS] === IN_PROGRESS && strs[slot * STRS + 1] === token ? slot : -1;
  };

  return {
    name: 'memory',
    capabilities: CAPABILITIES,
    get size() {
      return used;
    },
    get bytes() {
      return bytes;
    },
    usage(scope) {
      const s = scopeIndex.get(scope);
      return s === undefined ? { entries: 0, bytes: 0 } : { entries: scopeEntries[s]!, bytes: scopeBytes[s]! };
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
            const slot = owned(ids[i]!, result.token);
            if (slot >= 0) remove(slot);
          }
        }
        throw error;
      }
      return results;
    },
    async renew(id, token, leaseMs) {
      const slot = owned(id, token);
      if (slot < 0) return false;
      const n = slot * NUMS;
      nums[n] = now() + leaseMs;
      // A later expiry stays in its bucket (see the wheel).
      if (nums[n]! > nums[n + 1]!) nums[n + 1] = nums[n]!;
      return true;
    },
    async complete(id, token, outcome, ttlMs) {
      const slot = owned(id, token);
      if (slot < 0) return false;
      // Stored even beyond a bound: the operation ran, and dropping its
      // outcome would run it again. The bound refuses the next new claim.
      // The token is dropped (a completed record is final) but still counted.
      const s = slot * STRS;
      resize(slot, sizeOf(id, token, ints[slot * INTS + 2]!, strs[s + 2]!, outcome));
      ints[slot * INTS] = COMPLETED;
      strs[s + 1] = null;
      strs[s + 3] = flat(outcome);
      nums[slot * NUMS + 1] = now() + ttlMs;
      refile(slot);
      return true;
    },
    async release(id, token) {
      const slot = owned(id, token);
      if (slot < 0) return false;
      remove(slot);
      return true;
    },
    async get(id): Promise<StoredRecord | null> {
      const slot = live(id, hashOf(id, seed), now());
      if (slot < 0) return null;
      const n = slot * NUMS;
      const s = slot * STRS;
      return ints[slot * INTS] === COMPLETED
        ? { state: 'completed', fingerprint: strs[s + 2]!, outcome: strs[s + 3] ?? '', expiresAt: nums[n + 1]! }
        : { state: 'in_progress', fingerprint: strs[s + 2]!, leaseUntil: nums[n]!, expiresAt: nums[n + 1]! };
    },
    async delete(id) {
      const slot = find(id, hashOf(id, seed));
      if (slot < 0) return false;
      const until = nums[slot * NUMS + 1]!;
      remove(slot);
      return until > now();
    },
    async purgeExpired(limit) {
      return reclaim(now(), Math.max(0, Math.floor(limit)), true);
    },
    async close() {
      table = new Int32Array(2 * 1024);
      mask = 1023;
      scopeIndex.clear();
      scopeNames.length = 0;
      scopeEntries.length = 0;
      scopeBytes.length = 0;
      freeScopes.length = 0;
      capacity = 0;
      nums = new Float64Array(0);
      ints = new Int32Array(0);
      strs = [];
      freeSlots = [];
      used = 0;
      bytes = 0;
      buckets.clear();
      bucketHeap = [];
      items = 0;
    },
  };
}
