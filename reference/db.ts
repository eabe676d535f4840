/**
 * The reference system's business data (payments, trades, users, orders,
 * reservations, the ledger) behind a small data-access layer, on one of
 * three databases named by `DATABASE_URL`:
 *
 * - `sqlite:<path>` (default `<DATA_DIR>/reference.db`): better-sqlite3, WAL;
 * - `postgres://…` / `postgresql://…`: a `pg` Pool;
 * - `mysql://…` / `mariadb://…`: a mysql2 pool.
 *
 * Statements are written once with `?` placeholders (rewritten to `$n` for
 * PostgreSQL); where the dialects disagree (the schema, `INSERT … ON
 * CONFLICT DO NOTHING`, the inbox) each has its own few lines here. Every
 * table name carries an optional prefix, so that parallel tests on one
 * server each have their own tables.
 *
 * Payments, trades and orders carry the idempotency record id of the request
 * that created them, UNIQUE per account. In plain mode (the business
 * database is not the store's) that is what lets a handler re-executed after
 * a crash find the row its predecessor committed. In transactional mode the
 * rows commit with the record's completion, and the constraint stays as
 * defence in depth only (see docs/reference.md).
 *
 * @module
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type BetterSqlite3 from 'better-sqlite3';
import type { Pool as MysqlPool } from 'mysql2/promise';
import { type Inbox, inbox, postgresInbox, sqliteInbox } from 'oncely/consumer/inbox';
import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
import { postgresSchemaSql } from 'oncely/stores/postgres';
import { sqliteTransaction } from 'oncely/stores/sqlite';
import type { Pool as PgPool } from 'pg';

/** The three databases the reference runs on. */
export type Dialect = 'sqlite' | 'postgres' | 'mysql';

/** A statement parameter. */
export type SqlValue = string | number | null;

/**
 * Runs statements, with `?` placeholders in every dialect: the pool, a
 * transaction of the reference's own, or (transactional mode) the store's
 * open transaction.
 */
export interface Sql {
  /** Every row of a query. */
  all<R>(sql: string, params?: readonly SqlValue[]): Promise<R[]>;
  /** The first row of a query, if any. */
  get<R>(sql: string, params?: readonly SqlValue[]): Promise<R | undefined>;
  /** Run a write; answers how many rows it changed (matched, on MySQL). */
  run(sql: string, params?: readonly SqlValue[]): Promise<number>;
}

/** The table names, prefixed. */
export interface Tables {
  payments: string;
  trades: string;
  users: string;
  orders: string;
  reservations: string;
  ledgerOutbox: string;
  ledgerEntries: string;
  /** The ledger inbox's idempotency records (an oncely records table, and `<name>_sessions`). */
  ledgerRecords: string;
}

/** The business database: statements through its pool, transactions, and what differs per dialect. */
export interface BusinessDb extends Sql {
  readonly dialect: Dialect;
  /** The table prefix (`''` by default). */
  readonly prefix: string;
  readonly tables: Tables;
  /** The URL it was opened with (`sqlite:<path>` for the file). */
  readonly url: string;
  /** That URL without its password, for logs. */
  readonly description: string;
  /**
   * Run `fn` in one transaction of this database's own (`BEGIN IMMEDIATE`
   * on SQLite). `fn` must use only `tx`: on SQLite the pool waits for the
   * transaction, so a statement on the pool inside it would never run.
   */
  transaction<T>(fn: (tx: Sql) => Promise<T>): Promise<T>;
  /**
   * Statements over a driver handle the store handed out in transactional
   * mode (`req.idempotency.transaction()`): a `pg` client, a mysql2
   * connection. They commit with the record's completion.
   */
  over(handle: unknown): Sql;
  /** `INSERT INTO table (columns) VALUES (?, …)` that does nothing when a unique key already exists. */
  insertIgnore(table: string, columns: readonly string[]): string;
  /** True when `error` is this database refusing a duplicate in a unique index. */
  isUniqueViolation(error: unknown): boolean;
  /**
   * The transactional inbox: run one write for `messageId` once per
   * `consumer`, in one transaction with the processed-id row (oncely's
   * `postgresInbox` / `sqliteInbox`; on MySQL the same few statements here).
   * Answers false for a duplicate.
   */
  applyOnce(consumer: string, messageId: string, sql: string, params: readonly SqlValue[]): Promise<boolean>;
  close(): Promise<void>;
}

