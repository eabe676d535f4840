/**
 * Builds the oncely store a server runs on
 * (`STORE=memory|sqlite|redis|postgres|mariadb`), wrapped in a counting
 * proxy so that the harness can report store calls per request. The wrapper
 * is one plain object made once (no Proxy, no per-call allocation), so it
 * costs a counter increment per call. The SQL stores' pools are wrapped too,
 * so that statements (round trips) are counted, and they report the
 * database side of their connections (PostgreSQL backend pids, MariaDB
 * connection ids) for the harness to read their CPU time.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { IdempotencyStore } from 'oncely';

export type StoreKind = 'memory' | 'sqlite' | 'redis' | 'postgres' | 'mariadb';

/** Store calls so far, by operation. */
export type StoreCounts = Record<string, number>;

/** Wrap `store` so that every operation is counted in `counts`. */
export function countingStore(store: IdempotencyStore, counts: StoreCounts): IdempotencyStore {
  for (const op of ['claim', 'claimMany', 'renew', 'complete', 'release', 'get', 'delete', 'purgeExpired']) counts[op] = 0;
  counts.heartbeat = 0;
  // Sessions and transactions pass through, as the engine uses them on the
  // real store (a server without them would measure less than users run).
  const sessions = store.sessions;
  return {
    name: store.name,
    capabilities: store.capabilities,
    ...(sessions
      ? {
          sessions: {
            heartbeat: (session, ttlMs) => {
              counts.heartbeat! += 1;
              return sessions.heartbeat(session, ttlMs);
            },
            alive: (session) => sessions.alive(session),
            end: (session) => sessions.end(session),
          },
        }
      : {}),
    ...(store.transactions ? { transactions: store.transactions } : {}),
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
  /** Where the store's own CPU time can be read: PostgreSQL backend pids, MariaDB connection ids. */
  backends?(): { pg?: number[]; mysql?: number[] };
  /** Close the store, its client and remove what it left (temp file, Redis keys). */
  cleanup(): Promise<void>;
}

/** Make the store named by `kind`. Redis keys start with `prefix`. */
export async function makeStore(kind: StoreKind, prefix: string): Promise<BenchStore> {
  const counts: StoreCounts = {};
  if (kind === 'memory') {
    const { memoryStore } = await import('oncely/stores/memory');
    // Room for every new key of a long run (the default bound, 100 000 records, would refuse them).
    const store = memoryStore({ maxEntries: 1_000_000, maxBytes: 1024 * 1024 * 1024 });
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
  if (kind === 'postgres') {
    const { default: pg } = await import('pg');
    const { migratePostgres, postgresStore } = await import('oncely/stores/postgres');
    const table = `oncely_bench_${prefix.replace(/\W/g, '_')}`.slice(0, 60);
    // Connections kept open (no idle timeout): their backends' CPU is read per round.
    const pool = new pg.Pool({
      host: process.env.PGHOST ?? '127.0.0.1',
      port: Number(process.env.PGPORT ?? 5432),
      user: process.env.PGUSER ?? 'postgres',
      database: process.env.PGDATABASE ?? 'test',
      max: Number(process.env.POOL ?? 10),
      idleTimeoutMillis: 0,
      connectionTimeoutMillis: 5000,
    });
    pool.on('error', () => {});
    const pids = new Set<number>();
    pool.on('connect', (client) => {
      const pid = (client as unknown as { processID?: number }).processID;
      if (typeof pid === 'number') pids.add(pid);
    });
    await migratePostgres(pool, { table });
    counts.statements = 0;
    const counted = {
      query: (config: import('oncely/stores/postgres').PgQueryConfig) => {
        counts.statements! += 1;
        return pool.query(config as unknown as string) as unknown as ReturnType<import('oncely/stores/postgres').PgQueryable['query']>;
      },
    };
    const store = postgresStore({ pool: counted, table });
    return {
      store: countingStore(store, counts),
      counts,
      backends: () => ({ pg: [...pids] }),
      cleanup: async () => {
        await store.close();
        await pool.query(`DROP TABLE IF EXISTS "${table}"`);
        await pool.end();
      },
    };
  }
  if (kind === 'mariadb') {
    const mysql = await import('mysql2/promise');
    const { migrateMysql, mysqlStore } = await import('oncely/stores/mysql');
    const table = `oncely_bench_${prefix.replace(/\W/g, '_')}`.slice(0, 60);
    const pool = mysql.createPool({
      host: process.env.MYSQL_HOST ?? '127.0.0.1',
      port: Number(process.env.MYSQL_PORT ?? 3306),
      user: process.env.MYSQL_USER ?? 'root',
      database: process.env.MYSQL_DATABASE ?? 'test',
      connectionLimit: Number(process.env.POOL ?? 10),
      maxIdle: Number(process.env.POOL ?? 10),
      idleTimeout: 3_600_000,
    });
    const ids = new Set<number>();
    pool.pool.on('connection', (connection) => {
      const id = (connection as unknown as { threadId?: number }).threadId;
      if (typeof id === 'number') ids.add(id);
    });
    await migrateMysql(pool, { table });
    counts.statements = 0;
    type Values = import('oncely/stores/mysql').MysqlValue[] | undefined;
    const counted = {
      execute: (sql: string, values?: Values) => {
        counts.statements! += 1;
        return pool.execute(sql, values) as Promise<[unknown, unknown]>;
      },
      query: (sql: string, values?: Values) => {
        counts.statements! += 1;
        return pool.query(sql, values) as Promise<[unknown, unknown]>;
      },
    };
    const store = mysqlStore({ pool: counted, table });
    return {
      store: countingStore(store, counts),
      counts,
      backends: () => ({ mysql: [...ids] }),
      cleanup: async () => {
        await store.close();
        await pool.query(`DROP TABLE IF EXISTS \`${table}\``);
        await pool.end();
      },
    };
  }
  const { Redis } = await import('ioredis');
  const { redisStore } = await import('oncely/stores/redis');
  // Fail fast while Redis is down, as the store's docs recommend.
  const client = new Redis({
    host: '127.0.0.1',
    port: Number(process.env.REDIS_PORT ?? 6379),
    connectionName: prefix,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    lazyConnect: true,
  });
  // A Redis stopped under a server at the end of a run is not news.
  client.on('error', () => {});
  await client.connect();
  // Commands as sent (a script's own commands run inside Redis and are not round trips).
  const send = client.sendCommand.bind(client);
  client.sendCommand = ((command: { name: string }, stream?: unknown) => {
    const key = `cmd:${command.name}`;
    counts[key] = (counts[key] ?? 0) + 1;
    return send(command as Parameters<typeof send>[0], stream as Parameters<typeof send>[1]);
  }) as typeof client.sendCommand;
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
