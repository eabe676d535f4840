/**
 * PostgreSQL store over the user's own `pg` Pool or Client.
 *
 * - `claim` is one statement: `INSERT … ON CONFLICT (id) DO UPDATE … WHERE
 *   <expired, or lease expired with the same fingerprint> RETURNING`, with a
 *   `UNION ALL` that reports the existing record in the same round trip.
 * - Every deadline comes from the server's clock (`clock_timestamp()`), so
 *   clock skew between application servers changes nothing.
 * - Every statement is a named prepared statement: after the first use on a
 *   connection, each operation is one Bind/Execute round trip.
 * - Outcomes are stored as `bytea` (UTF-8): PostgreSQL `text` cannot hold
 *   U+0000, which a serialised outcome may contain.
 * - PostgreSQL has no TTL: expired records are absent to every operation and
 *   are deleted by a background purge started with the store (stopped by
 *   `close()`): batches oldest first on the `expires_at` index, rows locked
 *   with `SKIP LOCKED`, repeated while a batch comes back full.
 * - Process sessions: a row per process in `<table>_sessions` whose
 *   `expires_at` each heartbeat moves (server clock). A claim stores its
 *   owner session; a claim with `takeoverFrom` takes over a record of a
 *   session that is not alive, checked in the same statement.
 * - Transactional mode (with a `pg` Pool): `transactions.open` takes a client
 *   from the pool and runs `BEGIN`; the completion is an `UPDATE` fenced by
 *   the token inside that transaction, then `COMMIT`.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { migratePostgres, postgresStore } from 'oncely/stores/postgres';
 *
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, connectionTimeoutMillis: 2000 });
 * await migratePostgres(pool);
 * const store = postgresStore({ pool });
 * ```
 * @module
 */
