/**
 * MariaDB / MySQL store over the user's own `mysql2/promise` pool.
 *
 * - `claim` is one `INSERT … ON DUPLICATE KEY UPDATE` statement whose
 *   assignments only change the row when the record is absent, expired, or
 *   its lease expired under the same fingerprint. InnoDB runs it under an
 *   exclusive row lock on the primary key, so it is atomic across connections.
 * - On MariaDB 10.5+ the statement ends in `RETURNING`, which hands back the
 *   row as it stands after the statement: one round trip for every answer.
 * - On MySQL (no `RETURNING`) the statement reports its own result through
 *   `LAST_INSERT_ID(expr)`: a won claim is one round trip; a lost one (replay
 *   or in progress) reads the record with a second statement.
 * - Deadlines come from the server's clock (`UTC_TIMESTAMP(3)`, independent
 *   of the session time zone).
 * - MySQL has no TTL: expired records are absent to every operation and are
 *   deleted by a background purge started with the store (stopped by
 *   `close()`): `DELETE … ORDER BY expires_at LIMIT n` on the `expires_at`
 *   index, repeated while a batch comes back full.
 * - Process sessions: a row per process in `<table>_sessions` whose
 *   `expires_at` each heartbeat moves (server clock). A claim stores its
 *   owner session; a claim with `takeoverFrom` takes over a record of a
 *   session that is not alive, checked in the same statement.
 * - Transactional mode (with a pool): `transactions.open` takes a connection
 *   (`getConnection()`) and runs `START TRANSACTION`; the completion is an
 *   `UPDATE` fenced by the token inside that transaction, then `COMMIT`.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
 *
 * const pool = mysql.createPool({ uri: process.env.MYSQL_URL, connectTimeout: 2000 });
 * await migrateMysql(pool);
 * const store = mysqlStore({ pool });
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
import { type PurgeOptions, type PurgeTimer, purgeSettings, startPurge } from './purge.js';

export { type PurgeOptions, type PurgeReport, type PurgeRunOptions, purgeExpiredRecords } from './purge.js';

/**
 * The part of a `mysql2/promise` Pool (or Connection) the store uses.
 * Declared here so that oncely does not depend on mysql2; any object of this
 * shape works. `execute` runs server-side prepared statements (cached per
 * connection by mysql2); `query` runs plain statements (migrations).
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * import type { MysqlQueryable } from 'oncely/stores/mysql';
 * const pool: MysqlQueryable = mysql.createPool({ host: '127.0.0.1', user: 'app', database: 'app' });
 * ```
 */
export interface MysqlQueryable {
  execute(sql: string, values?: MysqlValue[]): Promise<[unknown, unknown]>;
  query(sql: string, values?: MysqlValue[]): Promise<[unknown, unknown]>;
}

/**
 * A statement parameter, as the store sends them.
 *
 * @example
 * ```ts
 * const values: MysqlValue[] = ['id', 30_000, null];
 * ```
 */
export type MysqlValue = string | number | null;

/**
 * A connection taken from a `mysql2/promise` pool (`pool.getConnection()`),
 * as transactional mode uses it: the handler gets it inside the open transaction.
 *
 * @example
 * ```ts
 * import type { PoolConnection } from 'mysql2/promise';
 * const connection = await claim.transaction<PoolConnection>(); // a MysqlTransactionConnection
 * await connection.execute('INSERT INTO payments (id, amount) VALUES (?, ?)', [id, amount]);
 * ```
 */
export interface MysqlTransactionConnection extends MysqlQueryable {
  /** Give the connection back to the pool. */
  release(): void;
  /** Close the connection (its state is unknown): the pool opens another. */
  destroy(): void;
}

/**
 * The part of a `mysql2/promise` pool transactional mode uses: one connection per transaction.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * const transactionPool: MysqlTransactionPool = mysql.createPool({ host: '127.0.0.1', user: 'app', database: 'app' });
 * ```
 */
export interface MysqlTransactionPool {
  getConnection(): Promise<MysqlTransactionConnection>;
}

/**
 * Options of {@link mysqlStore}.
 *
 * @example
 * ```ts
 * const options: MysqlStoreOptions = { pool, table: 'app.oncely_records', returning: true, purge: { intervalMs: 10_000 } };
 * ```
 */
