/**
 * SQLite store over the user's own better-sqlite3 `Database`: the embedded
 * default. Several processes on one machine may share the database file.
 *
 * - The store switches the connection to WAL (`journal_mode = WAL`,
 *   `synchronous = NORMAL`) and sets a `busy_timeout`, so that readers never
 *   block the writer and processes wait for each other's write lock instead
 *   of failing.
 * - `claim` decides in a `BEGIN IMMEDIATE` transaction (the write lock is
 *   taken before the record is read), so it is atomic across processes. A
 *   replay, or a duplicate while the lease is live, is answered by one plain
 *   read first, without the write lock (the answer holds at that read).
 * - Group commit: the writes asked for in one turn of the event loop
 *   (claims, renewals, completions, releases, deletes, session heartbeats)
 *   run together at its end (`setImmediate`) in ONE `BEGIN IMMEDIATE …
 *   COMMIT`, in the order asked, each with its own answer and fencing (see
 *   the `Writer` below). Each operation reads the clock when it is asked.
 * - Deadlines are epoch ms from this process's clock (`Date.now()`): the
 *   processes sharing the file share one machine, hence one clock.
 * - SQLite has no TTL: expired records are absent to every operation and are
 *   deleted by a background purge (started with the store, stopped by
 *   `close()`): batches of `purge.batch` records, oldest first on the
 *   `expires_at` index, one short write transaction each, repeated while a
 *   batch comes back full, yielding to the event loop between batches.
 * - Process sessions: a row per process in `<table>_sessions` whose
 *   `expires_at` (this machine's clock) each heartbeat moves.
 * - Transactional mode: one transaction at a time per `Database` (one
 *   connection cannot hold two), `BEGIN IMMEDIATE`, the handler writes
 *   through the `Database`, and the fenced completion commits with them.
 *   While it is open, the store's own writes (claims, renewals, completions
 *   of other records, heartbeats) wait for it to end, so that none of them
 *   is committed or rolled back with someone else's business writes.
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
  InProgressRecord,
  StoreCapabilities,
  StoredRecord,
  StoreSessions,
  StoreTransaction,
  StoreTransactions,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { ConfigError, RolledBackError, StoreUnavailableError } from '../errors/index.js';
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
   * Set `journal_mode = WAL` and `synchronous = NORMAL` on the connection,
   * and, once the table is ready, `busy_timeout = 0`: SQLite's own busy
   * handler sleeps inside the call, blocking the event loop while another
   * process writes, so the store waits for the lock itself, asynchronously.
   * Your own statements on this `Database` then get `SQLITE_BUSY` at once
   * when another process holds the lock: retry them, or give them a
   * connection of their own. Default true; turn off to keep your own
   * settings (a `busy_timeout` of yours then blocks the loop while it waits).
   */
  configure?: boolean;
  /**
   * How long the store's writes wait for another connection's write lock,
   * in ms, without blocking the event loop (they retry every few ms);
   * past it they fail as a store outage (503). Default 5000. Also how long
   * the store's own writes, and the opening of a transaction, wait for a
   * transaction of transactional mode open on the same `Database` to end.
   */
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
  /** The process sessions table (`<table>_sessions`). */
  readonly sessionsTable: string;
  /** Process sessions: one row per process, its expiry on this machine's clock. */
  readonly sessions: StoreSessions;
  /** Transactional mode: the handler writes through the `Database`, inside the open transaction. */
  readonly transactions: StoreTransactions<SqliteDatabase>;
}

// `synchronous`: the engine calls the store without its storeTimeoutMs
// timer. A write now answers at the end of the turn (`setImmediate`), which
// comes before any timer the engine could have armed; only a wait for a
// transaction of transactional mode or for another process's write lock
// takes longer, and the store bounds every operation itself by
// busyTimeoutMs, counted from when it was asked (then StoreUnavailableError).
// An engine timer would answer 503 sooner but leave the operation queued
// to land later (a claim nobody runs holds its key for a whole lease).
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
  owner: string | null;
}