/** Options of {@link openBusinessDb}. */
export interface BusinessDbOptions {
  /** `sqlite:<path>`, `postgres://…` or `mysql://…`; default `sqlite:<dataDir>/reference.db`. */
  url?: string;
  /** Directory of the default SQLite file [`DATA_DIR`, default `./data`]. */
  dataDir?: string;
  /** Prefix of every table name: letters, digits, `_` (tests use one per run). */
  prefix?: string;
}

/** The default business database: `reference.db` in `dataDir`. */
export function defaultDatabaseUrl(dataDir = './data'): string {
  return `sqlite:${join(dataDir, 'reference.db')}`;
}

/** How long a network database client may take to connect, ms. */
const CONNECT_TIMEOUT_MS = 2_000;

const PREFIX = /^[A-Za-z][A-Za-z0-9_]{0,23}$/;

function tablesOf(prefix: string): Tables {
  return {
    payments: `${prefix}payments`,
    trades: `${prefix}trades`,
    users: `${prefix}users`,
    orders: `${prefix}orders`,
    reservations: `${prefix}reservations`,
    ledgerOutbox: `${prefix}ledger_outbox`,
    ledgerEntries: `${prefix}ledger_entries`,
    ledgerRecords: `${prefix}ledger_records`,
  };
}

/** `url` with its password masked, for logs. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return url;
  }
}

function sqlitePath(url: string): string {
  let path = url.slice('sqlite:'.length);
  if (path.startsWith('//')) path = path.slice(2); // sqlite://./x.db
  return path;
}

function dialectOf(url: string): Dialect | undefined {
  if (url.startsWith('sqlite:')) return 'sqlite';
  if (url.startsWith('postgres://') || url.startsWith('postgresql://')) return 'postgres';
  if (url.startsWith('mysql://') || url.startsWith('mariadb://')) return 'mysql';
  return undefined;
}

/**
 * What names one SQL database, whatever the spelling of its URL: the
 * dialect, the user, the host (`localhost`, `127.0.0.1` and `::1` alike),
 * the port (with its default) and the database (PostgreSQL's default: the
 * user's name); for SQLite the absolute path of the file. Passwords and
 * query parameters do not count. `undefined` for anything else (memory,
 * Redis, `:memory:`).
 */
export function databaseIdentity(url: string): string | undefined {
  const dialect = dialectOf(url);
  if (dialect === undefined) return undefined;
  if (dialect === 'sqlite') {
    const path = sqlitePath(url);
    return path === '' || path === ':memory:' ? undefined : `sqlite:${resolve(path)}`;
  }
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return undefined;
  }
  const rawHost = u.hostname.toLowerCase() || 'localhost';
  const host = ['localhost', '127.0.0.1', '[::1]', '::1'].includes(rawHost) ? 'localhost' : rawHost;
  const port = u.port || (dialect === 'postgres' ? '5432' : '3306');
  const user = decodeURIComponent(u.username);
  let database = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (dialect === 'postgres' && database === '') database = user;
  return `${dialect}://${user}@${host}:${port}/${database}`;
}

/**
 * True when both URLs name the same SQL database, reached as the same user
 * (see {@link databaseIdentity}): then the store's transaction can carry
 * the business writes.
 */
export function sameDatabase(a: string, b: string): boolean {
  const identity = databaseIdentity(a);
  return identity !== undefined && identity === databaseIdentity(b);
}

/** Statements with `?` placeholders as PostgreSQL's `$1, $2, …` (our SQL has no `?` inside literals). */
export function toPostgres(sql: string): string {
  let n = 0;
  return sql.replace(/\?/g, () => `$${++n}`);
}

/**
 * Open (creating the tables when missing) the business database named by
 * `options.url`. A network database that cannot be reached rejects with
 * `cannot reach …`.
 */
