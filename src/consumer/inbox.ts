/**
 * `oncely/consumer/inbox`: the transactional inbox, built on transactional
 * mode. A message id is an idempotency record (the same record an
 * {@link IdempotentConsumer} of the same name keeps), and the handler's own
 * writes commit in one database transaction with that record's completion.
 * A crash at any point leaves both or neither; a redelivered message finds
 * its record completed and is skipped. The effect on that database is
 * exactly once.
 *
 * There is one mechanism, not two: `inbox.handle(id, fn)` is what an
 * idempotent consumer in transactional mode does for one message
 * (`await context.transaction()` in its handler), usable without a broker
 * adapter, and waiting for a copy that is in flight elsewhere.
 *
 * - {@link postgresInbox}: a `pg` Pool; the handler gets a client inside `BEGIN`.
 * - {@link sqliteInbox}: a better-sqlite3 `Database`; the handler gets it inside `BEGIN IMMEDIATE`.
 * - {@link inbox}: any store with transactional mode (`mysqlStore` too), or an engine over one.
 *
 * Effects outside the database (emails, HTTP calls) are not covered: send
 * them with an idempotency key of their own (`context.step()` derives one).
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { postgresInbox } from 'oncely/consumer/inbox';
 *
 * const inbox = postgresInbox({ pool: new pg.Pool(), consumer: 'ledger' });
 * await inbox.migrate();
 * await inbox.handle(event.id, (client) => client.query('INSERT INTO entries (amount) VALUES ($1)', [event.amount]));
 * ```
 * @module
 */
import type { Engine, StepContext, WaitOptions } from '../engine/engine.js';
import type { RecordIdSecret } from '../engine/fingerprint.js';
import type { IdempotencyStore } from '../engine/store.js';
import { ConfigError, LeaseLostError, StoreUnavailableError } from '../errors/index.js';
import {
  migratePostgres,
  type PgQueryable,
  type PgTransactionPool,
  type PostgresStore,
  postgresStore,
} from '../stores/postgres.js';
import { type SqliteDatabase, type SqliteStore, sqliteStore } from '../stores/sqlite.js';
import { IdempotentConsumer } from './core.js';

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

/**
 * What an inbox handler receives beside the transaction's handle.
 *
 * @example
 * ```ts
 * await inbox.handle(id, async (client, { takeover }) => { if (takeover) log('resuming after a crash'); });
 * ```
 */
export interface InboxContext {
  /** The message id. */
  id: string;
  /** The record id in the store. */
  recordId: string;
  /** Aborts when the lease is lost (another process took the message over): its writes will not commit. */
  signal: AbortSignal;
  /** True when an earlier attempt crashed or stalled holding this id and this run took it over. */
  takeover: boolean;
  /** A recovery point for an effect outside the database, with a key of its own (see `Claim.step`). */
  step<T>(name: string, fn: (step: StepContext) => T | Promise<T>): Promise<T>;
}

/**
 * An inbox handler: its writes through `tx` commit with the message's record.
 *
 * @example
 * ```ts
 * const apply: InboxHandler<pg.PoolClient, void> = async (client) => { await client.query('…'); };
 * ```
 */
export type InboxHandler<C, T> = (tx: C, context: InboxContext) => T | Promise<T>;

/**
 * Options of {@link inbox}.
 *
 * @example
 * ```ts
 * const options: InboxOptions = { store: mysqlStore({ pool }), consumer: 'ledger' };
 * ```
 */