export interface MysqlStoreOptions {
  /**
   * The user's `mysql2/promise` pool (or a single connection); the store
   * never ends it. With a pool, transactional mode takes its connections
   * from it unless `transactionPool` is given; a single connection has no
   * transactional mode.
   */
  pool: MysqlQueryable;
  /**
   * Where transactional mode takes a connection for each transaction.
   * Default: `pool` when it is a pool. A pool of its own keeps the store's
   * claims, renewals and session heartbeats from waiting for a connection
   * behind long business transactions (a heartbeat that waits longer than
   * the session TTL lets other processes take this process's claims over).
   */
  transactionPool?: MysqlTransactionPool;
  /** Table name, optionally `database.table`. Default `oncely_records`. */
  table?: string;
  /**
   * Use `INSERT … RETURNING` (MariaDB 10.5+). Default: detected once from
   * `SELECT VERSION()` on first use. Set it to skip the detection.
   */
  returning?: boolean;
  /**
   * Background purge of expired records: a drain every `intervalMs`
   * (default 10 000) in batches of `batch` records (default 1000), or
   * `false` to turn it off (then call {@link purgeExpiredRecords} from a
   * cron job). The timer is unref'd and stops on `close()`.
   */
  purge?: PurgeOptions | false;
}

/**
 * Options of {@link migrateMysql} and {@link mysqlSchemaSql}.
 *
 * @example
 * ```ts
 * await migrateMysql(pool, { table: 'oncely_records' } satisfies MysqlMigrateOptions);
 * ```
 */
export interface MysqlMigrateOptions {
  /** Table name, optionally `database.table`. Default `oncely_records`. */
  table?: string;
}

/**
 * The store {@link mysqlStore} returns: an {@link IdempotencyStore} that also names its table.
 *
 * @example
 * ```ts
 * const store: MysqlStore = mysqlStore({ pool });
 * console.log(store.table); // `oncely_records`
 * ```
 */
export interface MysqlStore extends IdempotencyStore {
  /** The quoted table name the store uses. */
  readonly table: string;
  /** The quoted name of the process sessions table (`<table>_sessions`). */
  readonly sessionsTable: string;
  /** Process sessions: one row per process, its expiry on the server clock. */
  readonly sessions: StoreSessions;
  /** Transactional mode; absent when `pool` is a single connection and no `transactionPool` was given. */
  readonly transactions?: StoreTransactions<MysqlTransactionConnection>;
}

interface ResultHeader {
  affectedRows: number;
  insertId: number | string;
}

interface Row {
  id?: Buffer | string;
  token: Buffer | string | null;
  takeover: number;
  state: number;
  fingerprint: Buffer | string | null;
  lease_until: number | string;
  expires_at: number | string;
  outcome: string | null;
  owner?: Buffer | string | null;
  now: number | string;
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: false, serverClock: true, shared: true };
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;
/**
 * The server clock in epoch ms. `UTC_TIMESTAMP` ignores the session time
 * zone (`UNIX_TIMESTAMP(NOW())` would be off by an hour around a DST change),
 * and, like `NOW()`, is fixed for the whole statement.
 */
const NOW = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(3)) DIV 1000)";
const IN_PROGRESS = 0;
const COMPLETED = 1;
/** Code of a lost claim in the `insertId` the MySQL form reports (`now * 4 + code`). */
const NOT_ACQUIRED = 3;
/** InnoDB may refuse a statement with a deadlock under heavy contention; it changed nothing, so it is retried. */
const ER_LOCK_DEADLOCK = 1213;
const MAX_ATTEMPTS = 8;

function quoted(name: string | undefined): { table: string; index: string; sessions: string } {
  const full = name ?? 'oncely_records';
  const parts = full.split('.');
  if (parts.length > 2 || !parts.every((part) => IDENTIFIER.test(part))) {
    throw new ConfigError(
      `MySQL table name ${JSON.stringify(full)} must be letters, digits and underscores (optionally database.table).`,
    );
  }
  const last = parts[parts.length - 1] as string;
  // A name too long for the suffix keeps a hash of the whole, so two long table names never share one.
  const sessionsName =
    last.length + 9 <= 64 ? `${last}_sessions` : `${last.slice(0, 46)}_${createHash('sha256').update(last).digest('hex').slice(0, 8)}_sessions`;
  const sessions = [...parts.slice(0, -1), sessionsName].map((part) => `\`${part}\``).join('.');
  return { table: parts.map((part) => `\`${part}\``).join('.'), index: `\`${`${last}_expires_at`.slice(0, 64)}\``, sessions };
}

