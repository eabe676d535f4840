/**
 * `oncely/consumer/inbox`: the transactional inbox. The processed message id
 * and the handler's own writes commit in one database transaction, so the
 * effect on that database is exactly once: a crash at any point leaves both
 * or neither, and a redelivered message finds its id and is skipped.
 *
 * - Postgres (`pg` Pool): `BEGIN`; `INSERT INTO <table>(consumer, message_id)
 *   … ON CONFLICT DO NOTHING`; if the row was inserted, the handler runs with
 *   the open transaction's client; `COMMIT`. A concurrent copy waits on the
 *   row lock and then finds it committed (duplicate) or rolled back (runs).
 * - SQLite (better-sqlite3): the same in one synchronous `BEGIN IMMEDIATE`
 *   transaction; the handler receives the `Database` inside it and MUST be
 *   synchronous (better-sqlite3 transactions cannot span an `await`; a
 *   returned Promise is refused and rolled back).
 *
 * Effects outside the database (emails, HTTP calls) are not covered: use the
 * idempotent consumer (`oncely/consumer`) with an idempotency key downstream.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { postgresInbox } from 'oncely/consumer/inbox';
 *
 * const inbox = postgresInbox({ pool: new pg.Pool(), consumer: 'ledger' });
 * await inbox.migrate();
 * await inbox.handle(event.id, (client) => client.query('INSERT INTO entries … VALUES ($1)', [event.amount]));
 * ```
 * @module
 */
import { isThenable } from '../engine/thenable.js';
import { ConfigError, RolledBackError } from '../errors/index.js';

/**
 * The answer of an inbox: the handler ran and committed, or the id was already processed.
 *
 * @example
 * ```ts
 * const result: InboxResult<void> = await inbox.handle(id, apply);
 * if (result.status === 'duplicate') console.log('already applied');
 * ```
 */
export type InboxResult<T> = { status: 'processed'; result: T } | { status: 'duplicate' };

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;

function tableName(table: string | undefined): string {
  const name = table ?? 'oncely_inbox';
  if (!IDENTIFIER.test(name)) throw new ConfigError(`Inbox table name ${JSON.stringify(name)} must be letters, digits and underscores.`);
  return name;
}

function checkArgs(consumer: string, messageId: string): void {
  if (typeof consumer !== 'string' || consumer.length === 0) throw new ConfigError('An inbox needs a consumer name.');
  if (typeof messageId !== 'string' || messageId.length === 0) throw new ConfigError('An inbox message id must be a non-empty string.');
}

// ─── Postgres ────────────────────────────────────────────────────────────────

/**
 * The part of a `pg` client (from `pool.connect()`) the inbox uses.
 *
 * @example
 * ```ts
 * await inbox.handle(id, (client: PgInboxClient) => client.query('INSERT INTO entries (id) VALUES ($1)', [id]));
 * ```
 */
export interface PgInboxClient {
  /** `command` is the statement's tag: a `COMMIT` of an aborted transaction answers `'ROLLBACK'`. */
  query(text: string, values?: unknown[]): Promise<{ rowCount: number | null; command: string }>;
  release(error?: Error | boolean): void;
}

/**
 * The part of a `pg` Pool the inbox uses.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * const pool: PgInboxPool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
 * ```
 */
export interface PgInboxPool {
  connect(): Promise<PgInboxClient>;
}

/**
 * Options of {@link postgresInbox}.
 *
 * @example
 * ```ts
 * const options: PostgresInboxOptions = { pool, consumer: 'ledger', table: 'ledger_inbox' };
 * ```
 */
export interface PostgresInboxOptions {
  /** The user's `pg` Pool; never closed by the inbox. */
  pool: PgInboxPool;
  /** Consumer name: ids are unique per (consumer, message id). */
  consumer: string;
  /** Table name. Default `oncely_inbox`. */
  table?: string;
}

/**
 * A Postgres transactional inbox.
 *
 * @example
 * ```ts
 * const inbox: PostgresInbox = postgresInbox({ pool, consumer: 'ledger' });
 * await inbox.migrate();
 * ```
 */