export async function openBusinessDb(options: BusinessDbOptions = {}): Promise<BusinessDb> {
  const url = options.url ?? defaultDatabaseUrl(options.dataDir);
  const prefix = options.prefix ?? '';
  if (prefix !== '' && !PREFIX.test(prefix)) {
    throw new Error(`DATABASE_TABLE_PREFIX ${JSON.stringify(prefix)} must be a letter then up to 23 letters, digits or _`);
  }
  const dialect = dialectOf(url);
  if (dialect === 'sqlite') return openSqlite(url, prefix);
  if (dialect === 'postgres') return openPostgres(url, prefix);
  if (dialect === 'mysql') return openMysql(url, prefix);
  throw new Error(`DATABASE_URL ${JSON.stringify(redact(url))} is not supported: use sqlite:<path>, postgres:// or mysql://`);
}

// ─── SQLite ──────────────────────────────────────────────────────────────────

function sqliteSchema(t: Tables): string {
  return `
CREATE TABLE IF NOT EXISTS ${t.payments} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  idempotency_id TEXT,
  amount INTEGER NOT NULL,
  currency TEXT NOT NULL,
  customer TEXT,
  description TEXT,
  status TEXT NOT NULL,
  created TEXT NOT NULL,
  UNIQUE (account, idempotency_id)
);
CREATE INDEX IF NOT EXISTS ${t.payments}_account ON ${t.payments} (account, seq);
CREATE TABLE IF NOT EXISTS ${t.trades} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  idempotency_id TEXT,
  symbol TEXT NOT NULL,
  side TEXT NOT NULL,
  quantity INTEGER NOT NULL,
  price REAL NOT NULL,
  status TEXT NOT NULL,
  created TEXT NOT NULL,
  UNIQUE (account, idempotency_id)
);
CREATE INDEX IF NOT EXISTS ${t.trades}_account ON ${t.trades} (account, seq);
CREATE TABLE IF NOT EXISTS ${t.users} (
  account TEXT NOT NULL,
  id TEXT NOT NULL,
  name TEXT NOT NULL,
  email TEXT NOT NULL,
  updated TEXT NOT NULL,
  PRIMARY KEY (account, id)
);
CREATE TABLE IF NOT EXISTS ${t.orders} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  idempotency_id TEXT,
  currency TEXT NOT NULL,
  items TEXT NOT NULL,
  total INTEGER NOT NULL,
  payment TEXT NOT NULL,
  status TEXT NOT NULL,
  created TEXT NOT NULL,
  UNIQUE (account, idempotency_id)
);
CREATE INDEX IF NOT EXISTS ${t.orders}_account ON ${t.orders} (account, seq);
CREATE TABLE IF NOT EXISTS ${t.reservations} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  step_key TEXT NOT NULL,
  currency TEXT NOT NULL,
  items TEXT NOT NULL,
  total INTEGER NOT NULL,
  status TEXT NOT NULL,
  order_id TEXT,
  created TEXT NOT NULL,
  UNIQUE (account, step_key)
);
CREATE TABLE IF NOT EXISTS ${t.ledgerOutbox} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  published_at INTEGER
);
CREATE INDEX IF NOT EXISTS ${t.ledgerOutbox}_unpublished ON ${t.ledgerOutbox} (published_at, seq);
CREATE TABLE IF NOT EXISTS ${t.ledgerEntries} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL,
  consumer TEXT NOT NULL,
  type TEXT NOT NULL,
  account TEXT NOT NULL,
  payment TEXT NOT NULL,
  amount INTEGER NOT NULL,
  currency TEXT NOT NULL,
  recorded_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ${t.ledgerEntries}_account ON ${t.ledgerEntries} (consumer, account, seq);
`;
}