import { createHash } from 'node:crypto';
import type {
  ClaimInput,
  ClaimResult,
  CompletedRecord,
  IdempotencyStore,
  StoreCapabilities,
  StoredRecord,
  StoreSessions,
  StoreTransaction,
  StoreTransactions,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { inBatchOrder } from './batch.js';
import { ConfigError, RolledBackError, StoreUnavailableError } from '../errors/index.js';
import { type PurgeOptions, purgeSettings, startPurge } from './purge.js';

export { type PurgeOptions, type PurgeReport, type PurgeRunOptions, purgeExpiredRecords } from './purge.js';

/**
 * A query as `pg` accepts it: a `name` makes it a prepared statement, reused per connection.
 *
 * @example
 * ```ts
 * const query: PgQueryConfig = { name: 'get_one', text: 'SELECT $1::int AS n', values: [1] };
 * ```
 */
export interface PgQueryConfig {
  name?: string;
  text: string;
  values?: unknown[];
}

/**
 * What `pg` answers to a query (only what the store reads).
 *
 * @example
 * ```ts
 * const { rows, rowCount }: PgQueryResult = await pool.query({ text: 'SELECT 1 AS n' });
 * ```
 */
export interface PgQueryResult {
  rows: Record<string, unknown>[];
  rowCount: number | null;
}

/**
 * The part of a `pg` Pool or Client the store uses. Declared here so that
 * oncely does not depend on `pg`; any object of this shape works.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import type { PgQueryable } from 'oncely/stores/postgres';
 * const pool: PgQueryable = new pg.Pool();
 * ```
 */
export interface PgQueryable {
  query(config: PgQueryConfig): Promise<PgQueryResult>;
}

/**
 * A client taken from a `pg` Pool (`pool.connect()`), as transactional mode
 * uses it: the handler gets it inside the open transaction.
 *
 * @example
 * ```ts
 * import type pg from 'pg';
 * const client = await claim.transaction<pg.PoolClient>(); // a PgTransactionClient
 * await client.query('INSERT INTO payments (id, amount) VALUES ($1, $2)', [id, amount]);
 * ```
 */
export interface PgTransactionClient {
  /** `command` is the statement's tag: a `COMMIT` of an aborted transaction answers `'ROLLBACK'`. */
  query(config: PgQueryConfig): Promise<PgQueryResult & { command?: string }>;
  /** Give the client back to the pool; with an error, the pool discards it. */
  release(error?: Error | boolean): void;
}

/**
 * The part of a `pg` Pool transactional mode uses: one client per transaction.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * const transactionPool: PgTransactionPool = new pg.Pool({ max: 10 });
 * ```
 */
export interface PgTransactionPool {
  connect(): Promise<PgTransactionClient>;
}

/**
 * Options of {@link postgresStore}.
 *
 * @example
 * ```ts
 * const options: PostgresStoreOptions = { pool, schema: 'app', table: 'oncely_records', purge: { intervalMs: 10_000 } };
 * ```
 */
export interface PostgresStoreOptions {
  /**
   * The user's `pg` Pool (or Client); the store never ends it. With a Pool,
   * transactional mode takes its clients from it unless `transactionPool`
   * is given; a single Client has no transactional mode.
   */
  pool: PgQueryable;
  /**
   * Where transactional mode takes a client for each transaction. Default:
   * `pool` when it is a Pool. A pool of its own keeps the store's claims,
   * renewals and session heartbeats from waiting for a connection behind
   * long business transactions (a heartbeat that waits longer than the
   * session TTL lets other processes take this process's claims over).
   */
  transactionPool?: PgTransactionPool;
  /** Schema of the table; default: the connection's `search_path`. */
  schema?: string;
  /** Table name. Default `oncely_records`. */
  table?: string;
  /**
   * Background purge of expired records: a drain every `intervalMs`
   * (default 10 000) in batches of `batch` records (default 1000), or
   * `false` to turn it off (then call {@link purgeExpiredRecords} from a
   * cron job). The timer is unref'd and stops on `close()`.
   */
  purge?: PurgeOptions | false;
}

/**
 * Options of {@link migratePostgres} and {@link postgresSchemaSql}.
 *
 * @example
 * ```ts
 * await migratePostgres(pool, { schema: 'app', table: 'oncely_records' } satisfies PostgresMigrateOptions);
 * ```
 */
export interface PostgresMigrateOptions {
  /** Schema of the table, created when missing; default: the connection's `search_path`. */
  schema?: string;
  /** Table name. Default `oncely_records`. */
  table?: string;
}

/**
 * The store {@link postgresStore} returns: an {@link IdempotencyStore} that also names its table.
 *
 * @example
 * ```ts
 * const store: PostgresStore = postgresStore({ pool, schema: 'app' });
 * console.log(store.table); // "app"."oncely_records"
 * ```
 */
export interface PostgresStore extends IdempotencyStore {
  /** The quoted, schema-qualified table name the store uses. */
  readonly table: string;
  /** The quoted, schema-qualified name of the process sessions table (`<table>_sessions`). */
  readonly sessionsTable: string;
  /** Process sessions: one row per process, its expiry on the server clock. */
  readonly sessions: StoreSessions;
  /** Transactional mode; absent when `pool` is a single Client and no `transactionPool` was given. */
  readonly transactions?: StoreTransactions<PgTransactionClient>;
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: false, serverClock: true, shared: true };
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;
/** The server's clock in epoch ms, as a one-row subquery: read once per statement. */
const NOW_FROM = '(SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms)';
/** The server's clock in epoch ms, as a scalar subquery (an init plan, evaluated once). */
const NOW = '(SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint)';
/**
 * How often `claim` re-runs its statement when the statement's snapshot
 * missed a row that a concurrent transaction committed meanwhile. One re-run
 * settles it in practice; the bound only stops a pathological livelock.
 */
const MAX_CLAIM_ATTEMPTS = 8;
/** SQLSTATE of a deadlock; batches lock rows in id order, so only foreign transactions can cause one. */
const DEADLOCK_DETECTED = '40P01';
const IN_PROGRESS = 0;
const COMPLETED = 1;

function identifier(kind: string, name: string): string {
  if (!IDENTIFIER.test(name)) {
    throw new ConfigError(`PostgreSQL ${kind} name ${JSON.stringify(name)} must be 1 to 63 letters, digits and underscores.`);
  }
  return `"${name}"`;
}

interface Names {
  table: string;
  index: string;
  schema: string | undefined;
  sessions: string;
}

function qualified(options: PostgresMigrateOptions): Names {
  const name = options.table ?? 'oncely_records';
  const table = identifier('table', name);
  const schema = options.schema === undefined ? undefined : identifier('schema', options.schema);
  const index = `"${`${name}_expires_at_idx`.slice(0, 63)}"`;
  // A name too long for the suffix keeps a hash of the whole, so two long table names never share one.
  const sessionsName =
    name.length + 9 <= 63 ? `${name}_sessions` : `${name.slice(0, 45)}_${createHash('sha256').update(name).digest('hex').slice(0, 8)}_sessions`;
  const sessions = schema === undefined ? `"${sessionsName}"` : `${schema}."${sessionsName}"`;
  return { table: schema === undefined ? table : `${schema}.${table}`, index, schema, sessions };
}

/**
 * The SQL that creates the store's table and index (idempotent): run it
 * yourself in a migration tool, or call {@link migratePostgres}.
 *
 * @example
 * ```ts
 * import { postgresSchemaSql } from 'oncely/stores/postgres';
 * console.log(postgresSchemaSql({ schema: 'app', table: 'oncely_records' }));
 * ```
 */
export function postgresSchemaSql(options: PostgresMigrateOptions = {}): string {
  const { table, index, schema, sessions } = qualified(options);
  return `${schema === undefined ? '' : `CREATE SCHEMA IF NOT EXISTS ${schema};\n`}CREATE TABLE IF NOT EXISTS ${table} (
  id          varchar(128) PRIMARY KEY,
  state       smallint     NOT NULL,          -- 0 in progress, 1 completed
  token       text,                           -- fencing token of the current owner
  fingerprint text,
  lease_until bigint       NOT NULL,          -- epoch ms, server clock
  expires_at  bigint       NOT NULL,          -- epoch ms, server clock
  takeover    boolean      NOT NULL DEFAULT false, -- the current owner took over an expired lease
  outcome     bytea,                          -- UTF-8 of the stored outcome
  owner       text                            -- process session of the current owner
);
CREATE INDEX IF NOT EXISTS ${index} ON ${table} (expires_at);
-- Tables made before process sessions: add the owner column. Looked up
-- first, since ALTER TABLE locks the table even when the column exists.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute
                  WHERE attrelid = to_regclass('${table}') AND attname = 'owner' AND NOT attisdropped) THEN
    ALTER TABLE ${table} ADD COLUMN owner text;
  END IF;
END $$;
-- One row per live process: each heartbeat moves expires_at (room left on
-- each page, so that those updates stay HOT).
CREATE TABLE IF NOT EXISTS ${sessions} (
  id          text   PRIMARY KEY,
  expires_at  bigint NOT NULL                 -- epoch ms, server clock
) WITH (fillfactor = 50);`;
}

/**
 * Create the store's table, its index and the process sessions table when
 * missing, and add the `owner` column to a table made by an earlier version,
 * in one transaction held under an advisory lock (so that several processes
 * starting at once do not race on `CREATE TABLE`). Run it again after
 * upgrading oncely.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { migratePostgres } from 'oncely/stores/postgres';
 * await migratePostgres(new pg.Pool(), { schema: 'app', table: 'oncely_records' });
 * ```
 */
export async function migratePostgres(pool: PgQueryable, options: PostgresMigrateOptions = {}): Promise<void> {
  const { table } = qualified(options);
  const lockKey = table.replace(/'/g, "''");
  // No values: pg sends a simple query, which runs its statements in one implicit transaction.
  await pool.query({
    text: `SELECT pg_advisory_xact_lock(hashtext('oncely:migrate:${lockKey}'));\n${postgresSchemaSql(options)}`,
  });
}

interface ClaimRow {
  won: boolean;
  id: string;
  takeover: boolean;
  state: number | null;
  fingerprint: string | null;
  lease_until: string;
  expires_at: string | null;
  outcome: Buffer | null;
  owner: string | null;
  now: string;
}

interface RecordRow {
  state: number;
  fingerprint: string | null;
  lease_until: string;
  expires_at: string;
  outcome: Buffer | null;
}

/**
 * Create a PostgreSQL store over the user's `pg` Pool or Client. The table
 * must exist: see {@link migratePostgres}.
 *
 * @example
 * ```ts
 * import pg from 'pg';
 * import { postgresStore } from 'oncely/stores/postgres';
 *
 * const pool = new pg.Pool({ connectionTimeoutMillis: 2000, query_timeout: 2000 });
 * pool.on('error', () => {}); // idle connections dropped by a failover must not crash the process
 * const store = postgresStore({ pool, schema: 'app' });
 * ```
 */
export function postgresStore(options: PostgresStoreOptions): PostgresStore {
  const { pool } = options;
  const { table: t, sessions: st } = qualified(options);
  // Prepared statement names are per connection and at most 63 bytes: a
  // short hash of the table keeps two stores on two tables apart.
  const prefix = `oncely_${createHash('sha256').update(t).digest('hex').slice(0, 12)}_`;

  /**
   * The claim statement. `source` yields the rows to insert (one id, or an
   * array of ids with their tokens); the UNION ALL half reports, from the
   * statement's snapshot, every record the upsert did not take. `$6` is the
   * claimer's session, `$7` the session to take over from: only while that
   * session is not alive, checked here too, so that a session that came
   * back after the caller looked keeps its claims.
   *
   * A record the snapshot shows completed and live is never inserted: ON
   * CONFLICT DO UPDATE locks the conflicting row even when its WHERE is
   * false, so a replay would otherwise be a row lock (a write, and a wait
   * behind any transaction holding the row) instead of a plain read.
   */
  const claimStatement = (source: string, ids: string, token: string, idList: string): string => `WITH n AS ${NOW_FROM},
ins AS (
  INSERT INTO ${t} AS r (id, state, token, fingerprint, lease_until, expires_at, takeover, outcome, owner)
  SELECT ${ids}, ${IN_PROGRESS}, ${token}, $3, n.ms + $4::bigint, n.ms + greatest($4::bigint, $5::bigint), false, NULL, $6::text
    FROM ${source}
   WHERE NOT EXISTS (SELECT 1 FROM ${t} d WHERE d.id = ${ids} AND d.state = ${COMPLETED} AND d.expires_at > n.ms)
  ON CONFLICT (id) DO UPDATE SET
    state = ${IN_PROGRESS},
    token = EXCLUDED.token,
    fingerprint = EXCLUDED.fingerprint,
    lease_until = EXCLUDED.lease_until,
    expires_at = CASE WHEN r.expires_at <= EXCLUDED.lease_until - $4::bigint THEN EXCLUDED.expires_at
                      ELSE greatest(r.expires_at, EXCLUDED.expires_at) END,
    takeover = r.expires_at > EXCLUDED.lease_until - $4::bigint,
    outcome = NULL,
    owner = EXCLUDED.owner
  WHERE r.expires_at <= EXCLUDED.lease_until - $4::bigint
     OR (r.state = ${IN_PROGRESS} AND r.fingerprint IS NOT DISTINCT FROM EXCLUDED.fingerprint
         AND (r.lease_until <= EXCLUDED.lease_until - $4::bigint
              OR (r.owner = $7::text
                  AND NOT EXISTS (SELECT 1 FROM ${st} s WHERE s.id = $7::text AND s.expires_at > EXCLUDED.lease_until - $4::bigint))))
  RETURNING r.id, r.takeover, r.lease_until
)
SELECT true AS won, ins.id, ins.takeover, ins.lease_until, NULL::smallint AS state, NULL::text AS fingerprint,
       NULL::bigint AS expires_at, NULL::bytea AS outcome, NULL::text AS owner, n.ms AS now
  FROM ins, n
UNION ALL
SELECT false, c.id, false, c.lease_until, c.state, c.fingerprint, c.expires_at, c.outcome, c.owner, n.ms
  FROM ${t} c, n
 WHERE c.id ${idList} AND c.expires_at > n.ms AND c.id NOT IN (SELECT id FROM ins)`;
  const claimSql = claimStatement('n', '$1::text', '$2', '= $1::text');
  // Rows are inserted in id order, so that two batches sharing ids lock them
  // in the same order and cannot deadlock each other.
  const claimManySql = claimStatement(
    '(SELECT * FROM unnest($1::text[], $2::text[]) AS b(id, token) ORDER BY b.id) b, n',
    'b.id',
    'b.token',
    '= ANY($1::text[])',
  );
  const renewSql = `UPDATE ${t} AS r SET lease_until = n.ms + $3::bigint, expires_at = greatest(r.expires_at, n.ms + $3::bigint)
  FROM ${NOW_FROM} n WHERE r.id = $1 AND r.token = $2 AND r.state = ${IN_PROGRESS} AND r.expires_at > n.ms`;
  const completeSql = `UPDATE ${t} AS r SET state = ${COMPLETED}, outcome = $3, expires_at = n.ms + $4::bigint
  FROM ${NOW_FROM} n WHERE r.id = $1 AND r.token = $2 AND r.state = ${IN_PROGRESS} AND r.expires_at > n.ms`;
  const releaseSql = `DELETE FROM ${t} AS r USING ${NOW_FROM} n
 WHERE r.id = $1 AND r.token = $2 AND r.state = ${IN_PROGRESS} AND r.expires_at > n.ms`;
  const getSql = `SELECT r.state, r.fingerprint, r.lease_until, r.expires_at, r.outcome
  FROM ${t} AS r, ${NOW_FROM} n WHERE r.id = $1 AND r.expires_at > n.ms`;
  const deleteSql = `DELETE FROM ${t} AS r USING ${NOW_FROM} n WHERE r.id = $1 RETURNING r.expires_at > n.ms AS live`;
  // Oldest first on the expires_at index; SKIP LOCKED: several purging
  // processes, and a claim holding a row, never wait for each other. The ids
  // come as one array (an init plan), so the delete finds its rows through
  // the primary key: "id IN (subquery)" may be planned as a hash join over a
  // scan of the whole table. Sessions that ended go in the same statement
  // (a handful of rows: one per process that stopped since the last batch).
  const purgeSql = `WITH gone AS (DELETE FROM ${st} WHERE id = ANY(ARRAY(
  SELECT id FROM ${st} WHERE expires_at <= ${NOW} LIMIT $1 FOR UPDATE SKIP LOCKED)))
DELETE FROM ${t} WHERE id = ANY(ARRAY(
  SELECT id FROM ${t} WHERE expires_at <= ${NOW} ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))`;
  const heartbeatSql = `INSERT INTO ${st} AS s (id, expires_at) SELECT $1, n.ms + $2::bigint FROM ${NOW_FROM} n
  ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at`;
  const aliveSql = `SELECT EXISTS (SELECT 1 FROM ${st} WHERE id = $1 AND expires_at > ${NOW}) AS alive`;
  const endSql = `DELETE FROM ${st} WHERE id = $1`;

  // Durations are rounded to whole ms before they meet a bigint parameter.
  const run = async (name: string, text: string, values: unknown[]): Promise<PgQueryResult> => {
    try {
      return await pool.query({ name: prefix + name, text, values });
    } catch (error) {
      throw schemaError(error, options);
    }
  };
  const purge = async (limit: number): Promise<number> =>
    (await run('purge', purgeSql, [Math.max(0, Math.floor(limit))])).rowCount ?? 0;
  const purging = purgeSettings(options.purge);
  let timer = purging === undefined ? undefined : startPurge({ purgeExpired: purge }, purging);

  const sessions: StoreSessions = {
    async heartbeat(session, ttlMs) {
      await run('heartbeat', heartbeatSql, [session, Math.round(ttlMs)]);
    },
    async alive(session) {
      return (await run('alive', aliveSql, [session])).rows[0]?.alive === true;
    },
    async end(session) {
      await run('end_session', endSql, [session]);
    },
  };

  const transactionPool = options.transactionPool ?? (isPgPool(pool) ? pool : undefined);
  const transactions: StoreTransactions<PgTransactionClient> | undefined =
    transactionPool === undefined
      ? undefined
      : { open: (id, token) => openTransaction(transactionPool, id, token, prefix, completeSql) };

  return {
    name: 'postgres',
    capabilities: CAPABILITIES,
    table: t,
    sessionsTable: st,
    sessions,
    transactions,
    async claim(id: string, input: ClaimInput): Promise<ClaimResult> {
      const token = newToken();
      const values = [id, token, input.fingerprint, Math.round(input.leaseMs), Math.round(input.ttlMs), input.owner ?? null, input.takeoverFrom ?? null];
      for (let attempt = 0; attempt < MAX_CLAIM_ATTEMPTS; attempt++) {
        const { rows } = await run('claim', claimSql, values);
        const result = settle(rows[0] as ClaimRow | undefined, token, input);
        if (result !== undefined) return result;
      }
      throw unsettled();
    },
    async claimMany(ids: readonly string[], input: ClaimInput): Promise<ClaimResult[]> {
      // One statement for the whole batch; a repeated id is claimed once and
      // its later copies answer as a second claim would (in progress).
      const tokens = new Map<string, string>();
      for (const id of ids) if (!tokens.has(id)) tokens.set(id, newToken());
      const results = new Map<string, ClaimResult>();
      let pending = [...tokens.keys()].sort();
      for (let attempt = 0; attempt < MAX_CLAIM_ATTEMPTS && pending.length > 0; attempt++) {
        const values = [
          pending,
          pending.map((id) => tokens.get(id)),
          input.fingerprint,
          Math.round(input.leaseMs),
          Math.round(input.ttlMs),
          input.owner ?? null,
          input.takeoverFrom ?? null,
        ];
        let rows: Record<string, unknown>[];
        try {
          rows = (await run('claim_many', claimManySql, values)).rows;
        } catch (error) {
          // A deadlock aborted the statement, which changed nothing: run it again.
          if ((error as { code?: unknown }).code === DEADLOCK_DETECTED) continue;
          throw error;
        }
        const byId = new Map((rows as unknown as ClaimRow[]).map((row) => [row.id, row]));
        for (const id of pending) {
          const result = settle(byId.get(id), tokens.get(id) as string, input);
          if (result !== undefined) results.set(id, result);
        }
        pending = pending.filter((id) => !results.has(id));
      }
      if (pending.length > 0) throw unsettled();
      return inBatchOrder(ids, results, input);
    },
    async renew(id, token, leaseMs) {
      return ((await run('renew', renewSql, [id, token, Math.round(leaseMs)])).rowCount ?? 0) === 1;
    },
    async complete(id, token, outcome, ttlMs) {
      const bytes = Buffer.from(outcome, 'utf8');
      return ((await run('complete', completeSql, [id, token, bytes, Math.round(ttlMs)])).rowCount ?? 0) === 1;
    },
    async release(id, token) {
      return ((await run('release', releaseSql, [id, token])).rowCount ?? 0) === 1;
    },
    async get(id): Promise<StoredRecord | null> {
      const row = (await run('get', getSql, [id])).rows[0] as RecordRow | undefined;
      if (row === undefined) return null;
      if (row.state === COMPLETED) return completed(row.fingerprint, row.outcome, row.expires_at);
      return {
        state: 'in_progress',
        fingerprint: row.fingerprint,
        leaseUntil: Number(row.lease_until),
        expiresAt: Number(row.expires_at),
      };
    },
    async delete(id) {
      const row = (await run('delete', deleteSql, [id])).rows[0] as { live: boolean } | undefined;
      return row?.live === true;
    },
    async purgeExpired(limit) {
      return purge(limit);
    },
    async close() {
      // Only the purge timer is ours: the pool is the user's.
      await timer?.stop();
      timer = undefined;
    },
  };
}

/**
 * Turn one row of the claim statement into an answer, or `undefined` when
 * the statement must run again: no row at all (a concurrent transaction
 * committed the record after this statement's snapshot: ON CONFLICT saw it,
 * the SELECT did not), or a snapshot row this claim could have taken over
 * although ON CONFLICT did not (the row changed after the snapshot).
 */
function settle(row: ClaimRow | undefined, token: string, input: ClaimInput): ClaimResult | undefined {
  if (row === undefined) return undefined;
  if (row.won) return { status: 'acquired', token, takeover: row.takeover, leaseUntil: Number(row.lease_until) };
  if (row.state === COMPLETED) {
    return { status: 'completed', record: completed(row.fingerprint, row.outcome, row.expires_at as string) };
  }
  const leaseUntil = Number(row.lease_until);
  const now = Number(row.now);
  if (leaseUntil <= now && row.fingerprint === input.fingerprint) return undefined;
  return row.owner === null
    ? { status: 'in_progress', fingerprint: row.fingerprint, leaseUntil, now }
    : { status: 'in_progress', fingerprint: row.fingerprint, leaseUntil, now, owner: row.owner };
}

/** A `pg` Pool hands out clients; a `pg` Client (which has a `processID`) is one connection and has none to give. */
function isPgPool(pool: PgQueryable): pool is PgQueryable & PgTransactionPool {
  return typeof (pool as { connect?: unknown }).connect === 'function' && !('processID' in pool);
}

/** SQLSTATEs of a missing column and a missing table: the schema predates this version. */
const UNDEFINED_COLUMN = '42703';
const UNDEFINED_TABLE = '42P01';

/** Say what to do when the table lacks what this version needs (the owner column, the sessions table). */
function schemaError(error: unknown, options: PostgresMigrateOptions): unknown {
  const code = (error as { code?: unknown } | null)?.code;
  if (code !== UNDEFINED_COLUMN && code !== UNDEFINED_TABLE) return error;
  return new StoreUnavailableError(
    `The oncely PostgreSQL schema is missing or older than this version (${(error as Error).message}): ` +
      `run migratePostgres(pool, ${JSON.stringify({ schema: options.schema, table: options.table })}) once; ` +
      'it adds the owner column and the sessions table.',
    { cause: error },
  );
}

/** SQLSTATE of a statement refused because an earlier one failed in the same transaction. */
const IN_FAILED_TRANSACTION = '25P02';

function abortedTransaction(id: string, cause?: unknown): RolledBackError {
  return new RolledBackError(
    `The transaction of record ${id} was rolled back: a statement failed inside the handler and left it aborted ` +
      '(in PostgreSQL a caught error does not undo that). Neither the business writes nor the completion were stored. ' +
      'To tolerate a failing statement, run it in a SAVEPOINT, or avoid the error (INSERT … ON CONFLICT DO NOTHING).',
    cause === undefined ? {} : { cause },
  );
}

/**
 * Transactional mode: a client of its own from the pool, `BEGIN`, and at
 * the end the fenced completion inside the transaction, then `COMMIT`. The
 * client goes back to the pool once the transaction is over either way, or
 * is discarded when its state is unknown.
 */
async function openTransaction(
  transactionPool: PgTransactionPool,
  id: string,
  token: string,
  prefix: string,
  completeSql: string,
): Promise<StoreTransaction<PgTransactionClient>> {
  const client = await transactionPool.connect();
  try {
    await client.query({ text: 'BEGIN' });
  } catch (error) {
    client.release(asError(error));
    throw error;
  }
  let ended = false;
  const end = (error?: unknown): void => {
    if (ended) return;
    ended = true;
    client.release(error === undefined ? undefined : asError(error));
  };
  const rollback = async (): Promise<void> => {
    if (ended) return;
    try {
      await client.query({ text: 'ROLLBACK' });
      end();
    } catch (error) {
      end(error); // the connection is unusable: the pool must discard it
      throw error;
    }
  };
  return {
    client,
    async commit(outcome, ttlMs) {
      if (ended) throw new ConfigError(`The transaction of record ${id} has already ended.`);
      let updated: number;
      try {
        const values = [id, token, Buffer.from(outcome, 'utf8'), Math.round(ttlMs)];
        updated = (await client.query({ name: `${prefix}complete`, text: completeSql, values })).rowCount ?? 0;
      } catch (error) {
        await rollback().catch(() => undefined);
        throw (error as { code?: unknown }).code === IN_FAILED_TRANSACTION ? abortedTransaction(id, error) : error;
      }
      if (updated !== 1) {
        // Fenced: another owner holds the record. Nothing of this run may stay.
        await rollback();
        return false;
      }
      let committed: { command?: string };
      try {
        committed = await client.query({ text: 'COMMIT' });
      } catch (error) {
        // The outcome of a COMMIT that got no answer is unknown: the engine looks.
        end(error);
        throw error;
      }
      end();
      // COMMIT of an aborted transaction rolls back without an error.
      if (committed.command === 'ROLLBACK') throw abortedTransaction(id);
      return true;
    },
    rollback,
  };
}

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

function unsettled(): StoreUnavailableError {
  return new StoreUnavailableError('The claim did not settle: the record kept changing under concurrent writers.');
}

function completed(fingerprint: string | null, outcome: Buffer | null, expiresAt: string): CompletedRecord {
  return {
    state: 'completed',
    fingerprint,
    outcome: outcome === null ? '' : outcome.toString('utf8'),
    expiresAt: Number(expiresAt),
  };
}