function tableName(table: string | undefined): string {
  const name = table ?? 'oncely_records';
  if (!IDENTIFIER.test(name)) {
    throw new ConfigError(`SQLite table name ${JSON.stringify(name)} must be letters, digits and underscores.`);
  }
  return name;
}

/** The sessions table of `table` (SQLite has no length limit on names). */
function sessionsTableName(table: string): string {
  return `${table}_sessions`;
}

/**
 * The transactional-mode gate of one `Database`: one connection holds at
 * most one transaction, so transactions take turns, and the store's own
 * writes wait while one is open (run inside it, they would commit or roll
 * back with its business writes). Shared by every store on that `Database`.
 */
class Gate {
  #held = false;
  #idle: Promise<void> | undefined;
  #wake: (() => void) | undefined;

  get held(): boolean {
    return this.#held;
  }

  /** Resolves once the gate is released, or after `ms`, whichever comes first. */
  async idle(ms: number): Promise<void> {
    this.#idle ??= new Promise<void>((resolve) => {
      this.#wake = resolve;
    });
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.#idle, new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.max(0, ms))))]);
    clearTimeout(timer);
  }

  take(): void {
    this.#held = true;
  }

  release(): void {
    this.#held = false;
    const wake = this.#wake;
    this.#idle = undefined;
    this.#wake = undefined;
    wake?.();
  }
}

/** SQLITE_BUSY and its extended codes: another connection holds the write lock. */
const isBusy = (error: unknown): boolean => {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code.startsWith('SQLITE_BUSY');
};

/** One operation waiting for its turn on a `Database` (see {@link Writer}). */
interface Queued {
  /** The operation's statements; its answer is what it returns. */
  run: () => unknown;
  /** It writes more than once (`claimMany`): it runs under a savepoint, so that its failure undoes all of it and nothing else. */
  multi: boolean;
  /** It runs alone, outside any batch, once everything asked before it has committed (opening a transaction, a purge). */
  solo: boolean;
  /** Names it in errors ("a claim"). */
  what: string;
  /** How long it may wait for the gate and for another connection's write lock, ms, and the instant (`Date.now`) that ends. */
  busyMs: number;
  deadline: number;
  resolve: (value: never) => void;
  reject: (error: unknown) => void;
}

/** At most this many operations share one transaction (the rest go in the next, at once). */
const MAX_BATCH = 512;

/**
 * The writes of one `Database`, group-committed. Every store on it and
 * {@link sqliteTransaction} go through it, in the order asked:
 *
 * - The operations asked for in one turn of the event loop run together at
 *   its end (`setImmediate`, after the turn's I/O callbacks, so that the
 *   requests that arrived together share it) in ONE `BEGIN IMMEDIATE …
 *   COMMIT`: one write lock, one commit, instead of one per operation. Each
 *   runs its own statements (its fencing, its clock) and gets its own answer.
 * - A statement error answers only its own operation: SQLite undoes the
 *   failed statement alone, an operation that writes once has then written
 *   nothing, and one that writes more (`claimMany`) runs under a savepoint
 *   and is rolled back to it. An error that rolls the whole transaction back
 *   (`RAISE(ROLLBACK)`, a full disk) fails its operation, and the others of
 *   the batch, which did not land, run again in a new transaction.
 * - A failed `COMMIT` rejects every operation of the batch: none landed
 *   (`SQLITE_BUSY` at `COMMIT` is rolled back and retried like at `BEGIN`).
 * - While a transaction of transactional mode (or {@link sqliteTransaction})
 *   is open, the queue waits for it; while another process holds the write
 *   lock, it retries every few ms without blocking the event loop. An
 *   operation that waited its `busyTimeoutMs` (counted from when it was
 *   asked) fails as a store outage; operations asked meanwhile join the batch.
 * - Opening a transaction, and a purge, run alone in their place in the queue.
 */