/** One at a time: SQLite statements of this connection wait for an open transaction of it. */
class Turns {
  #tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => T | Promise<T>): Promise<T> {
    const result = this.#tail.then(fn);
    this.#tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}

async function openSqlite(url: string, prefix: string): Promise<BusinessDb> {
  const path = sqlitePath(url);
  if (path === '') throw new Error('DATABASE_URL sqlite: needs a file path, e.g. sqlite:./data/reference.db');
  const onDisk = path !== ':memory:';
  if (onDisk) {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    prepareDbFile(path);
  }
  const { default: Database } = await import('better-sqlite3');
  const db: BetterSqlite3.Database = new Database(path);
  const tables = tablesOf(prefix);
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 5000');
    db.exec(sqliteSchema(tables));
    if (onDisk) restrictDbFiles(path);
  } catch (error) {
    db.close();
    throw error;
  }
  const statements = new Map<string, BetterSqlite3.Statement>();
  const prepared = (sql: string): BetterSqlite3.Statement => {
    let statement = statements.get(sql);
    if (statement === undefined) {
      statement = db.prepare(sql);
      statements.set(sql, statement);
    }
    return statement;
  };
  // Inside a transaction (or a turn): straight to the connection.
  const direct: Sql = {
    all: async <R>(sql: string, params: readonly SqlValue[] = []) => prepared(sql).all(...params) as R[],
    get: async <R>(sql: string, params: readonly SqlValue[] = []) => prepared(sql).get(...params) as R | undefined,
    run: async (sql: string, params: readonly SqlValue[] = []) => prepared(sql).run(...params).changes,
  };
  // better-sqlite3 is one connection and our transactions span awaits: everything else takes turns with them.
  const turns = new Turns();
  const inboxes = new Map<string, Inbox<BetterSqlite3.Database>>();
  return {
    dialect: 'sqlite',
    prefix,
    tables,
    url,
    description: `sqlite:${path}`,
    all: (sql, params) => turns.run(() => direct.all(sql, params)),
    get: (sql, params) => turns.run(() => direct.get(sql, params)),
    run: (sql, params) => turns.run(() => direct.run(sql, params)),
    // BEGIN IMMEDIATE (the write lock first, so two processes never deadlock upgrading a read lock),
    // taking turns with the inbox's transactions and its store's own writes on this Database.
    transaction: (fn) => turns.run(() => sqliteTransaction(db, () => fn(direct))),
    over() {
      // Not used: see docs/reference.md (one writer per file; a second connection would block the event loop).
      throw new Error('The reference does not run transactional mode on SQLite.');
    },
    insertIgnore: (table, columns) =>
      `INSERT INTO ${table} (${columns.join(', ')}) VALUES (${columns.map(() => '?').join(', ')}) ON CONFLICT DO NOTHING`,
    isUniqueViolation(error) {
      const code = (error as { code?: unknown } | null)?.code;
      return code === 'SQLITE_CONSTRAINT_UNIQUE' || code === 'SQLITE_CONSTRAINT_PRIMARYKEY';
    },
    applyOnce(consumer, messageId, sql, params) {
      let once = inboxes.get(consumer);
      if (once === undefined) {
        once = sqliteInbox({ database: db, consumer, recordsTable: tables.ledgerRecords });
        inboxes.set(consumer, once);
      }
      const ledger = once;
      return turns.run(
        async () => (await ledger.handle(messageId, (database) => database.prepare(sql).run(...params))).status === 'processed',
      );
    },
    async close() {
      await turns.run(() => undefined);
      for (const each of inboxes.values()) await each.close();
      db.close();
    },
  };
}

// ─── PostgreSQL ──────────────────────────────────────────────────────────────