export interface PostgresInbox {
  /** The table it uses. */
  readonly table: string;
  /** Create the table when missing. */
  migrate(): Promise<void>;
  /**
   * Run `handler` in a transaction with the processed-id row, unless the id
   * was processed before. A thrown error rolls both back and is re-thrown.
   * A transaction that COMMIT rolled back (a statement failed inside the
   * handler, even one the handler caught) rejects too: nothing was stored.
   */
  handle<T>(messageId: string, handler: (client: PgInboxClient) => Promise<T> | T): Promise<InboxResult<T>>;
  /** Delete ids processed more than `olderThanMs` ago (keep it above any redelivery horizon); answers how many. */
  purge(olderThanMs: number): Promise<number>;
}

/**
 * The SQL that creates a Postgres inbox table (idempotent).
 *
 * @example
 * ```ts
 * console.log(postgresInboxSchemaSql('oncely_inbox'));
 * ```
 */
export function postgresInboxSchemaSql(table = 'oncely_inbox'): string {
  const t = tableName(table);
  return `CREATE TABLE IF NOT EXISTS ${t} (
  consumer text NOT NULL,
  message_id text NOT NULL,
  processed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS ${t}_processed_at ON ${t} (processed_at);`;
}

function rolledBack(messageId: string): RolledBackError {
  return new RolledBackError(
    `oncely inbox: the transaction of message ${JSON.stringify(messageId)} was rolled back at COMMIT: a statement failed ` +
      'inside the handler and left the transaction aborted (in PostgreSQL a caught error does not undo that). Neither the ' +
      "handler's writes nor the message id were stored; the message will run again. To tolerate a failing statement, " +
      'run it in a SAVEPOINT, or avoid the error (INSERT … ON CONFLICT DO NOTHING).',
  );
}

/**
 * A transactional inbox on Postgres.
 *
 * @example
 * ```ts
 * const inbox = postgresInbox({ pool, consumer: 'ledger' });
 * const result = await inbox.handle(msg.id, async (client) => {
 *   await client.query('UPDATE accounts SET balance = balance + $1 WHERE id = $2', [amount, account]);
 * });
 * if (result.status === 'duplicate') console.log('already applied');
 * ```
 */
export function postgresInbox(options: PostgresInboxOptions): PostgresInbox {
  const { pool, consumer } = options;
  const table = tableName(options.table);
  checkArgs(consumer, '-');
  const insert = `INSERT INTO ${table} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`;
  return {
    table,
    async migrate() {
      const client = await pool.connect();
      try {
        await client.query(postgresInboxSchemaSql(table));
      } finally {
        client.release();
      }
    },
    async handle<T>(messageId: string, handler: (client: PgInboxClient) => Promise<T> | T): Promise<InboxResult<T>> {
      checkArgs(consumer, messageId);
      const client = await pool.connect();
      let broken: Error | undefined;
      try {
        await client.query('BEGIN');
        try {
          const inserted = await client.query(insert, [consumer, messageId]);
          if (inserted.rowCount !== 1) {
            await client.query('ROLLBACK');
            return { status: 'duplicate' };
          }
          const result = await handler(client);
          const committed = await client.query('COMMIT');
          // A statement that failed inside the handler (even one the handler caught) aborts the
          // transaction; COMMIT then rolls it back without an error. Nothing was written.
          if (committed.command === 'ROLLBACK') throw rolledBack(messageId);
          return { status: 'processed', result };
        } catch (error) {
          try {
            // Harmless after a COMMIT that rolled back (a warning, no error).
            await client.query('ROLLBACK');
          } catch (rollbackError) {
            // The connection is unusable: the pool must discard it.
            broken = rollbackError instanceof Error ? rollbackError : new Error(String(rollbackError));
          }
          throw error;
        }
      } finally {
        client.release(broken);
      }
    },
    async purge(olderThanMs) {
      const client = await pool.connect();
      try {
        const result = await client.query(
          `DELETE FROM ${table} WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2::double precision / 1000)`,
          [consumer, olderThanMs],
        );
        return result.rowCount ?? 0;
      } finally {
        client.release();
      }
    },
  };
}

// ─── SQLite ──────────────────────────────────────────────────────────────────

/**
 * A better-sqlite3 transaction function (only what the inbox calls).
 *
 * @example
 * ```ts
 * const run: SqliteInboxTransaction<number> = db.transaction(() => 1);
 * run.immediate();
 * ```
 */
export interface SqliteInboxTransaction<T> {
  (): T;
  immediate(): T;
}

