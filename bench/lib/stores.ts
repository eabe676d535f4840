/**
 * Builds the oncely store a server runs on (`STORE=memory|sqlite|redis`),
 * wrapped in a counting proxy so that the harness can report store round
 * trips per request. The wrapper is one plain object made once (no Proxy,
 * no per-call allocation), so it costs a counter increment per call.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { IdempotencyStore } from 'oncely';

export type StoreKind = 'memory' | 'sqlite' | 'redis';

/** Store calls so far, by operation. */
export type StoreCounts = Record<string, number>;

/** Wrap `store` so that every operation is counted in `counts`. */
export function countingStore(store: IdempotencyStore, counts: StoreCounts): IdempotencyStore {
  for (const op of ['claim', 'claimMany', 'renew', 'complete', 'release', 'get', 'delete', 'purgeExpired']) counts[op] = 0;
  return {
    name: store.name,
    capabilities: store.capabilities,
    claim: (id, input) => {
      counts.claim! += 1;
      return store.claim(id, input);
    },
    renew: (id, token, leaseMs) => {
      counts.renew! += 1;
      return store.renew(id, token, leaseMs);
    },
    complete: (id, token, outcome, ttlMs) => {
      counts.complete! += 1;
      return store.complete(id, token, outcome, ttlMs);
    },
    release: (id, token) => {
      counts.release! += 1;
      return store.release(id, token);
    },
    get: (id) => {
      counts.get! += 1;
      return store.get(id);
    },
    delete: (id) => {
      counts.delete! += 1;
      return store.delete(id);
    },
    purgeExpired: (limit) => {
      counts.purgeExpired! += 1;
      return store.purgeExpired(limit);
    },
    close: () => store.close(),
  };
}

export interface BenchStore {
  store: IdempotencyStore;
  counts: StoreCounts;
  /** Close the store, its client and remove what it left (temp file, Redis keys). */
  cleanup(): Promise<void>;
}

/** Make the store named by `kind`. Redis keys start with `prefix`. */
export async function makeStore(kind: StoreKind, prefix: string): Promise<BenchStore> {
  const counts: StoreCounts = {};
  if (kind === 'memory') {
    const { memoryStore } = await import('oncely/stores/memory');
    const store = memoryStore();
    return { store: countingStore(store, counts), counts, cleanup: () => store.close() };
  }
  if (kind === 'sqlite') {
    const { default: Database } = await import('better-sqlite3');
    const { sqliteStore } = await import('oncely/stores/sqlite');
    const dir = mkdtempSync(join(tmpdir(), 'oncely-bench-'));
    const database = new Database(join(dir, 'bench.db'));
    const store = sqliteStore({ database });
    return {
      store: countingStore(store, counts),
      counts,
      cleanup: async () => {
        await store.close();
        database.close();
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  const { Redis } = await import('ioredis');
  const { redisStore } = await import('oncely/stores/redis');
  // Fail fast while Redis is down, as the store's docs recommend.
  const client = new Redis({
    host: '127.0.0.1',
    port: 6379,
    connectionName: prefix,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    lazyConnect: true,
  });
  await client.connect();
  const store = redisStore({ client, prefix });
  return {
    store: countingStore(store, counts),
    counts,
    cleanup: async () => {
      await store.close();
      await deleteKeys(client, `${prefix}*`);
      client.disconnect();
    },
  };
}

/** SCAN and delete the keys matching `pattern` (never FLUSHDB: Redis is shared). */
export async function deleteKeys(
  client: import('ioredis').Redis,
  pattern: string,
): Promise<number> {
  let cursor = '0';
  let deleted = 0;
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
    cursor = next;
    if (keys.length > 0) deleted += await client.del(...keys);
  } while (cursor !== '0');
  return deleted;
}
