import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CompletedRecord, IdempotencyStore } from '../engine/store.js';
import { ConfigError } from '../errors/index.js';
import { defineStoreConformance } from '../testing/index.js';
import { memoryStore } from './memory.js';
import { ReplayCache, type ReplayCacheOptions, withReplayCache } from './replay-cache.js';
import { sqliteStore } from './sqlite.js';

const record = (outcome: string, expiresAt: number): CompletedRecord => ({ state: 'completed', fingerprint: 'fp', outcome, expiresAt });

describe('ReplayCache', () => {
  it('answers a record until the earlier of its expiry and its maximum age', () => {
    let now = 1_000;
    const cache = new ReplayCache({ maxAgeMs: 100, now: () => now });
    cache.put('long', record('a', 10_000));
    cache.put('short', record('b', 1_050));
    expect(cache.get('long')?.outcome).toBe('a');
    expect(cache.get('short')?.outcome).toBe('b');
    now = 1_050;
    expect(cache.get('short')).toBeUndefined();
    expect(cache.get('long')?.outcome).toBe('a');
    now = 1_100;
    expect(cache.get('long')).toBeUndefined();
    expect(cache.size).toBe(0);
  });

  it('drops the oldest entries beyond maxEntries or maxBytes', () => {
    const cache = new ReplayCache({ maxEntries: 2, maxBytes: 1_000 });
    cache.put('a', record('x', Date.now() + 60_000));
    cache.put('b', record('x', Date.now() + 60_000));
    cache.put('c', record('x', Date.now() + 60_000));
    expect([cache.get('a'), cache.get('b')?.outcome, cache.get('c')?.outcome]).toEqual([undefined, 'x', 'x']);
    // 300 UTF-16 units count 600 bytes: two do not fit in 1,000.
    cache.put('d', record('y'.repeat(300), Date.now() + 60_000));
    cache.put('e', record('z'.repeat(300), Date.now() + 60_000));
    expect(cache.get('d')).toBeUndefined();
    expect(cache.get('e')?.outcome).toHaveLength(300);
    // Larger than the whole budget: never kept, nothing else dropped for it.
    cache.put('huge', record('h'.repeat(600), Date.now() + 60_000));
    expect(cache.get('huge')).toBeUndefined();
    expect(cache.get('e')).toBeDefined();
  });

  it('replaces an entry put twice and forgets deleted ones', () => {
    const cache = new ReplayCache();
    cache.put('a', record('1', Date.now() + 60_000));
    cache.put('a', record('2', Date.now() + 60_000));
    expect(cache.size).toBe(1);
    expect(cache.get('a')?.outcome).toBe('2');
    cache.delete('a');
    cache.delete('never');
    expect(cache.get('a')).toBeUndefined();
    cache.put('b', record('3', Date.now() + 60_000));
    cache.clear();
    expect(cache.size).toBe(0);
  });

  it('refuses bounds that are not positive', () => {
    expect(() => new ReplayCache({ maxEntries: 0 })).toThrow(ConfigError);
    expect(() => new ReplayCache({ maxBytes: -1 })).toThrow(ConfigError);
    expect(() => new ReplayCache({ maxAgeMs: Number.NaN })).toThrow(ConfigError);
  });
});

const newId = (): string => randomBytes(32).toString('hex');
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const INPUT = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };

// Real stores the wrapper goes in front of: memory, and SQLite on an
// in-memory better-sqlite3 database.
const databases: Database.Database[] = [];
const backends: Record<string, () => IdempotencyStore> = {
  memory: () => memoryStore(),
  sqlite: () => {
    const database = new Database(':memory:');
    databases.push(database);
    return sqliteStore({ database, purgeIntervalMs: 0 });
  },
};
afterAll(() => {
  for (const database of databases) if (database.open) database.close();
});

for (const [name, make] of Object.entries(backends)) {
  // The wrapper keeps the store contract.
  defineStoreConformance({ describe, it, beforeAll, afterAll }, { name: `${name} with a replay cache`, store: () => withReplayCache(make()) });
}

