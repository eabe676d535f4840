/**
 * SQLite store over the user's own better-sqlite3 `Database`: the embedded
 * default. Several processes on one machine may share the database file.
 *
 * - The store switches the connection to WAL (`journal_mode = WAL`,
 *   `synchronous = NORMAL`) and sets a `busy_timeout`, so that readers never
 *   block the writer and processes wait for each other's write lock instead
 *   of failing.
 * - `claim` decides in one `BEGIN IMMEDIATE` transaction (the write lock is
 *   taken before the record is read), so it is atomic across processes. A
 *   replay, or a duplicate while the lease is live, is answered by one plain
 *   read first, without the write lock (the answer holds at that read).
 * - Deadlines are epoch ms from this process's clock (`Date.now()`): the
 *   processes sharing the file share one machine, hence one clock.
 * - SQLite has no TTL: expired records are absent to every operation and are
 *   deleted by a background purge (started with the store, stopped by
 *   `close()`): batches of `purge.batch` records, oldest first on the
 *   `expires_at` index, one short write transaction each, repeated while a
 *   batch comes back full, yielding to the event loop between batches.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { sqliteStore } from 'oncely/stores/sqlite';
 *
 * const store = sqliteStore({ database: new Database('oncely.db') });
 * ```
 * @module
 */