function postgresSchema(t: Tables): string {
  return `
CREATE TABLE IF NOT EXISTS ${t.payments} (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  idempotency_id TEXT,
  amount BIGINT NOT NULL,
  currency TEXT NOT NULL,
  customer TEXT,
  description TEXT,
  status TEXT NOT NULL,
  created TEXT NOT NULL,
  CONSTRAINT ${t.payments}_once UNIQUE (account, idempotency_id)
);
CREATE INDEX IF NOT EXISTS ${t.payments}_account ON ${t.payments} (account, seq);
CREATE TABLE IF NOT EXISTS ${t.trades} (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  idempotency_id TEXT,
  symbol TEXT NOT NULL,
  side TEXT NOT NULL,
  quantity BIGINT NOT NULL,
  price DOUBLE PRECISION NOT NULL,
  status TEXT NOT NULL,
  created TEXT NOT NULL,
  CONSTRAINT ${t.trades}_once UNIQUE (account, idempotency_id)
);
CREATE INDEX IF NOT EXISTS ${t.trades}_account ON ${t.trades} (account, seq);
CREATE TABLE IF NOT EXISTS ${t.users} (
  account TEXT NOT NULL,
  id TEXT NOT NULL,
  name TEXT NOT NULL,
  email TEXT NOT NULL,
  updated TEXT NOT NULL,
  PRIMARY KEY (account, id)
);
CREATE TABLE IF NOT EXISTS ${t.orders} (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  idempotency_id TEXT,
  currency TEXT NOT NULL,
  items TEXT NOT NULL,
  total BIGINT NOT NULL,
  payment TEXT NOT NULL,
  status TEXT NOT NULL,
  created TEXT NOT NULL,
  CONSTRAINT ${t.orders}_once UNIQUE (account, idempotency_id)
);
CREATE INDEX IF NOT EXISTS ${t.orders}_account ON ${t.orders} (account, seq);
CREATE TABLE IF NOT EXISTS ${t.reservations} (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  account TEXT NOT NULL,
  step_key TEXT NOT NULL,
  currency TEXT NOT NULL,
  items TEXT NOT NULL,
  total BIGINT NOT NULL,
  status TEXT NOT NULL,
  order_id TEXT,
  created TEXT NOT NULL,
  CONSTRAINT ${t.reservations}_once UNIQUE (account, step_key)
);
CREATE TABLE IF NOT EXISTS ${t.ledgerOutbox} (
  seq BIGSERIAL PRIMARY KEY,
  event_id TEXT NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  published_at BIGINT
);
CREATE INDEX IF NOT EXISTS ${t.ledgerOutbox}_unpublished ON ${t.ledgerOutbox} (published_at, seq);
CREATE TABLE IF NOT EXISTS ${t.ledgerEntries} (
  seq BIGSERIAL PRIMARY KEY,
  event_id TEXT NOT NULL,
  consumer TEXT NOT NULL,
  type TEXT NOT NULL,
  account TEXT NOT NULL,
  payment TEXT NOT NULL,
  amount BIGINT NOT NULL,
  currency TEXT NOT NULL,
  recorded_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ${t.ledgerEntries}_account ON ${t.ledgerEntries} (consumer, account, seq);
${postgresSchemaSql({ table: t.ledgerRecords })}
`;
}

/** What a `pg` Pool or client offers that we use. */
interface PgQueryable {
  query(text: string, values?: unknown[]): Promise<{ rows: unknown[]; rowCount: number | null }>;
}

function postgresSql(target: PgQueryable): Sql {
  const texts = new Map<string, string>();
  const text = (sql: string): string => {
    let converted = texts.get(sql);
    if (converted === undefined) {
      converted = toPostgres(sql);
      texts.set(sql, converted);
    }
    return converted;
  };
  return {
    all: async <R>(sql: string, params: readonly SqlValue[] = []) => (await target.query(text(sql), [...params])).rows as R[],
    get: async <R>(sql: string, params: readonly SqlValue[] = []) => (await target.query(text(sql), [...params])).rows[0] as R | undefined,
    run: async (sql: string, params: readonly SqlValue[] = []) => (await target.query(text(sql), [...params])).rowCount ?? 0,
  };
}