class Writer {
  readonly gate = new Gate();
  readonly #db: SqliteDatabase;
  #queue: Queued[] = [];
  /** A flush is scheduled or under way; true whenever the queue is not empty. */
  #flushing = false;
  #sql: { begin: SqliteStatement; commit: SqliteStatement; rollback: SqliteStatement; savepoint: SqliteStatement; release: SqliteStatement; undo: SqliteStatement } | undefined;

  constructor(db: SqliteDatabase) {
    this.#db = db;
  }

  /** Queue `op` for the batch of this turn. */
  push(op: Queued): void {
    this.#queue.push(op);
    if (!this.#flushing) {
      this.#flushing = true;
      setImmediate(this.#flush);
    }
  }

  /** An operation for the batch of this turn: its answer once the batch has committed. */
  batched<T>(what: string, busyMs: number, run: () => T, multi = false): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.push({ run, multi, solo: false, what, busyMs, deadline: Date.now() + busyMs, resolve: resolve as (value: never) => void, reject });
    });
  }

  /**
   * Run `run` alone: at once (no await) when nothing is queued and no
   * transaction is open, else in its turn, after what was asked before it.
   */
  solo<T>(what: string, busyMs: number, run: () => T): Promise<T> {
    if (!this.#flushing && !this.gate.held) {
      try {
        return Promise.resolve(run());
      } catch (error) {
        if (!isBusy(error)) return Promise.reject(error);
      }
    }
    return new Promise<T>((resolve, reject) => {
      this.push({ run, multi: false, solo: true, what, busyMs, deadline: Date.now() + busyMs, resolve: resolve as (value: never) => void, reject });
    });
  }

  readonly #flush = async (): Promise<void> => {
    const queue = this.#queue;
    let pause = 1;
    try {
      while (queue.length > 0) {
        if (this.gate.held) {
          this.#expire(Date.now() + 1, 'for the open transaction of transactional mode on this Database to end');
          if (queue.length === 0) return;
          let first = Number.POSITIVE_INFINITY;
          for (const op of queue) first = Math.min(first, op.deadline);
          await this.gate.idle(first - Date.now());
          continue;
        }
        try {
          this.#runOnce();
          pause = 1;
        } catch (error) {
          // Only SQLITE_BUSY gets here: another connection holds the write lock, and nothing ran.
          if (!isBusy(error)) {
            for (const op of queue.splice(0)) op.reject(error);
            return;
          }
          this.#expire(Date.now() + pause, "for another connection's write lock", error);
          if (queue.length === 0) return;
          await new Promise((resolve) => setTimeout(resolve, pause));
          pause = Math.min(pause * 2, 25);
        }
      }
    } finally {
      this.#flushing = false;
      if (queue.length > 0) {
        this.#flushing = true;
        setImmediate(this.#flush);
      }
    }
  };

  /** Fail the queued operations whose wait would end before `limit`: they waited `busyTimeoutMs` for `what`. */
  #expire(limit: number, what: string, cause?: unknown): void {
    const queue = this.#queue;
    let kept = 0;
    for (const op of queue) {
      if (op.deadline < limit) {
        const message = `SQLite: ${op.what} waited ${op.busyMs} ms (busyTimeoutMs) ${what}.`;
        op.reject(new StoreUnavailableError(message, cause === undefined ? undefined : { cause }));
      } else queue[kept++] = op;
    }
    queue.length = kept;
  }

  /**
   * Run the head of the queue: one solo operation, or the batch of
   * operations up to the next solo one. Throws only SQLITE_BUSY, with the
   * queue as it was (nothing ran, or what ran was rolled back).
   */
  #runOnce(): void {
    const db = this.#db;
    const queue = this.#queue;
    const head = queue[0]!;
    if (head.solo) {
      let value: unknown;
      try {
        value = head.run();
      } catch (error) {
        if (isBusy(error)) throw error;
        queue.shift();
        head.reject(error);
        return;
      }
      queue.shift();
      head.resolve(value as never);
      return;
    }
    let n = 1;
    while (n < queue.length && n < MAX_BATCH && !queue[n]!.solo) n++;
    const ops = queue.splice(0, n);
    let sql = this.#sql;
    if (sql === undefined) {
      try {
        sql = {
          begin: db.prepare('BEGIN IMMEDIATE'),
          commit: db.prepare('COMMIT'),
          rollback: db.prepare('ROLLBACK'),
          savepoint: db.prepare('SAVEPOINT oncely_operation'),
          release: db.prepare('RELEASE oncely_operation'),
          undo: db.prepare('ROLLBACK TO oncely_operation'),
        };
      } catch (error) {
        // A Database closed before its first batch.
        for (const op of ops) op.reject(error);
        return;
      }
      this.#sql = sql;
    }
    // Inside a transaction the caller opened on this connection itself (not
    // through the gate): the operations join it, as they always did.
    const own = !db.inTransaction;
    if (own) {
      try {
        sql.begin.run();
      } catch (error) {
        if (isBusy(error)) {
          queue.unshift(...ops);
          throw error;
        }
        for (const op of ops) op.reject(error);
        return;
      }
    }
    const values: unknown[] = new Array(n);
    let failed: Map<number, unknown> | undefined;
    for (let i = 0; i < n; i++) {
      const op = ops[i]!;
      try {
        if (op.multi) sql.savepoint.run();
        values[i] = op.run();
        if (op.multi) sql.release.run();
      } catch (error) {
        if (op.multi && db.inTransaction) {
          try {
            sql.undo.run();
            sql.release.run();
          } catch {
            // The transaction is gone: handled below.
          }
        }
        if (own && !db.inTransaction) {
          // The error rolled the whole transaction back: the operations
          // before this one did not land either. They run again, with those
          // after it, in a new transaction.
          ops.splice(i, 1);
          queue.unshift(...ops);
          op.reject(error);
          return;
        }
        failed ??= new Map();
        failed.set(i, error);
      }
    }
    if (own) {
      try {
        sql.commit.run();
      } catch (error) {
        // A COMMIT that failed leaves the transaction open: nothing of the batch landed.
        if (db.inTransaction) {
          try {
            sql.rollback.run();
          } catch {
            // The connection is broken; the error says why.
          }
        }
        if (isBusy(error)) {
          queue.unshift(...ops);
          throw error;
        }
        for (const op of ops) op.reject(error);
        return;
      }
    }
    for (let i = 0; i < n; i++) {
      if (failed?.has(i)) ops[i]!.reject(failed.get(i));
      else ops[i]!.resolve(values[i] as never);
    }
  }
}