import type {
  ClaimInput,
  ClaimResult,
  CompletedRecord,
  IdempotencyStore,
  StoreCapabilities,
  StoredRecord,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { ConfigError } from '../errors/index.js';
import { type PurgeOptions, purgeSettings, startPurge } from './purge.js';

export { type PurgeOptions, type PurgeReport, type PurgeRunOptions, purgeExpiredRecords } from './purge.js';

/**
 * A prepared statement, as better-sqlite3 returns from `prepare` (only what the store uses).
 *
 * @example
 * ```ts
 * const statement: SqliteStatement = database.prepare('SELECT 1');
 * ```
 */
export interface SqliteStatement {
  run(...params: unknown[]): { changes: number };
  get(...params: unknown[]): unknown;
}

/**
 * The part of a better-sqlite3 `Database` the store uses. Declared here so
 * that oncely does not depend on better-sqlite3; any object of this shape works.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import type { SqliteDatabase } from 'oncely/stores/sqlite';
 * const db: SqliteDatabase = new Database('oncely.db');
 * ```
 */
export interface SqliteDatabase {
  prepare(source: string): SqliteStatement;
  exec(source: string): unknown;
  pragma(source: string, options?: { simple?: boolean }): unknown;
  /** True while a transaction is open on this connection. */
  readonly inTransaction: boolean;
  /** False once the database was closed. */
  readonly open: boolean;
}

/**
 * Options of {@link sqliteStore}.
 *
 * @example
 * ```ts
 * const options: SqliteStoreOptions = { database: new Database('oncely.db'), table: 'oncely_records', purge: { intervalMs: 10_000 } };
 * ```
 */
export interface SqliteStoreOptions {
  /** The user's better-sqlite3 `Database`; the store never closes it. */
  database: SqliteDatabase;
  /** Table name (letters, digits, underscores). Default `oncely_records`. */
  table?: string;
  /** Create the table and its index when missing. Default true. */
  migrate?: boolean;
  /**
   * Set `journal_mode = WAL`, `synchronous = NORMAL` and `busy_timeout` on
   * the connection. Default true; turn off to keep your own settings.
   */
  configure?: boolean;
  /** `busy_timeout` in ms: how long a process waits for another's write lock. Default 5000. */
  busyTimeoutMs?: number;
  /**
   * Background purge of expired records: a drain every `intervalMs`
   * (default 10 000) in batches of `batch` records (default 1000), or
   * `false` to turn it off (then call {@link purgeExpiredRecords} yourself).
   * The timer is unref'd and stops on `close()`.
   */
  purge?: PurgeOptions | false;
  /** @deprecated Use `purge: { intervalMs }` (or `purge: false` for 0). */
  purgeIntervalMs?: number;
  /** @deprecated Use `purge: { batch }`. */
  purgeBatch?: number;
  /** Clock, for tests. Default `Date.now`. */
  now?: () => number;
}

/**
 * Options of {@link migrateSqlite}.
 *
 * @example
 * ```ts
 * migrateSqlite(database, { table: 'my_keys' } satisfies SqliteMigrateOptions);
 * ```
 */
export interface SqliteMigrateOptions {
  /** Table name (letters, digits, underscores). Default `oncely_records`. */
  table?: string;
}

/**
 * The store {@link sqliteStore} returns: an {@link IdempotencyStore} that also names its table.
 *
 * @example
 * ```ts
 * const store: SqliteStore = sqliteStore({ database });
 * console.log(store.table); // "oncely_records"
 * ```
 */
export interface SqliteStore extends IdempotencyStore {
  /** The table the store uses. */
  readonly table: string;
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: false, serverClock: false, shared: true, synchronous: true };
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;
const IN_PROGRESS = 0;
const COMPLETED = 1;

interface Row {
  state: number;
  token: string | null;
  fingerprint: string | null;
  lease_until: number;
  expires_at: number;
  outcome: string | null;
}

function tableName(table: string | undefined): string {
  const name = table ?? 'oncely_records';
  if (!IDENTIFIER.test(name)) {
    throw new ConfigError(`SQLite table name ${JSON.stringify(name)} must be letters, digits and underscores.`);
  }
  return name;
}

/**
 * The SQL that creates the store's table and index (idempotent). Shown in
 * the docs; {@link migrateSqlite} runs it.
 *
 * @example
 * ```ts
 * console.log(sqliteSchemaSql('oncely_records'));
 * ```
 */
export function sqliteSchemaSql(table = 'oncely_records'): string {
  const name = tableName(table);
  // A rowid table (not WITHOUT ROWID): purges delete by rowid batches.
  return `CREATE TABLE IF NOT EXISTS "${name}" (
  id TEXT NOT NULL PRIMARY KEY,
  state INTEGER NOT NULL,
  token TEXT,
  fingerprint TEXT,
  lease_until INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  outcome TEXT
);
CREATE INDEX IF NOT EXISTS "${name}_expires_at" ON "${name}" (expires_at);`;
}

/**
 * Create the store's table and index in `db` when missing. {@link sqliteStore}
 * does this by itself unless `migrate: false`.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { migrateSqlite } from 'oncely/stores/sqlite';
 * migrateSqlite(new Database('oncely.db'), { table: 'oncely_records' });
 * ```
 */
export function migrateSqlite(db: SqliteDatabase, options: SqliteMigrateOptions = {}): void {
  db.exec(sqliteSchemaSql(tableName(options.table)));
}

/**
 * Create a SQLite store over the user's better-sqlite3 `Database`.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { sqliteStore } from 'oncely/stores/sqlite';
 *
 * const store = sqliteStore({ database: new Database('/var/lib/app/oncely.db'), purge: { intervalMs: 10_000, batch: 1000 } });
 * // ... on shutdown:
 * await store.close(); // stops the purge timer; the Database stays open
 * ```
 */
export function sqliteStore(options: SqliteStoreOptions): SqliteStore {
  const db = options.database;
  const table = tableName(options.table);
  const now = options.now ?? Date.now;
  const purging = purgeSettings(options.purge, { intervalMs: options.purgeIntervalMs, batch: options.purgeBatch });

  if (options.configure !== false) {
    // WAL: readers never wait for the writer; NORMAL: no fsync per commit
    // (a power cut may lose the last commits, never corrupt the file).
    // busy_timeout first: switching to WAL and creating the table may wait for another process.
    db.pragma(`busy_timeout = ${Math.max(0, Math.floor(options.busyTimeoutMs ?? 5000))}`);
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
  }
  if (options.migrate !== false) migrateSqlite(db, { table });

  const t = `"${table}"`;
  const begin = db.prepare('BEGIN IMMEDIATE');
  const commit = db.prepare('COMMIT');
  const rollback = db.prepare('ROLLBACK');
  const select = db.prepare(
    `SELECT state, token, fingerprint, lease_until, expires_at, outcome FROM ${t} WHERE id = ?`,
  );
  const insert = db.prepare(
    `INSERT OR REPLACE INTO ${t} (id, state, token, fingerprint, lease_until, expires_at, outcome) VALUES (?, ${IN_PROGRESS}, ?, ?, ?, ?, NULL)`,
  );
  const takeOver = db.prepare(
    `UPDATE ${t} SET token = ?, lease_until = ?, expires_at = max(expires_at, ?) WHERE id = ?`,
  );
  const renewStmt = db.prepare(
    `UPDATE ${t} SET lease_until = ?, expires_at = max(expires_at, ?) WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ?`,
  );
  const completeStmt = db.prepare(
    `UPDATE ${t} SET state = ${COMPLETED}, outcome = ?, expires_at = ? WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ?`,
  );
  const releaseStmt = db.prepare(
    `DELETE FROM ${t} WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ?`,
  );
  const getStmt = db.prepare(
    `SELECT state, token, fingerprint, lease_until, expires_at, outcome FROM ${t} WHERE id = ? AND expires_at > ?`,
  );
  const deleteStmt = db.prepare(`DELETE FROM ${t} WHERE id = ? RETURNING expires_at`);
  // Oldest first on the expires_at index; by rowid, so the delete needs no
  // second lookup through the primary key.
  const purgeStmt = db.prepare(
    `DELETE FROM ${t} WHERE rowid IN (SELECT rowid FROM ${t} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)`,
  );

  const decide = (id: string, input: ClaimInput, at: number): ClaimResult => {
    const row = select.get(id) as Row | undefined;
    const leaseUntil = at + Math.round(input.leaseMs);
    const expiresAt = at + Math.round(Math.max(input.ttlMs, input.leaseMs));
    if (row === undefined || row.expires_at <= at) {
      const token = newToken();
      insert.run(id, token, input.fingerprint, leaseUntil, expiresAt);
      return { status: 'acquired', token, takeover: false, leaseUntil };
    }
    if (row.state === COMPLETED) return { status: 'completed', record: completed(row) };
    if (row.lease_until <= at && row.fingerprint === input.fingerprint) {
      const token = newToken();
      takeOver.run(token, leaseUntil, expiresAt, id);
      return { status: 'acquired', token, takeover: true, leaseUntil };
    }
    return { status: 'in_progress', fingerprint: row.fingerprint, leaseUntil: row.lease_until, now: at };
  };

  /** Run `body` in one BEGIN IMMEDIATE transaction, or inside the caller's open transaction. */
  const immediate = <T>(body: () => T): T => {
    if (db.inTransaction) return body();
    begin.run();
    try {
      const result = body();
      commit.run();
      return result;
    } catch (error) {
      if (db.inTransaction) rollback.run();
      throw error;
    }
  };

  const purge = (limit: number): number => purgeStmt.run(now(), Math.max(0, Math.floor(limit))).changes;
  // A database the user closed has nothing left to purge, and a transaction
  // the user left open is not ours to write into: the drain ends quietly.
  let timer =
    purging === undefined ? undefined : startPurge({ purgeExpired: async (limit) => (db.open && !db.inTransaction ? purge(limit) : 0) }, purging);

  return {
    name: 'sqlite',
    capabilities: CAPABILITIES,
    table,
    async claim(id, input) {
      // A live record that this claim cannot take is answered from a plain
      // read, without the write lock: replays and duplicates in flight never
      // queue behind writers. Anything else is decided inside BEGIN IMMEDIATE.
      const at = now();
      const row = select.get(id) as Row | undefined;
      if (row !== undefined && row.expires_at > at) {
        if (row.state === COMPLETED) return { status: 'completed', record: completed(row) };
        if (row.lease_until > at || row.fingerprint !== input.fingerprint) {
          return { status: 'in_progress', fingerprint: row.fingerprint, leaseUntil: row.lease_until, now: at };
        }
      }
      return immediate(() => decide(id, input, now()));
    },
    async claimMany(ids, input) {
      if (ids.length === 0) return [];
      return immediate(() => {
        const at = now();
        return ids.map((id) => decide(id, input, at));
      });
    },
    async renew(id, token, leaseMs) {
      const at = now();
      const until = at + Math.round(leaseMs);
      return renewStmt.run(until, until, id, token, at).changes === 1;
    },
    async complete(id, token, outcome, ttlMs) {
      const at = now();
      return completeStmt.run(outcome, at + Math.round(ttlMs), id, token, at).changes === 1;
    },
    async release(id, token) {
      return releaseStmt.run(id, token, now()).changes === 1;
    },
    async get(id): Promise<StoredRecord | null> {
      const row = getStmt.get(id, now()) as Row | undefined;
      if (row === undefined) return null;
      if (row.state === COMPLETED) return completed(row);
      return {
        state: 'in_progress',
        fingerprint: row.fingerprint,
        leaseUntil: row.lease_until,
        expiresAt: row.expires_at,
      };
    },
    async delete(id) {
      const row = deleteStmt.get(id) as { expires_at: number } | undefined;
      return row !== undefined && row.expires_at > now();
    },
    async purgeExpired(limit) {
      return purge(limit);
    },
    async close() {
      await timer?.stop();
      timer = undefined;
    },
  };
}

function completed(row: Row): CompletedRecord {
  return { state: 'completed', fingerprint: row.fingerprint, outcome: row.outcome ?? '', expiresAt: row.expires_at };
}