export interface InboxOptions<C = unknown> {
  /** Consumer name: ids are unique per (consumer, message id), shared with an `IdempotentConsumer` of that name. */
  consumer: string;
  /** A store with transactional mode (`postgresStore`, `mysqlStore`, `sqliteStore`). Give this or `engine`. */
  store?: IdempotencyStore;
  /** An engine over such a store (shares its process session and settings). Give this or `store`. */
  engine?: Engine;
  /** How long a processed id is remembered, ms. Keep it above the broker's redelivery horizon. Default 7 days. */
  ttlMs?: number;
  /** Lease of a message being handled, ms (renewed while it runs). Default 30 000. */
  leaseMs?: number;
  /** Longest wait for one store operation, ms. Default 2 000. */
  storeTimeoutMs?: number;
  /** Keyed record ids (an HMAC under this secret), as the consumer of the same name uses. */
  secret?: RecordIdSecret;
  /**
   * How long `handle` waits for a copy of the same id that is running
   * elsewhere to settle (then it answers `duplicate`, or runs if that copy
   * failed). Past it, `handle` rejects with an `InFlightError`: leave the
   * message to the broker's redelivery. `false`: reject at once. Default
   * `{ timeoutMs: 5_000 }`.
   */
  wait?: WaitOptions | false;
  /**
   * Ids processed by an older inbox (a table of its own, before this
   * mechanism), asked inside the transaction before the handler: `true`
   * answers `duplicate` without running it (and records the id here).
   * {@link postgresInbox} and {@link sqliteInbox} build it from `legacyTable`.
   */
  processedBefore?: (tx: C, messageId: string) => boolean | Promise<boolean>;
}

/**
 * A transactional inbox.
 *
 * @example
 * ```ts
 * const result = await inbox.handle(event.id, (tx) => apply(tx, event));
 * ```
 */
export interface Inbox<C = unknown> {
  /** The idempotent consumer that keeps the records (its name is the inbox's consumer). */
  readonly consumer: IdempotentConsumer<Job<C>>;
  /**
   * Run `handler` once for `messageId`, in one transaction with the id's
   * record. Answers `duplicate` when the id was processed before (here or by
   * the consumer of the same name). Rejects, with nothing written, when the
   * handler throws (its error), when the transaction did not commit
   * (`RolledBackError`), when the lease was lost to another process
   * (`LeaseLostError`), when a copy stayed in flight past `wait`
   * (`InFlightError`) and when the store is down (`StoreUnavailableError`).
   */
  handle<T>(messageId: string, handler: InboxHandler<C, T>): Promise<InboxResult<T>>;
  /** Stop: the engine's process session ends when the inbox made the engine. Never closes your pool or database. */
  close(): Promise<void>;
}

/** One `handle` call, carried through the consumer as its message. @internal */
export interface Job<C> {
  run(tx: C, context: InboxContext): unknown;
  result?: unknown;
  before?: boolean;
}

const SEVEN_DAYS_MS = 7 * 24 * 60 * 60 * 1000;
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;

function legacyTableName(table: string): string {
  if (!IDENTIFIER.test(table)) throw new ConfigError(`Inbox legacyTable ${JSON.stringify(table)} must be letters, digits and underscores.`);
  return table;
}

function refuseOldTable(options: object): void {
  if ('table' in options && (options as { table?: unknown }).table !== undefined) {
    throw new ConfigError(
      'The inbox no longer has a table of its own: processed ids are idempotency records in the store\'s table ' +
        '(`recordsTable`, default oncely_records). To keep honouring the ids an older inbox table holds, pass it as `legacyTable`.',
    );
  }
}

/**
 * A transactional inbox over any store with transactional mode.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * import { inbox } from 'oncely/consumer/inbox';
 * import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
 *
 * const pool = mysql.createPool({ uri: process.env.MYSQL_URL });
 * await migrateMysql(pool);
 * const ledger = inbox<mysql.PoolConnection>({ store: mysqlStore({ pool }), consumer: 'ledger' });
 * await ledger.handle(event.id, (db) => db.execute('INSERT INTO entries (amount) VALUES (?)', [event.amount]));
 * ```
 */