async function openPostgres(url: string, prefix: string): Promise<BusinessDb> {
  const { default: pg } = await import('pg');
  const pool: PgPool = new pg.Pool({ connectionString: url, connectionTimeoutMillis: CONNECT_TIMEOUT_MS, max: 20 });
  pool.on('error', () => {}); // an idle connection dropped by the server must not crash the process
  const tables = tablesOf(prefix);
  try {
    const client = await pool.connect();
    try {
      // Several processes may start at once: CREATE … IF NOT EXISTS races in PostgreSQL, so one at a time.
      await client.query('BEGIN');
      await client.query('SELECT pg_advisory_xact_lock(hashtext($1))', [`oncely-reference:${prefix}`]);
      await client.query(postgresSchema(tables));
      await client.query('COMMIT');
    } catch (error) {
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release();
    }
  } catch (error) {
    await pool.end().catch(() => {});
    throw new Error(`cannot reach PostgreSQL at ${redact(url)}: ${(error as Error).message}`);
  }
  const onPool = postgresSql(pool);
  const inboxes = new Map<string, ReturnType<typeof postgresInbox>>();
  const inboxOf = (consumer: string) => {
    let once = inboxes.get(consumer);
    if (once === undefined) {
      once = postgresInbox({ pool, consumer, recordsTable: tables.ledgerRecords });
      inboxes.set(consumer, once);
    }
    return once;
  };
  return {
    dialect: 'postgres',
    prefix,
    tables,
    url,
    description: redact(url),
    ...onPool,
    async transaction(fn) {
      const client = await pool.connect();
      let broken: Error | undefined;
      try {
        await client.query('BEGIN');
        try {
          const result = await fn(postgresSql(client));
          await client.query('COMMIT');
          return result;
        } catch (error) {
          await client.query('ROLLBACK').catch((rollbackError: Error) => {
            broken = rollbackError; // the pool must discard this connection
          });
          throw error;
        }
      } finally {
        client.release(broken);
      }
    },
    over: (handle) => postgresSql(handle as PgQueryable),
    insertIgnore: (table, columns) =>
      `INSERT INTO ${table} (${columns.join(', ')}) VALUES (${columns.map(() => '?').join(', ')}) ON CONFLICT DO NOTHING`,
    isUniqueViolation: (error) => (error as { code?: unknown } | null)?.code === '23505',
    async applyOnce(consumer, messageId, sql, params) {
      const result = await inboxOf(consumer).handle(messageId, (client) => client.query(toPostgres(sql), [...params]));
      return result.status === 'processed';
    },
    async close() {
      for (const each of inboxes.values()) await each.close();
      await pool.end();
    },
  };
}

// ─── MySQL / MariaDB ─────────────────────────────────────────────────────────