const writers = new WeakMap<SqliteDatabase, Writer>();

/** The writer (and gate) of `db`, shared by every store on it and by {@link sqliteTransaction}. */
function writerOf(db: SqliteDatabase): Writer {
  let writer = writers.get(db);
  if (writer === undefined) {
    writer = new Writer(db);
    writers.set(db, writer);
  }
  return writer;
}

/**
 * Options of {@link sqliteTransaction}.
 *
 * @example
 * ```ts
 * const options: SqliteTransactionOptions = { busyTimeoutMs: 2_000 };
 * ```
 */
export interface SqliteTransactionOptions {
  /** Longest wait for the turn and for another connection's write lock, ms. Default 5 000. */
  busyTimeoutMs?: number;
}

/**
 * Run your own transaction (`BEGIN IMMEDIATE` … `COMMIT`) on a `Database`
 * that transactional mode also uses. A better-sqlite3 `Database` is one
 * connection, so while a transaction is open every write through it belongs
 * to that transaction: this one takes turns with oncely's transactions, and
 * the store's own writes (claims, heartbeats, purges) wait for it, as they
 * do for oncely's. `fn` may `await` between its statements. It commits when
 * `fn` resolves and rolls back when it throws (the error is re-thrown).
 *
 * @throws {@link RolledBackError} when the transaction ended inside `fn` (a
 * `RAISE(ROLLBACK)`, an `INSERT OR ROLLBACK`, or `fn` running COMMIT itself).
 * @throws {@link StoreUnavailableError} when the turn or the write lock did not come within `busyTimeoutMs`.
 *
 * @example
 * ```ts
 * import { sqliteTransaction } from 'oncely/stores/sqlite';
 *
 * await sqliteTransaction(database, async (db) => {
 *   db.prepare('UPDATE accounts SET balance = balance - ? WHERE id = ?').run(500, 'acct_1');
 *   db.prepare('UPDATE accounts SET balance = balance + ? WHERE id = ?').run(500, 'acct_2');
 * });
 * ```
 */