export function inbox<C = unknown>(options: InboxOptions<C>): Inbox<C> {
  const { consumer: name, processedBefore } = options;
  if (typeof name !== 'string' || name.length === 0) throw new ConfigError('An inbox needs a consumer name.');
  const store = options.engine?.store ?? options.store;
  if (store !== undefined && store.transactions === undefined) {
    throw new ConfigError('An inbox needs a store with transactional mode: postgresStore (with a Pool), mysqlStore or sqliteStore.');
  }
  const ownEngine = options.engine === undefined;
  const consumer = new IdempotentConsumer<Job<C>>({
    name,
    ...(options.engine === undefined
      ? {
          store: options.store,
          ttlMs: options.ttlMs ?? SEVEN_DAYS_MS,
          ...(options.leaseMs === undefined ? {} : { leaseMs: options.leaseMs }),
          ...(options.storeTimeoutMs === undefined ? {} : { storeTimeoutMs: options.storeTimeoutMs }),
        }
      : { engine: options.engine }),
    ...(options.secret === undefined ? {} : { secret: options.secret }),
    handler: async (context) => {
      const job = context.message;
      const tx = await context.transaction<C>();
      if (processedBefore !== undefined && (await processedBefore(tx, context.id))) {
        job.before = true;
        return;
      }
      job.result = await job.run(tx, {
        id: context.id,
        recordId: context.recordId,
        signal: context.signal,
        takeover: context.takeover,
        step: context.step,
      });
    },
  });
  const wait = options.wait ?? { timeoutMs: 5_000 };
  return {
    consumer,
    async handle<T>(messageId: string, handler: InboxHandler<C, T>): Promise<InboxResult<T>> {
      if (typeof messageId !== 'string' || messageId.length === 0) throw new ConfigError('An inbox message id must be a non-empty string.');
      if (typeof handler !== 'function') throw new ConfigError('An inbox needs a handler function.');
      const job: Job<C> = { run: handler };
      const verdict = await consumer.handle(job, messageId, { wait });
      switch (verdict.action) {
        case 'processed':
          return job.before ? { status: 'duplicate' } : { status: 'processed', result: job.result as T };
        case 'duplicate':
          return { status: 'duplicate' };
        case 'fenced':
          throw new LeaseLostError(
            `The lease on message ${JSON.stringify(messageId)} was lost to another process while its handler ran; its transaction was rolled back.`,
          );
        case 'store_error':
          throw verdict.error ?? new StoreUnavailableError();
        default:
          // failed (the handler's error, or a RolledBackError), in_flight (an InFlightError).
          throw verdict.error;
      }
    },
    async close() {
      consumer.close();
      if (ownEngine) await consumer.engine.close();
    },
  };
}

// ─── PostgreSQL ──────────────────────────────────────────────────────────────

/**
 * The transaction's `pg` client as an inbox handler sees it (a `pg.PoolClient`).
 *
 * @example
 * ```ts
 * await inbox.handle(id, (client: PgInboxClient) => client.query('INSERT INTO entries (id) VALUES ($1)', [id]));
 * ```
 */
export interface PgInboxClient {
  query(text: string, values?: unknown[]): Promise<{ rowCount: number | null; rows: unknown[] }>;
}

/**
 * Options of {@link postgresInbox}.
 *
 * @example
 * ```ts
 * const options: PostgresInboxOptions = { pool, consumer: 'ledger', legacyTable: 'oncely_inbox' };
 * ```
 */
export interface PostgresInboxOptions extends Omit<InboxOptions<PgInboxClient>, 'store' | 'engine' | 'processedBefore'> {
  /** The user's `pg` Pool: the records, and each message's transaction (unless `transactionPool`). Never ended by the inbox. */
  pool: PgQueryable;
  /** Where each message's transaction takes its client (see `postgresStore`). Default `pool`. */
  transactionPool?: PgTransactionPool;
  /** Schema of the records table. Default: the connection's `search_path`. */
  schema?: string;
  /** The records table (shared with any `postgresStore` on it). Default `oncely_records`. */
  recordsTable?: string;
  /** The table of an older inbox (`consumer`, `message_id`), read, never written: its ids count as processed. */
  legacyTable?: string;
}

/**
 * A PostgreSQL transactional inbox.
 *
 * @example
 * ```ts
 * const ledger: PostgresInbox = postgresInbox({ pool, consumer: 'ledger' });
 * await ledger.migrate();
 * ```
 */
export interface PostgresInbox extends Inbox<PgInboxClient> {
  /** The store the records live in. */
  readonly store: PostgresStore;
  /** Create the records table (and its sessions table) when missing. */
  migrate(): Promise<void>;
}

/**
 * A transactional inbox on PostgreSQL (`pg`): `BEGIN`, your writes through
 * the client, the id's record completed, `COMMIT`.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { postgresInbox } from 'oncely/consumer/inbox';
 *
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
 * const ledger = postgresInbox({ pool, consumer: 'ledger' });
 * await ledger.migrate();
 * const result = await ledger.handle(event.id, async (client) => {
 *   await client.query('UPDATE accounts SET balance = balance + $1 WHERE id = $2', [event.amount, event.account]);
 * });
 * if (result.status === 'duplicate') console.log('already applied');
 * ```
 */