/**
 * The SQL that creates the store's table (idempotent): run it in your
 * migration tool, or call {@link migrateMysql}.
 *
 * @example
 * ```ts
 * import { mysqlSchemaSql } from 'oncely/stores/mysql';
 * console.log(mysqlSchemaSql({ table: 'oncely_records' }));
 * ```
 */
export function mysqlSchemaSql(options: MysqlMigrateOptions = {}): string {
  return schemaStatements(options).join(';\n\n');
}

/** The statements of {@link mysqlSchemaSql}, one by one (a pool runs one statement per query). */
function schemaStatements(options: MysqlMigrateOptions): string[] {
  const { table, index, sessions } = quoted(options.table);
  // Binary strings for ids, tokens and fingerprints: exact byte comparison,
  // no collation or trailing-space (PAD SPACE) surprises.
  return [
    `CREATE TABLE IF NOT EXISTS ${table} (
  id          VARBINARY(128)  NOT NULL,
  state       TINYINT         NOT NULL,            -- 0 in progress, 1 completed
  token       VARBINARY(64)   NULL,                -- fencing token of the current owner
  fingerprint VARBINARY(1024) NULL,
  lease_until BIGINT          NOT NULL,            -- epoch ms, server clock
  expires_at  BIGINT          NOT NULL,            -- epoch ms, server clock
  takeover    TINYINT         NOT NULL DEFAULT 0,  -- the current owner took over an expired lease
  outcome     LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
  owner       VARBINARY(128)  NULL,                -- process session of the current owner
  PRIMARY KEY (id),
  KEY ${index} (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin`,
    `CREATE TABLE IF NOT EXISTS ${sessions} (
  id          VARBINARY(128)  NOT NULL,            -- one row per live process
  expires_at  BIGINT          NOT NULL,            -- epoch ms, server clock
  PRIMARY KEY (id)
) ENGINE = InnoDB`,
  ];
}

/** MySQL error number of `ADD INDEX` when an index of that name exists (another process added it first). */
const ER_DUP_KEYNAME = 1061;
/** MySQL error number of `ADD COLUMN` when the column exists (another process added it first). */
const ER_DUP_FIELDNAME = 1060;

/**
 * Create the store's table and the process sessions table when missing,
 * and, on a table made by an older version, the `expires_at` index the
 * purge walks and the `owner` column of process sessions (MySQL has no
 * `IF NOT EXISTS` for either, so they are looked up first). Run it again
 * after upgrading oncely.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * import { migrateMysql } from 'oncely/stores/mysql';
 * await migrateMysql(mysql.createPool({ host: '127.0.0.1', user: 'app', database: 'app' }));
 * ```
 */
export async function migrateMysql(pool: MysqlQueryable, options: MysqlMigrateOptions = {}): Promise<void> {
  const { table, index } = quoted(options.table);
  for (const statement of schemaStatements(options)) await pool.query(statement);
  const [columns] = await pool.query(`SHOW COLUMNS FROM ${table} LIKE 'owner'`);
  if ((columns as unknown[]).length === 0) {
    try {
      await pool.query(`ALTER TABLE ${table} ADD COLUMN owner VARBINARY(128) NULL`);
    } catch (error) {
      if ((error as { errno?: number }).errno !== ER_DUP_FIELDNAME) throw error;
    }
  }
  const [rows] = await pool.query(`SHOW INDEX FROM ${table} WHERE Column_name = 'expires_at' AND Seq_in_index = 1`);
  if ((rows as unknown[]).length > 0) return;
  try {
    await pool.query(`ALTER TABLE ${table} ADD INDEX ${index} (expires_at)`);
  } catch (error) {
    if ((error as { errno?: number }).errno !== ER_DUP_KEYNAME) throw error;
  }
}

