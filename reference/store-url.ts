/**
 * `STORE_URL` → an idempotency store, with the client it needs.
 *
 * - `memory:`: in-process (records are lost on restart);
 * - `sqlite:<path>` (default `sqlite:./data/oncely.db`): embedded, the file's
 *   directory is created when missing; the file, its -wal and -shm get mode 0600;
 * - `redis://…` / `rediss://…`: ioredis;
 * - `postgres://…` / `postgresql://…`: a `pg` Pool, table created when missing;
 * - `mysql://…`: a mysql2 pool.
 *
 * Network clients are created fail-fast (no offline queue, short connect
 * timeouts), so that an unreachable store shows as a 503 from oncely rather
 * than requests hanging; each is connected (and migrated) before the
 * server listens, and closed by {@link OpenedStore.close}.
 *
 * @module
 */
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import type { IdempotencyStore } from 'oncely';
import { prepareDbFile, redact, restrictDbFiles } from './db.js';

/** The default store: embedded SQLite under ./data. */
export const DEFAULT_STORE_URL = 'sqlite:./data/oncely.db';

/** A store opened from a URL, and how to close it and its client. */
export interface OpenedStore {
  store: IdempotencyStore;
  /** `memory`, `sqlite`, `redis`, `postgres` or `mysql`. */
  kind: string;
  /** The URL without its password, for logs. */
  description: string;
  /** Close the store, then its client. */
  close(): Promise<void>;
}

/** How long a network store client may take to connect, ms. */
const CONNECT_TIMEOUT_MS = 2_000;

/**
 * Open the store named by `url` (see the module documentation).
 *
 * @throws Error for an unknown scheme, or when the store cannot be reached.
 */
export async function openStore(url: string = DEFAULT_STORE_URL): Promise<OpenedStore> {
  if (url === 'memory:' || url === 'memory') {
    const { memoryStore } = await import('oncely/stores/memory');
    const store = memoryStore();
    return { store, kind: 'memory', description: 'memory:', close: () => store.close() };
  }
  if (url.startsWith('sqlite:')) {
    let path = url.slice('sqlite:'.length);
    if (path.startsWith('//')) path = path.slice(2); // sqlite://./x.db
    if (path === '') throw new Error('STORE_URL sqlite: needs a file path, e.g. sqlite:./data/oncely.db');
    const onDisk = path !== ':memory:';
    if (onDisk) {
      mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
      prepareDbFile(path);
    }
    const [{ default: Database }, { sqliteStore }] = await Promise.all([
      import('better-sqlite3'),
      import('oncely/stores/sqlite'),
    ]);
    const database = new Database(path);
    const store = sqliteStore({ database });
    // After the switch to WAL: -wal and -shm exist now.
    if (onDisk) restrictDbFiles(path);
    return {
      store,
      kind: 'sqlite',
      description: `sqlite:${path}`,
      async close() {
        await store.close();
        database.close();
      },
    };
  }
  if (url.startsWith('redis://') || url.startsWith('rediss://')) {
    const [{ Redis }, { redisStore }] = await Promise.all([import('ioredis'), import('oncely/stores/redis')]);
    const client = new Redis(url, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      connectTimeout: CONNECT_TIMEOUT_MS,
      // Keep reconnecting in the background; commands fail at once meanwhile (503).
      retryStrategy: (times) => Math.min(times * 200, 2_000),
    });
    let lastError: Error | undefined;
    client.on('error', (error: Error) => {
      lastError = error; // afterwards reported per request as a 503 by oncely
    });
    try {
      await client.connect();
    } catch (error) {
      client.disconnect();
      throw new Error(`cannot reach Redis at ${redact(url)}: ${(lastError ?? (error as Error)).message}`);
    }
    const store = redisStore({ client });
    return {
      store,
      kind: 'redis',
      description: redact(url),
      async close() {
        await store.close();
        await client.quit().catch(() => client.disconnect());
      },
    };
  }
  if (url.startsWith('postgres://') || url.startsWith('postgresql://')) {
    const [{ default: pg }, { postgresStore, migratePostgres }] = await Promise.all([
      import('pg'),
      import('oncely/stores/postgres'),
    ]);
    const pool = new pg.Pool({
      connectionString: url,
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      query_timeout: 5_000,
      max: 20,
    });
    pool.on('error', () => {}); // an idle connection dropped by the server must not crash the process
    try {
      await migratePostgres(pool);
    } catch (error) {
      await pool.end().catch(() => {});
      throw new Error(`cannot reach PostgreSQL at ${redact(url)}: ${(error as Error).message}`);
    }
    const store = postgresStore({ pool });
    return {
      store,
      kind: 'postgres',
      description: redact(url),
      async close() {
        await store.close();
        await pool.end();
      },
    };
  }
  if (url.startsWith('mysql://') || url.startsWith('mariadb://')) {
    return openMysql(url);
  }
  throw new Error(
    `STORE_URL ${JSON.stringify(redact(url))} is not supported: use memory:, sqlite:<path>, redis://, postgres:// or mysql://`,
  );
}

/** mysql:// (and mariadb://): a mysql2/promise pool, table created when missing. */
async function openMysql(url: string): Promise<OpenedStore> {
  const [{ default: mysql }, { mysqlStore, migrateMysql }] = await Promise.all([
    import('mysql2/promise'),
    import('oncely/stores/mysql'),
  ]);
  const u = new URL(url);
  u.protocol = 'mysql:';
  const pool = mysql.createPool({ uri: u.toString(), connectTimeout: CONNECT_TIMEOUT_MS, connectionLimit: 20 });
  // mysql2 pools emit errors of idle connections on the pool's connections; a crash is not the answer.
  pool.on('connection', (connection) => connection.on('error', () => {}));
  try {
    await migrateMysql(pool);
  } catch (error) {
    await pool.end().catch(() => {});
    throw new Error(`cannot reach MySQL at ${redact(url)}: ${(error as Error).message}`);
  }
  const store = mysqlStore({ pool });
  return {
    store,
    kind: 'mysql',
    description: redact(url),
    async close() {
      await store.close();
      await pool.end();
    },
  };
}