export async function sqliteTransaction<D extends SqliteDatabase, T>(
  database: D,
  fn: (database: D) => T | Promise<T>,
  options: SqliteTransactionOptions = {},
): Promise<T> {
  const busyMs = options.busyTimeoutMs ?? 5_000;
  if (typeof busyMs !== 'number' || !Number.isFinite(busyMs) || busyMs < 0) {
    throw new ConfigError(`busyTimeoutMs must be a finite number of ms, 0 or more (got ${String(busyMs)}).`);
  }
  const writer = writerOf(database);
  const gate = writer.gate;
  // Take turns: the gate is taken in the same step that found it free,
  // after the store writes asked before (they commit first).
  await writer.solo('opening a transaction', busyMs, () => {
    gate.take();
    try {
      database.exec('BEGIN IMMEDIATE');
    } catch (error) {
      gate.release();
      throw error;
    }
  });
  try {
    const result = await fn(database);
    if (!database.inTransaction) {
      throw new RolledBackError(
        'The transaction ended inside the function (an error rolled it back, or it ran COMMIT or ROLLBACK): ' +
          'its later writes were not part of it.',
      );
    }
    database.exec('COMMIT');
    return result;
  } catch (error) {
    if (database.inTransaction) database.exec('ROLLBACK');
    throw error;
  } finally {
    gate.release();
  }
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
  outcome TEXT,
  owner TEXT
);
CREATE INDEX IF NOT EXISTS "${name}_expires_at" ON "${name}" (expires_at);
CREATE TABLE IF NOT EXISTS "${sessionsTableName(name)}" (
  id TEXT NOT NULL PRIMARY KEY,
  expires_at INTEGER NOT NULL
) WITHOUT ROWID;`;
}

/**
 * Create the store's table, its index and the process sessions table in
 * `db` when missing, and add the `owner` column to a table made by an
 * earlier version. {@link sqliteStore} does this by itself unless `migrate: false`.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { migrateSqlite } from 'oncely/stores/sqlite';
 * migrateSqlite(new Database('oncely.db'), { table: 'oncely_records' });
 * ```
 */