function mysqlSchema(t: Tables): string[] {
  // utf8mb4_bin: accounts and ids compare exactly (the default collation would make acct_A equal acct_a).
  const options = 'ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin';
  return [
    `CREATE TABLE IF NOT EXISTS ${t.payments} (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  id VARCHAR(64) NOT NULL,
  account VARCHAR(64) NOT NULL,
  idempotency_id VARCHAR(128) NULL,
  amount BIGINT NOT NULL,
  currency VARCHAR(3) NOT NULL,
  customer VARCHAR(255) NULL,
  description TEXT NULL,
  status VARCHAR(16) NOT NULL,
  created VARCHAR(32) NOT NULL,
  UNIQUE KEY ${t.payments}_id (id),
  UNIQUE KEY ${t.payments}_once (account, idempotency_id),
  KEY ${t.payments}_account (account, seq)
) ${options}`,
    `CREATE TABLE IF NOT EXISTS ${t.trades} (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  id VARCHAR(64) NOT NULL,
  account VARCHAR(64) NOT NULL,
  idempotency_id VARCHAR(128) NULL,
  symbol VARCHAR(16) NOT NULL,
  side VARCHAR(4) NOT NULL,
  quantity BIGINT NOT NULL,
  price DOUBLE NOT NULL,
  status VARCHAR(16) NOT NULL,
  created VARCHAR(32) NOT NULL,
  UNIQUE KEY ${t.trades}_id (id),
  UNIQUE KEY ${t.trades}_once (account, idempotency_id),
  KEY ${t.trades}_account (account, seq)
) ${options}`,
    `CREATE TABLE IF NOT EXISTS ${t.users} (
  account VARCHAR(64) NOT NULL,
  id VARCHAR(64) NOT NULL,
  name VARCHAR(200) NOT NULL,
  email VARCHAR(320) NOT NULL,
  updated VARCHAR(32) NOT NULL,
  PRIMARY KEY (account, id)
) ${options}`,
    `CREATE TABLE IF NOT EXISTS ${t.orders} (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  id VARCHAR(64) NOT NULL,
  account VARCHAR(64) NOT NULL,
  idempotency_id VARCHAR(128) NULL,
  currency VARCHAR(3) NOT NULL,
  items MEDIUMTEXT NOT NULL,
  total BIGINT NOT NULL,
  payment VARCHAR(64) NOT NULL,
  status VARCHAR(16) NOT NULL,
  created VARCHAR(32) NOT NULL,
  UNIQUE KEY ${t.orders}_id (id),
  UNIQUE KEY ${t.orders}_once (account, idempotency_id),
  KEY ${t.orders}_account (account, seq)
) ${options}`,
    `CREATE TABLE IF NOT EXISTS ${t.reservations} (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  id VARCHAR(64) NOT NULL,
  account VARCHAR(64) NOT NULL,
  step_key VARCHAR(255) NOT NULL,
  currency VARCHAR(3) NOT NULL,
  items MEDIUMTEXT NOT NULL,
  total BIGINT NOT NULL,
  status VARCHAR(16) NOT NULL,
  order_id VARCHAR(64) NULL,
  created VARCHAR(32) NOT NULL,
  UNIQUE KEY ${t.reservations}_id (id),
  UNIQUE KEY ${t.reservations}_once (account, step_key)
) ${options}`,
    `CREATE TABLE IF NOT EXISTS ${t.ledgerOutbox} (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  event_id VARCHAR(255) NOT NULL,
  payload TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  published_at BIGINT NULL,
  KEY ${t.ledgerOutbox}_unpublished (published_at, seq)
) ${options}`,
    `CREATE TABLE IF NOT EXISTS ${t.ledgerEntries} (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  event_id VARCHAR(255) NOT NULL,
  consumer VARCHAR(128) NOT NULL,
  type VARCHAR(32) NOT NULL,
  account VARCHAR(64) NOT NULL,
  payment VARCHAR(64) NOT NULL,
  amount BIGINT NOT NULL,
  currency VARCHAR(3) NOT NULL,
  recorded_at BIGINT NOT NULL,
  KEY ${t.ledgerEntries}_account (consumer, account, seq)
) ${options}`,
  ];
}

/** What a mysql2/promise pool or connection offers that we use. */
interface MysqlQueryable {
  query(sql: string, values?: unknown[]): Promise<[unknown, unknown]>;
}

function mysqlSql(target: MysqlQueryable): Sql {
  return {
    all: async <R>(sql: string, params: readonly SqlValue[] = []) => (await target.query(sql, [...params]))[0] as R[],
    get: async <R>(sql: string, params: readonly SqlValue[] = []) => ((await target.query(sql, [...params]))[0] as R[])[0],
    run: async (sql: string, params: readonly SqlValue[] = []) =>
      ((await target.query(sql, [...params]))[0] as { affectedRows: number }).affectedRows,
  };
}

/** A mysql2 connection from either API: the callback one answers `promise()` with the promise one. */
function mysqlQueryable(handle: unknown): MysqlQueryable {
  const h = handle as MysqlQueryable & { promise?: () => MysqlQueryable };
  return typeof h.promise === 'function' ? h.promise() : h;
}