/**
 * Create a MariaDB / MySQL store over the user's `mysql2/promise` pool. The
 * table must exist: see {@link migrateMysql}.
 *
 * @example
 * ```ts
 * import mysql from 'mysql2/promise';
 * import { mysqlStore } from 'oncely/stores/mysql';
 *
 * const pool = mysql.createPool({ host: '127.0.0.1', user: 'app', database: 'app', connectTimeout: 2000 });
 * const store = mysqlStore({ pool, table: 'oncely_records' });
 * ```
 */
export function mysqlStore(options: MysqlStoreOptions): MysqlStore {
  const { pool } = options;
  const { table: t, sessions: st } = quoted(options.table);
  const purging = purgeSettings(options.purge);
  let timer: PurgeTimer | undefined;

  // Assignments run left to right and each sees the values set before it
  // (MySQL and MariaDB alike). The first two decide on the old row; from
  // then on "token = VALUES(token)" (a fresh random token) means "won".
  // `may` takes two parameters, both the session to take over from: a
  // record in progress under it is taken over only while that session is
  // not alive, checked here too, so that a session that came back after the
  // caller looked keeps its claims.
  const won = 'token <=> VALUES(token)';
  const may = `(expires_at <= ${NOW} OR (state = ${IN_PROGRESS} AND fingerprint <=> VALUES(fingerprint) AND (lease_until <= ${NOW}
    OR (owner = ? AND NOT EXISTS (SELECT 1 FROM ${st} s WHERE s.id = ? AND s.expires_at > ${NOW})))))`;
  const insert = (values: string, stateAssignment: string): string => `INSERT INTO ${t}
  (id, state, token, fingerprint, lease_until, expires_at, takeover, outcome, owner)
  VALUES ${values}
  ON DUPLICATE KEY UPDATE
  takeover = IF(${may}, expires_at > ${NOW}, takeover),
  token = IF(${may}, VALUES(token), token),
  outcome = IF(${won}, NULL, outcome),
  fingerprint = IF(${won}, VALUES(fingerprint), fingerprint),
  owner = IF(${won}, VALUES(owner), owner),
  ${stateAssignment},
  lease_until = IF(${won}, VALUES(lease_until), lease_until),
  expires_at = IF(${won}, IF(expires_at <= ${NOW}, VALUES(expires_at), GREATEST(expires_at, VALUES(expires_at))), expires_at)`;
  const returningRow = `(?, ${IN_PROGRESS}, ?, ?, ${NOW} + ?, ${NOW} + GREATEST(?, ?), 0, NULL, ?)`;
  const returningSql = (rows: number): string => `${insert(
    Array.from({ length: rows }, () => returningRow).join(', '),
    `state = IF(${won}, ${IN_PROGRESS}, state)`,
  )}
  RETURNING id, token, takeover, state, fingerprint, lease_until, expires_at, outcome, owner, ${NOW} AS now`;
  const claimReturningSql = returningSql(1);
  // MySQL: LAST_INSERT_ID(expr) sets the OK packet's insertId to
  // now * 4 + code (0 inserted, 1 acquired an expired record, 2 took over
  // an expired lease, 3 not acquired), so a won claim needs no read.
  const claimPlainSql = insert(
    `(?, ${IN_PROGRESS}, ?, ?, (LAST_INSERT_ID(${NOW} * 4) DIV 4) + ?, ${NOW} + GREATEST(?, ?), 0, NULL, ?)`,
    `state = IF(LAST_INSERT_ID(${NOW} * 4 + IF(${won}, 1 + takeover, ${NOT_ACQUIRED})) % 4 = ${NOT_ACQUIRED}, state, ${IN_PROGRESS})`,
  );
  const selectSql = `SELECT token, takeover, state, fingerprint, lease_until, expires_at, outcome, owner, ${NOW} AS now FROM ${t} WHERE id = ?`;
  const renewSql = `UPDATE ${t} SET lease_until = ${NOW} + ?, expires_at = GREATEST(expires_at, ${NOW} + ?)
  WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ${NOW}`;
  const completeSql = `UPDATE ${t} SET state = ${COMPLETED}, outcome = ?, expires_at = ${NOW} + ?
  WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ${NOW}`;
  const releaseSql = `DELETE FROM ${t} WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ${NOW}`;
  const getSql = `SELECT state, fingerprint, lease_until, expires_at, outcome FROM ${t} WHERE id = ? AND expires_at > ${NOW}`;
  // An expired row is absent already; it is left to the purge.
  const deleteSql = `DELETE FROM ${t} WHERE id = ? AND expires_at > ${NOW}`;
  const purgeSql = `DELETE FROM ${t} WHERE expires_at <= ${NOW} ORDER BY expires_at LIMIT ?`;
  // Sessions that ended: a handful of rows (one per process that stopped since the last batch).
  const purgeSessionsSql = `DELETE FROM ${st} WHERE expires_at <= ${NOW} LIMIT ?`;
  const heartbeatSql = `INSERT INTO ${st} (id, expires_at) VALUES (?, ${NOW} + ?) ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)`;
  const aliveSql = `SELECT 1 AS alive FROM ${st} WHERE id = ? AND expires_at > ${NOW}`;
  const endSql = `DELETE FROM ${st} WHERE id = ?`;

  let returning: Promise<boolean> | undefined =
    options.returning === undefined ? undefined : Promise.resolve(options.returning);
  const detect = (): Promise<boolean> => {
    returning ??= pool.query('SELECT VERSION() AS v').then(
      ([rows]) => supportsReturning(String((rows as Array<{ v: unknown }>)[0]?.v ?? '')),
      (error: unknown) => {
        returning = undefined; // the server may be down: detect again next time
        throw error;
      },
    );
    return returning;
  };

  const execute = async (sql: string, values: MysqlValue[]): Promise<unknown> => {
    for (let attempt = 1; ; attempt++) {
      try {
        return (await pool.execute(sql, values))[0];
      } catch (error) {
        if ((error as { errno?: number }).errno !== ER_LOCK_DEADLOCK || attempt >= MAX_ATTEMPTS) throw schemaError(error, options);
      }
    }
  };
  const header = async (sql: string, values: MysqlValue[]): Promise<ResultHeader> =>
    (await execute(sql, values)) as ResultHeader;

  /** Turn the row as it stands into an answer; `undefined` when the row is not settled (ask again). */
  const answer = (row: Row | undefined, token: string, input: ClaimInput): ClaimResult | undefined => {
    if (row === undefined) return undefined;
    if (text(row.token) === token) {
      return { status: 'acquired', token, takeover: Number(row.takeover) === 1, leaseUntil: Number(row.lease_until) };
    }
    const now = Number(row.now);
    if (Number(row.expires_at) <= now) return undefined;
    const fingerprint = text(row.fingerprint);
    if (Number(row.state) === COMPLETED) return { status: 'completed', record: completed(row, fingerprint) };
    const leaseUntil = Number(row.lease_until);
    if (leaseUntil <= now && fingerprint === input.fingerprint) return undefined;
    const owner = text(row.owner);
    return owner === null
      ? { status: 'in_progress', fingerprint, leaseUntil, now }
      : { status: 'in_progress', fingerprint, leaseUntil, now, owner };
  };

  const sessions: StoreSessions = {
    async heartbeat(session, ttlMs) {
      await execute(heartbeatSql, [session, Math.round(ttlMs)]);
    },
    async alive(session) {
      return ((await execute(aliveSql, [session])) as unknown[]).length > 0;
    },
    async end(session) {
      await execute(endSql, [session]);
    },
  };

  const transactionPool = options.transactionPool ?? (isMysqlPool(pool) ? pool : undefined);
  const transactions: StoreTransactions<MysqlTransactionConnection> | undefined =
    transactionPool === undefined
      ? undefined
      : { open: (id, token) => openTransaction(transactionPool, id, token, completeSql) };

  const store: MysqlStore = {
    name: 'mysql',
    capabilities: CAPABILITIES,
    table: t,
    sessionsTable: st,
    sessions,
    transactions,
    async claim(id, input) {
      const token = newToken();
      const leaseMs = Math.round(input.leaseMs);
      const from = input.takeoverFrom ?? null;
      const values = [id, token, input.fingerprint, leaseMs, leaseMs, Math.round(input.ttlMs), input.owner ?? null, from, from, from, from];
      const withReturning = await detect();
      for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
        if (withReturning) {
          const rows = (await execute(claimReturningSql, values)) as Row[];
          const result = answer(rows[0], token, input);
          if (result !== undefined) return result;
          continue;
        }
        const { insertId } = await header(claimPlainSql, values);
        const code = Number(insertId) % 4;
        const now = Math.floor(Number(insertId) / 4);
        if (code !== NOT_ACQUIRED) {
          return { status: 'acquired', token, takeover: code === 2, leaseUntil: now + leaseMs };
        }
        const rows = (await execute(selectSql, [id])) as Row[];
        // Between the two statements the record may have changed: the
        // read answers as of its own moment, or asks again when the record
        // is now free for this claim.
        const result = answer(rows[0], token, input);
        if (result !== undefined) return result;
      }
      throw unsettled();
    },
    async claimMany(ids, input) {
      // A repeated id is claimed once; its later copies answer as a second claim would.
      const tokens = new Map<string, string>();
      for (const id of ids) if (!tokens.has(id)) tokens.set(id, newToken());
      const results = new Map<string, ClaimResult>();
      let pending = [...tokens.keys()].sort();
      if (pending.length > 0 && !(await detect())) {
        // Without RETURNING a multi-row statement cannot report per row: claim each (in parallel).
        const each = await Promise.all(pending.map((id) => store.claim(id, input)));
        for (const [i, id] of pending.entries()) results.set(id, each[i] as ClaimResult);
        pending = [];
      }
      for (let attempt = 0; attempt < MAX_ATTEMPTS && pending.length > 0; attempt++) {
        // One multi-row statement, rows in id order, so that overlapping batches lock in the same order.
        const from = input.takeoverFrom ?? null;
        const values = [
          ...pending.flatMap((id) => [
            id,
            tokens.get(id) as string,
            input.fingerprint,
            Math.round(input.leaseMs),
            Math.round(input.leaseMs),
            Math.round(input.ttlMs),
            input.owner ?? null,
          ]),
          from,
          from,
          from,
          from,
        ];
        const rows = (await execute(returningSql(pending.length), values)) as Row[];
        const byId = new Map(rows.map((row) => [text(row.id) as string, row]));
        for (const id of pending) {
          const result = answer(byId.get(id), tokens.get(id) as string, input);
          if (result !== undefined) results.set(id, result);
        }
        pending = pending.filter((id) => !results.has(id));
      }
      if (pending.length > 0) throw unsettled();
      return inBatchOrder(ids, results, input);
    },
    async renew(id, token, leaseMs) {
      // mysql2 connects with CLIENT_FOUND_ROWS by default: affectedRows counts matched rows.
      return (await header(renewSql, [Math.round(leaseMs), Math.round(leaseMs), id, token])).affectedRows === 1;
    },
    async complete(id, token, outcome, ttlMs) {
      return (await header(completeSql, [outcome, Math.round(ttlMs), id, token])).affectedRows === 1;
    },
    async release(id, token) {
      return (await header(releaseSql, [id, token])).affectedRows === 1;
    },
    async get(id): Promise<StoredRecord | null> {
      const row = ((await execute(getSql, [id])) as Row[])[0];
      if (row === undefined) return null;
      const fingerprint = text(row.fingerprint);
      if (Number(row.state) === COMPLETED) return completed(row, fingerprint);
      return {
        state: 'in_progress',
        fingerprint,
        leaseUntil: Number(row.lease_until),
        expiresAt: Number(row.expires_at),
      };
    },
    async delete(id) {
      return (await header(deleteSql, [id])).affectedRows === 1;
    },
    async purgeExpired(limit) {
      const n = Math.max(0, Math.floor(limit));
      if (n === 0) return 0;
      await header(purgeSessionsSql, [n]);
      return (await header(purgeSql, [n])).affectedRows;
    },
    async close() {
      // Only the purge timer is ours: the pool is the user's.
      await timer?.stop();
      timer = undefined;
    },
  };
  timer = purging === undefined ? undefined : startPurge(store, purging);
  return store;
}