describe.each(Object.keys(backends))('withReplayCache over %s', (name) => {
  const open = (options?: ReplayCacheOptions) => {
    const inner = backends[name]!();
    return { inner, store: withReplayCache(inner, options) };
  };
  /** An id completed with `outcome` through `store`. */
  const completed = async (store: IdempotencyStore, outcome: string): Promise<string> => {
    const id = newId();
    const claim = await store.claim(id, INPUT);
    if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
    expect(await store.complete(id, claim.token, outcome, 60_000)).toBe(true);
    return id;
  };

  it('answers the copies of a replayed id from the cache, and never caches a fresh completion', async () => {
    const { inner, store } = open();
    expect(store.name).toBe(inner.name);
    expect(store.capabilities).toBe(inner.capabilities);
    // Completed but never replayed: deleted behind the wrapper's back, it runs again.
    const fresh = await completed(store, 'fresh');
    await inner.delete(fresh);
    expect((await store.claim(fresh, INPUT)).status).toBe('acquired');
    // Replayed once through the wrapper: the next copies come from the cache,
    // even with the record gone from the store underneath.
    const id = await completed(store, 'the answer');
    expect(await store.claim(id, INPUT)).toMatchObject({ status: 'completed', record: { outcome: 'the answer' } });
    await inner.delete(id);
    expect(await store.claim(id, { ...INPUT, fingerprint: 'v1:other' })).toMatchObject({
      status: 'completed',
      record: { outcome: 'the answer', fingerprint: 'v1:fp' },
    });
    // get is for inspection: it always asks the store.
    expect(await store.get(id)).toBeNull();
  });

  it('forgets an id deleted through it', async () => {
    const { store } = open();
    const id = await completed(store, 'x');
    expect((await store.claim(id, INPUT)).status).toBe('completed');
    expect(await store.delete(id)).toBe(true);
    expect((await store.claim(id, INPUT)).status).toBe('acquired');
  });

  it('does not cache a replay started before a delete of its id, in the same turn', async () => {
    const { store } = open();
    const id = await completed(store, 'x');
    const claim = store.claim(id, INPUT);
    const deleted = store.delete(id);
    expect((await claim).status).toBe('completed');
    expect(await deleted).toBe(true);
    expect((await store.claim(id, INPUT)).status).toBe('acquired');
  });

  it('does not cache a replay whose answer comes back after the delete finished', async () => {
    const inner = backends[name]!();
    // The store answers the claim at once but the reply takes 30 ms to come back.
    const slowReplies: IdempotencyStore = {
      ...inner,
      claim: async (id, input) => {
        const result = await inner.claim(id, input);
        await sleep(30);
        return result;
      },
    };
    const store = withReplayCache(slowReplies);
    const id = await completed(store, 'x');
    const claim = store.claim(id, INPUT);
    await sleep(5);
    expect(await store.delete(id)).toBe(true);
    expect((await claim).status).toBe('completed');
    expect((await store.claim(id, INPUT)).status).toBe('acquired');
  });

  it('does not cache a replay that read the record while its delete was still on the way', async () => {
    const inner = backends[name]!();
    // The delete reaches the store 30 ms after it was asked for.
    const slowDeletes: IdempotencyStore = {
      ...inner,
      delete: async (id) => {
        await sleep(30);
        return inner.delete(id);
      },
    };
    const store = withReplayCache(slowDeletes);
    const id = await completed(store, 'x');
    const deleted = store.delete(id);
    expect((await store.claim(id, INPUT)).status).toBe('completed');
    expect(await deleted).toBe(true);
    expect((await store.claim(id, INPUT)).status).toBe('acquired');
  });

  it('drops an entry after maxAgeMs', async () => {
    const { inner, store } = open({ maxAgeMs: 50 });
    const id = await completed(store, 'x');
    expect((await store.claim(id, INPUT)).status).toBe('completed');
    await inner.delete(id);
    expect((await store.claim(id, INPUT)).status).toBe('completed');
    await sleep(80);
    expect((await store.claim(id, INPUT)).status).toBe('acquired');
  });

  it('forwards claimMany and caches the replays it sees', async () => {
    const { inner, store } = open();
    const done = await completed(store, 'done');
    const fresh = newId();
    const results = await store.claimMany!([done, fresh, fresh], INPUT);
    expect(results.map((r) => r.status)).toEqual(['completed', 'acquired', 'in_progress']);
    await inner.delete(done);
    expect((await store.claim(done, INPUT)).status).toBe('completed');
  });

  it('offers claimMany only when the store does, and closes the store', async () => {
    const inner = backends[name]!();
    const { claimMany: _, ...single } = inner;
    expect(withReplayCache(single).claimMany).toBeUndefined();
    let closed = 0;
    const store = withReplayCache({
      ...inner,
      close: async () => {
        closed++;
        await inner.close();
      },
    });
    await store.close();
    expect(closed).toBe(1);
  });
});