async function openMysql(url: string, prefix: string): Promise<BusinessDb> {
  const { default: mysql } = await import('mysql2/promise');
  const u = new URL(url);
  u.protocol = 'mysql:';
  const pool: MysqlPool = mysql.createPool({ uri: u.toString(), connectTimeout: CONNECT_TIMEOUT_MS, connectionLimit: 20 });
  // mysql2 pools emit errors of idle connections on the pool's connections; a crash is not the answer.
  pool.on('connection', (connection) => connection.on('error', () => {}));
  const tables = tablesOf(prefix);
  try {
    // CREATE TABLE IF NOT EXISTS with its keys inline: safe for several processes at once.
    for (const statement of mysqlSchema(tables)) await pool.query(statement);
    await migrateMysql(pool, { table: tables.ledgerRecords });
  } catch (error) {
    await pool.end().catch(() => {});
    throw new Error(`cannot reach MySQL at ${redact(url)}: ${(error as Error).message}`);
  }
  const insertIgnore = (table: string, columns: readonly string[]): string =>
    `INSERT IGNORE INTO ${table} (${columns.join(', ')}) VALUES (${columns.map(() => '?').join(', ')})`;
  const transaction = async <T>(fn: (tx: Sql) => Promise<T>): Promise<T> => {
    const connection = await pool.getConnection();
    try {
      await connection.beginTransaction();
      try {
        const result = await fn(mysqlSql(connection));
        await connection.commit();
        return result;
      } catch (error) {
        await connection.rollback().catch(() => connection.destroy());
        throw error;
      }
    } finally {
      connection.release();
    }
  };
  const inboxes = new Map<string, Inbox<MysqlQueryable>>();
  const records = mysqlStore({ pool, table: tables.ledgerRecords });
  return {
    dialect: 'mysql',
    prefix,
    tables,
    url,
    description: redact(url),
    ...mysqlSql(pool),
    transaction,
    over: (handle) => mysqlSql(mysqlQueryable(handle)),
    insertIgnore,
    isUniqueViolation: (error) => (error as { code?: unknown } | null)?.code === 'ER_DUP_ENTRY',
    // The generic inbox over mysqlStore: the same mechanism as postgresInbox and sqliteInbox.
    async applyOnce(consumer, messageId, sql, params) {
      let once = inboxes.get(consumer);
      if (once === undefined) {
        once = inbox<MysqlQueryable>({ store: records, consumer });
        inboxes.set(consumer, once);
      }
      const result = await once.handle(messageId, (connection) => connection.query(sql, [...params]));
      return result.status === 'processed';
    },
    async close() {
      for (const each of inboxes.values()) await each.close();
      await records.close?.();
      await pool.end();
    },
  };
}

// ─── Files, ids, pauses ──────────────────────────────────────────────────────

/** Mode of every database file the reference system creates: read and write by its owner only. */
export const DB_FILE_MODE = 0o600;

/** A database file and the files SQLite keeps beside it. */
function dbFiles(path: string): string[] {
  return [path, `${path}-wal`, `${path}-shm`, `${path}-journal`];
}

/**
 * Before SQLite opens `path`: create it empty with mode 0600 when missing
 * (an empty file is an empty database), and bring existing files down to
 * 0600. SQLite creates the -wal and -shm files with the mode of the
 * database file, so they follow; {@link restrictDbFiles} checks after.
 */
export function prepareDbFile(path: string): void {
  if (!existsSync(path)) closeSync(openSync(path, 'a', DB_FILE_MODE));
  restrictDbFiles(path);
}

/** Set the database file and its -wal, -shm and -journal (those that exist) to mode 0600. */
export function restrictDbFiles(path: string): void {
  for (const file of dbFiles(path)) {
    try {
      chmodSync(file, DB_FILE_MODE);
    } catch (error) {
      // Gone meanwhile, or another user's file (not ours to change): leave it.
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'EPERM') throw error;
    }
  }
}

/** A new resource id: `<prefix>_` and 24 random hex digits. */
export function newId(prefix: string): string {
  return `${prefix}_${randomBytes(12).toString('hex')}`;
}

/**
 * Sleep `ms`, rejecting with the signal's reason (oncely's `LeaseLostError`)
 * when the signal aborts first.
 */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0) return signal?.aborted ? Promise.reject(signal.reason) : Promise.resolve();
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Drop the tables of `db`'s prefix (tests, each on its own prefix, clean up
 * after themselves on a shared server). Refuses the unprefixed tables.
 */
export async function dropTables(db: BusinessDb): Promise<void> {
  if (db.prefix === '') throw new Error('dropTables: only a prefixed set of tables (a test run) may be dropped');
  for (const table of Object.values(db.tables)) await db.run(`DROP TABLE IF EXISTS ${table}`);
  // The ledger inbox's records table has a sessions table beside it.
  await db.run(`DROP TABLE IF EXISTS ${db.tables.ledgerRecords}_sessions`);
}