/**
 * The part of a better-sqlite3 `Database` the inbox uses.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * const db: SqliteInboxDatabase = new Database('app.db');
 * ```
 */
export interface SqliteInboxDatabase {
  prepare(source: string): { run(...params: unknown[]): { changes: number } };
  exec(source: string): unknown;
  transaction<F extends (...args: never[]) => unknown>(fn: F): SqliteInboxTransaction<ReturnType<F>>;
}

/**
 * Options of {@link sqliteInbox}.
 *
 * @example
 * ```ts
 * const options: SqliteInboxOptions = { database: db, consumer: 'ledger' };
 * ```
 */
export interface SqliteInboxOptions<D extends SqliteInboxDatabase = SqliteInboxDatabase> {
  /** The user's better-sqlite3 `Database`; never closed by the inbox. */
  database: D;
  /** Consumer name: ids are unique per (consumer, message id). */
  consumer: string;
  /** Table name. Default `oncely_inbox`. */
  table?: string;
  /** Create the table when missing. Default true. */
  migrate?: boolean;
}

/**
 * A SQLite transactional inbox.
 *
 * @example
 * ```ts
 * const inbox: SqliteInbox = sqliteInbox({ database: db, consumer: 'ledger' });
 * inbox.handle(id, (db) => db.prepare('INSERT INTO entries (id) VALUES (?)').run(id));
 * ```
 */
export interface SqliteInbox<D extends SqliteInboxDatabase = SqliteInboxDatabase> {
  /** The table it uses. */
  readonly table: string;
  /**
   * Run `handler` synchronously in one `BEGIN IMMEDIATE` transaction with the
   * processed-id row, unless the id was processed before. The handler must be
   * synchronous; a thrown error rolls both back and is re-thrown.
   */
  handle<T>(messageId: string, handler: (database: D) => T): InboxResult<T>;
  /** Delete ids processed more than `olderThanMs` ago; answers how many. */
  purge(olderThanMs: number): number;
}

/**
 * The SQL that creates a SQLite inbox table (idempotent).
 *
 * @example
 * ```ts
 * db.exec(sqliteInboxSchemaSql());
 * ```
 */
export function sqliteInboxSchemaSql(table = 'oncely_inbox'): string {
  const t = tableName(table);
  return `CREATE TABLE IF NOT EXISTS ${t} (
  consumer TEXT NOT NULL,
  message_id TEXT NOT NULL,
  processed_at INTEGER NOT NULL,
  PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ${t}_processed_at ON ${t} (processed_at);`;
}

/**
 * A transactional inbox on SQLite (better-sqlite3). The handler is synchronous.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * const db = new Database('app.db');
 * const inbox = sqliteInbox({ database: db, consumer: 'ledger' });
 * inbox.handle(event.id, (db) => db.prepare('INSERT INTO entries (payment, amount) VALUES (?, ?)').run(event.payment, event.amount));
 * ```
 */
export function sqliteInbox<D extends SqliteInboxDatabase>(options: SqliteInboxOptions<D>): SqliteInbox<D> {
  const { database, consumer } = options;
  const table = tableName(options.table);
  checkArgs(consumer, '-');
  if (options.migrate !== false) database.exec(sqliteInboxSchemaSql(table));
  const insert = database.prepare(`INSERT INTO ${table} (consumer, message_id, processed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING`);
  const purge = database.prepare(`DELETE FROM ${table} WHERE consumer = ? AND processed_at < ?`);
  return {
    table,
    handle<T>(messageId: string, handler: (database: D) => T): InboxResult<T> {
      checkArgs(consumer, messageId);
      const run = database.transaction((): InboxResult<T> => {
        if (insert.run(consumer, messageId, Date.now()).changes !== 1) return { status: 'duplicate' };
        const result = handler(database);
        if (isThenable(result)) {
          // The transaction would commit before the promise's writes: refuse, and roll back.
          throw new ConfigError('A SQLite inbox handler must be synchronous (better-sqlite3 transactions cannot span an await).');
        }
        return { status: 'processed', result };
      });
      // IMMEDIATE takes the write lock first, so two processes never deadlock upgrading a read lock.
      return run.immediate() as InboxResult<T>;
    },
    purge(olderThanMs) {
      return purge.run(consumer, Date.now() - olderThanMs).changes;
    },
  };
}