export function migrateSqlite(db: SqliteDatabase, options: SqliteMigrateOptions = {}): void {
  const table = tableName(options.table);
  db.exec(sqliteSchemaSql(table));
  const columns = db.prepare(`SELECT count(*) AS n FROM pragma_table_info('${table}') WHERE name = 'owner'`).get() as { n: number };
  if (columns.n > 0) return;
  try {
    db.exec(`ALTER TABLE "${table}" ADD COLUMN owner TEXT`);
  } catch (error) {
    // Another process added it first.
    if (!/duplicate column name/i.test(String((error as Error).message))) throw error;
  }
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
  // From now on, waiting for another process's lock is the store's business, never a sleep in the loop.
  if (options.configure !== false) db.pragma('busy_timeout = 0');

  const t = `"${table}"`;
  const st = `"${sessionsTableName(table)}"`;
  const busyMs = Math.max(0, Math.floor(options.busyTimeoutMs ?? 5000));
  let prepare: (source: string) => SqliteStatement = (source) => db.prepare(source);
  if (options.migrate === false) {
    // A schema from an earlier version fails here, at startup, with what to do.
    prepare = (source) => {
      try {
        return db.prepare(source);
      } catch (error) {
        throw new ConfigError(
          `The oncely SQLite schema of table ${JSON.stringify(table)} is missing or older than this version ` +
            `(${(error as Error).message}): run migrateSqlite(database, { table: ${JSON.stringify(table)} }) once.`,
        );
      }
    };
  }
  const begin = prepare('BEGIN IMMEDIATE');
  const commit = prepare('COMMIT');
  const rollback = prepare('ROLLBACK');
  const select = prepare(
    `SELECT state, token, fingerprint, lease_until, expires_at, outcome, owner FROM ${t} WHERE id = ?`,
  );
  const insert = prepare(
    `INSERT OR REPLACE INTO ${t} (id, state, token, fingerprint, lease_until, expires_at, outcome, owner) VALUES (?, ${IN_PROGRESS}, ?, ?, ?, ?, NULL, ?)`,
  );
  const takeOver = prepare(
    `UPDATE ${t} SET token = ?, lease_until = ?, expires_at = max(expires_at, ?), owner = ? WHERE id = ?`,
  );
  const renewStmt = prepare(
    `UPDATE ${t} SET lease_until = ?, expires_at = max(expires_at, ?) WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ?`,
  );
  const completeStmt = prepare(
    `UPDATE ${t} SET state = ${COMPLETED}, outcome = ?, expires_at = ? WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ?`,
  );
  const releaseStmt = prepare(
    `DELETE FROM ${t} WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ?`,
  );
  const getStmt = prepare(
    `SELECT state, token, fingerprint, lease_until, expires_at, outcome, owner FROM ${t} WHERE id = ? AND expires_at > ?`,
  );
  const deleteStmt = prepare(`DELETE FROM ${t} WHERE id = ? RETURNING expires_at`);
  // Oldest first on the expires_at index; by rowid, so the delete needs no
  // second lookup through the primary key.
  const purgeStmt = prepare(
    `DELETE FROM ${t} WHERE rowid IN (SELECT rowid FROM ${t} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)`,
  );
  const heartbeatStmt = prepare(
    `INSERT INTO ${st} (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at`,
  );
  const aliveStmt = prepare(`SELECT 1 AS alive FROM ${st} WHERE id = ? AND expires_at > ?`);
  const endStmt = prepare(`DELETE FROM ${st} WHERE id = ?`);
  // Sessions that ended: a handful of rows (one per process that stopped since the last batch).
  const purgeSessionsStmt = prepare(`DELETE FROM ${st} WHERE expires_at <= ?`);

  const inProgress = (row: Row, at: number): ClaimResult =>
    row.owner === null
      ? { status: 'in_progress', fingerprint: row.fingerprint, leaseUntil: row.lease_until, now: at }
      : { status: 'in_progress', fingerprint: row.fingerprint, leaseUntil: row.lease_until, now: at, owner: row.owner };
  /** The claim may take this live, in-progress record over: its lease ended, or its owner is the session named by `takeoverFrom` (whose liveness is checked under the write lock). */
  const mayTake = (row: Row, input: ClaimInput, at: number): boolean =>
    row.fingerprint === input.fingerprint &&
    (row.lease_until <= at || (input.takeoverFrom !== undefined && row.owner === input.takeoverFrom));

  const decide = (id: string, input: ClaimInput, at: number): ClaimResult => {
    const row = select.get(id) as Row | undefined;
    const leaseUntil = at + Math.round(input.leaseMs);
    const expiresAt = at + Math.round(Math.max(input.ttlMs, input.leaseMs));
    const owner = input.owner ?? null;
    if (row === undefined || row.expires_at <= at) {
      const token = newToken();
      insert.run(id, token, input.fingerprint, leaseUntil, expiresAt, owner);
      return { status: 'acquired', token, takeover: false, leaseUntil };
    }
    if (row.state === COMPLETED) return { status: 'completed', record: completed(row) };
    // A session that came back after the caller looked keeps its claims.
    const takeable =
      mayTake(row, input, at) && (row.lease_until <= at || aliveStmt.get(row.owner, at) === undefined);
    if (takeable) {
      const token = newToken();
      takeOver.run(token, leaseUntil, expiresAt, owner, id);
      return { status: 'acquired', token, takeover: true, leaseUntil };
    }
    return inProgress(row, at);
  };

  // Every write goes through the Database's writer: the writes asked for in
  // one turn of the event loop commit together, in one BEGIN IMMEDIATE, at
  // its end; while a transaction of transactional mode is open they wait for
  // it (run inside it, they would commit or roll back with its business
  // writes); another process's write lock is waited out asynchronously, up
  // to busyTimeoutMs (SQLite's own busy handler would sleep inside the call,
  // blocking this event loop, so once set up the connection runs with
  // busy_timeout 0, see `configure`).
  const writer = writerOf(db);
  const gate = writer.gate;
  /**
   * Records (and sessions) with a write of this store still queued. A read
   * of one of them joins the queue behind that write, so that this process
   * reads its own writes in the order asked (a completion, then a read of
   * the record, in one turn). Cleared whenever no write is queued.
   */
  const dirty = new Set<string>();
  const dirtySessions = new Set<string>();
  let queuedWrites = 0;
  const written = (): void => {
    if (--queuedWrites === 0) {
      dirty.clear();
      dirtySessions.clear();
    }
  };
  const write = <T>(what: string, body: () => T, multi = false): Promise<T> => {
    queuedWrites++;
    return writer.batched(what, busyMs, body, multi).then(
      (value) => {
        written();
        return value;
      },
      (error: unknown) => {
        written();
        throw error;
      },
    );
  };
  /**
   * Whether a read of `key` must queue behind this store's queued writes.
   * Not while a transaction of transactional mode is open: reads never wait
   * for one (they answer at once, inside it, as they always did).
   */
  const behind = (keys: Set<string>, key: string): boolean => queuedWrites > 0 && keys.has(key) && !gate.held;

  const purge = (limit: number): number => {
    const at = now();
    purgeSessionsStmt.run(at);
    return purgeStmt.run(at, Math.max(0, Math.floor(limit))).changes;
  };
  // A database the user closed has nothing left to purge, and a transaction
  // left open is not ours to write into: the drain ends quietly. A purge
  // runs alone (autocommit statements), in its turn among the writes.
  let timer =
    purging === undefined
      ? undefined
      : startPurge(
          { purgeExpired: async (limit) => (db.open && !db.inTransaction ? writer.solo('a purge', busyMs, () => purge(limit)) : 0) },
          purging,
        );

  const sessions: StoreSessions = {
    heartbeat: (session, ttlMs) => {
      const until = now() + Math.round(ttlMs);
      dirtySessions.add(session);
      return write('a session heartbeat', () => {
        heartbeatStmt.run(session, until);
      });
    },
    async alive(session) {
      const at = now();
      if (behind(dirtySessions, session)) return writer.batched('a read', busyMs, () => aliveStmt.get(session, at) !== undefined);
      return aliveStmt.get(session, at) !== undefined;
    },
    end: (session) => {
      dirtySessions.add(session);
      return write('the end of a session', () => {
        endStmt.run(session);
      });
    },
  };

  const read = (id: string, at: number): StoredRecord | null => {
    const row = getStmt.get(id, at) as Row | undefined;
    if (row === undefined) return null;
    if (row.state === COMPLETED) return completed(row);
    const record: InProgressRecord = {
      state: 'in_progress',
      fingerprint: row.fingerprint,
      leaseUntil: row.lease_until,
      expiresAt: row.expires_at,
    };
    return record;
  };

  const transactions: StoreTransactions<SqliteDatabase> = {
    async open(id, token): Promise<StoreTransaction<SqliteDatabase>> {
      // Take turns: the gate is taken in the same step that found it free,
      // after the writes asked before (they commit first, outside it).
      await writer.solo('opening a transaction', busyMs, () => {
        gate.take();
        try {
          begin.run();
        } catch (error) {
          gate.release();
          throw error;
        }
      });
      let ended = false;
      const end = (): void => {
        if (ended) return;
        ended = true;
        gate.release();
      };
      return {
        client: db,
        async commit(outcome, ttlMs) {
          if (ended) throw new ConfigError(`The transaction of record ${id} has already ended.`);
          try {
            // Some errors roll a SQLite transaction back by themselves, and a
            // handler may have run COMMIT or ROLLBACK: the completion would then commit alone.
            if (!db.inTransaction) {
              throw new RolledBackError(
                `The transaction of record ${id} ended inside the handler (an error rolled it back, or the handler ran ` +
                  'COMMIT or ROLLBACK): its writes cannot commit with the completion, which was not stored.',
              );
            }
            const at = now();
            if (completeStmt.run(outcome, at + Math.round(ttlMs), id, token, at).changes !== 1) {
              // Fenced: another owner holds the record. Nothing of this run may stay.
              rollback.run();
              return false;
            }
            commit.run();
            return true;
          } catch (error) {
            // A COMMIT that failed (SQLITE_BUSY, I/O) leaves the transaction open: roll it back.
            if (db.inTransaction) {
              try {
                rollback.run();
              } catch {
                // The connection is broken; the error below says why.
              }
            }
            throw error;
          } finally {
            end();
          }
        },
        async rollback() {
          if (ended) return;
          try {
            if (db.inTransaction) rollback.run();
          } finally {
            end();
          }
        },
      };
    },
  };

  return {
    name: 'sqlite',
    capabilities: CAPABILITIES,
    table,
    sessionsTable: sessionsTableName(table),
    sessions,
    transactions,
    async claim(id, input) {
      // A live record that this claim cannot take is answered from a plain
      // read, without the write lock: replays and duplicates in flight never
      // queue behind writers. Anything else is decided in the batch's
      // BEGIN IMMEDIATE transaction (read again there, under the write lock),
      // as is any claim of a record with a write of ours still queued.
      const at = now();
      if (!behind(dirty, id)) {
        const row = select.get(id) as Row | undefined;
        if (row !== undefined && row.expires_at > at) {
          if (row.state === COMPLETED) return { status: 'completed', record: completed(row) };
          if (!mayTake(row, input, at)) return inProgress(row, at);
        }
      }
      dirty.add(id);
      return write('a claim', () => decide(id, input, at));
    },
    async claimMany(ids, input) {
      if (ids.length === 0) return [];
      const at = now();
      for (const id of ids) dirty.add(id);
      // All or nothing: under a savepoint of its own in the batch.
      return write('a claim', () => ids.map((id) => decide(id, input, at)), ids.length > 1);
    },
    renew(id, token, leaseMs) {
      const at = now();
      const until = at + Math.round(leaseMs);
      dirty.add(id);
      return write('a renewal', () => renewStmt.run(until, until, id, token, at).changes === 1);
    },
    complete(id, token, outcome, ttlMs) {
      const at = now();
      dirty.add(id);
      return write('a completion', () => completeStmt.run(outcome, at + Math.round(ttlMs), id, token, at).changes === 1);
    },
    release(id, token) {
      const at = now();
      dirty.add(id);
      return write('a release', () => releaseStmt.run(id, token, at).changes === 1);
    },
    async get(id): Promise<StoredRecord | null> {
      const at = now();
      if (behind(dirty, id)) return writer.batched('a read', busyMs, () => read(id, at));
      return read(id, at);
    },
    delete(id) {
      const at = now();
      dirty.add(id);
      return write('a delete', () => {
        const row = deleteStmt.get(id) as { expires_at: number } | undefined;
        return row !== undefined && row.expires_at > at;
      });
    },
    async purgeExpired(limit) {
      return writer.solo('a purge', busyMs, () => purge(limit));
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