export function postgresInbox(options: PostgresInboxOptions): PostgresInbox {
  refuseOldTable(options);
  const { pool, schema, recordsTable } = options;
  const names = { ...(schema === undefined ? {} : { schema }), ...(recordsTable === undefined ? {} : { table: recordsTable }) };
  // The store's own rule for transactions: `transactionPool`, else `pool` when it is a Pool (a single
  // Client has none, and inbox() then refuses it with a ConfigError).
  const transactionPool = options.transactionPool === undefined ? {} : { transactionPool: options.transactionPool };
  const store = postgresStore({ pool, ...transactionPool, ...names });
  const legacy = options.legacyTable === undefined ? undefined : legacyTableName(options.legacyTable);
  const select = legacy === undefined ? '' : `SELECT 1 FROM ${legacy} WHERE consumer = $1 AND message_id = $2`;
  const base = inbox<PgInboxClient>({
    ...options,
    store,
    ...(legacy === undefined
      ? {}
      : { processedBefore: async (client, id) => ((await client.query(select, [options.consumer, id])).rowCount ?? 0) > 0 }),
  });
  return {
    ...base,
    store,
    migrate: () => migratePostgres(pool, names),
    async close() {
      await base.close();
      await store.close?.();
    },
  };
}

// ─── SQLite ──────────────────────────────────────────────────────────────────

/**
 * Options of {@link sqliteInbox}.
 *
 * @example
 * ```ts
 * const options: SqliteInboxOptions = { database: db, consumer: 'ledger' };
 * ```
 */
export interface SqliteInboxOptions<D extends SqliteDatabase = SqliteDatabase>
  extends Omit<InboxOptions<D>, 'store' | 'engine' | 'processedBefore'> {
  /** The user's better-sqlite3 `Database`; never closed by the inbox. */
  database: D;
  /** The records table (shared with any `sqliteStore` on it). Default `oncely_records`. */
  recordsTable?: string;
  /** Create the records table when missing. Default true. */
  migrate?: boolean;
  /** The table of an older inbox (`consumer`, `message_id`), read, never written: its ids count as processed. */
  legacyTable?: string;
}

/**
 * A SQLite transactional inbox.
 *
 * @example
 * ```ts
 * const ledger: SqliteInbox = sqliteInbox({ database: db, consumer: 'ledger' });
 * ```
 */
export interface SqliteInbox<D extends SqliteDatabase = SqliteDatabase> extends Inbox<D> {
  /** The store the records live in. */
  readonly store: SqliteStore;
}

/**
 * A transactional inbox on SQLite (better-sqlite3): the handler gets your
 * `Database` inside `BEGIN IMMEDIATE`; its statements are synchronous calls,
 * and it may `await` between them (other transactions of this `Database`
 * wait for this one to commit).
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { sqliteInbox } from 'oncely/consumer/inbox';
 *
 * const db = new Database('app.db');
 * const ledger = sqliteInbox({ database: db, consumer: 'ledger' });
 * await ledger.handle(event.id, (db) => db.prepare('INSERT INTO entries (payment, amount) VALUES (?, ?)').run(event.payment, event.amount));
 * ```
 */
export function sqliteInbox<D extends SqliteDatabase>(options: SqliteInboxOptions<D>): SqliteInbox<D> {
  refuseOldTable(options);
  const { database } = options;
  const store = sqliteStore({
    database,
    ...(options.recordsTable === undefined ? {} : { table: options.recordsTable }),
    ...(options.migrate === undefined ? {} : { migrate: options.migrate }),
  });
  const legacy = options.legacyTable === undefined ? undefined : legacyTableName(options.legacyTable);
  const select = legacy === undefined ? undefined : database.prepare(`SELECT 1 AS found FROM ${legacy} WHERE consumer = ? AND message_id = ?`);
  const base = inbox<D>({
    ...options,
    store,
    ...(select === undefined ? {} : { processedBefore: (_db, id) => select.get(options.consumer, id) !== undefined }),
  });
  return {
    ...base,
    store,
    async close() {
      await base.close();
      await store.close?.();
    },
  };
}