/** A `mysql2` pool hands out connections (`getConnection`); a single connection has none to give. */
function isMysqlPool(pool: MysqlQueryable): pool is MysqlQueryable & MysqlTransactionPool {
  return typeof (pool as { getConnection?: unknown }).getConnection === 'function';
}

/** MySQL error numbers of an unknown column and a missing table: the schema predates this version. */
const ER_BAD_FIELD_ERROR = 1054;
const ER_NO_SUCH_TABLE = 1146;

/** Say what to do when the table lacks what this version needs (the owner column, the sessions table). */
function schemaError(error: unknown, options: MysqlStoreOptions): unknown {
  const errno = (error as { errno?: unknown } | null)?.errno;
  if (errno !== ER_BAD_FIELD_ERROR && errno !== ER_NO_SUCH_TABLE) return error;
  return new StoreUnavailableError(
    `The oncely MySQL schema is missing or older than this version (${(error as Error).message}): ` +
      `run migrateMysql(pool, ${JSON.stringify({ table: options.table })}) once; it adds the owner column and the sessions table.`,
    { cause: error },
  );
}

/** Bit of the OK packet's server status: a transaction is open on the connection. */
const SERVER_STATUS_IN_TRANS = 1;

/**
 * Transactional mode: a connection of its own from the pool,
 * `START TRANSACTION`, and at the end the fenced completion inside the
 * transaction, then `COMMIT`. The connection goes back to the pool once the
 * transaction is over either way, or is destroyed when its state is unknown.
 */
async function openTransaction(
  transactionPool: MysqlTransactionPool,
  id: string,
  token: string,
  completeSql: string,
): Promise<StoreTransaction<MysqlTransactionConnection>> {
  const connection = await transactionPool.getConnection();
  try {
    await connection.query('START TRANSACTION');
  } catch (error) {
    connection.destroy();
    throw error;
  }
  let ended = false;
  const end = (broken: boolean): void => {
    if (ended) return;
    ended = true;
    if (broken) connection.destroy();
    else connection.release();
  };
  const rollback = async (): Promise<void> => {
    if (ended) return;
    try {
      await connection.query('ROLLBACK');
      end(false);
    } catch (error) {
      end(true);
      throw error;
    }
  };
  return {
    client: connection,
    async commit(outcome, ttlMs) {
      if (ended) throw new ConfigError(`The transaction of record ${id} has already ended.`);
      try {
        // A deadlock inside the handler rolls the whole transaction back, and a
        // statement with an implicit commit (DDL) ends it: with autocommit on,
        // the writes after it, and this completion, would each commit alone.
        // The OK packet of a no-op says whether the transaction is still open.
        const [status] = await connection.query('DO 0');
        const serverStatus = (status as { serverStatus?: number }).serverStatus ?? SERVER_STATUS_IN_TRANS;
        if ((serverStatus & SERVER_STATUS_IN_TRANS) === 0) {
          throw new RolledBackError(
            `The transaction of record ${id} ended inside the handler (a deadlock rolled it back, a statement committed ` +
              'it implicitly, or the handler ran COMMIT or ROLLBACK): its writes cannot commit with the completion, which ' +
              'was not stored.',
          );
        }
        const [result] = await connection.execute(completeSql, [outcome, Math.round(ttlMs), id, token]);
        if ((result as ResultHeader).affectedRows !== 1) {
          // Fenced: another owner holds the record. Nothing of this run may stay.
          await rollback();
          return false;
        }
      } catch (error) {
        await rollback().catch(() => undefined);
        throw error;
      }
      try {
        await connection.query('COMMIT');
      } catch (error) {
        // The outcome of a COMMIT that got no answer is unknown: the engine looks.
        end(true);
        throw error;
      }
      end(false);
      return true;
    },
    rollback,
  };
}

/** MariaDB has `INSERT … RETURNING` from 10.5 on; MySQL has none. */
function supportsReturning(version: string): boolean {
  const match = /^(\d+)\.(\d+)/.exec(version);
  if (!/mariadb/i.test(version) || match === null) return false;
  const major = Number(match[1]);
  const minor = Number(match[2]);
  return major > 10 || (major === 10 && minor >= 5);
}

function unsettled(): StoreUnavailableError {
  return new StoreUnavailableError('The claim did not settle: the record kept changing under concurrent writers.');
}

function text(value: Buffer | string | null | undefined): string | null {
  if (value === null || value === undefined) return null;
  return typeof value === 'string' ? value : value.toString('utf8');
}

function completed(row: Row, fingerprint: string | null): CompletedRecord {
  return { state: 'completed', fingerprint, outcome: row.outcome ?? '', expiresAt: Number(row.expires_at) };
}
