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
import type {
  ClaimInput,
  ClaimResult,
  CompletedRecord,
  IdempotencyStore,
  StoreCapabilities,
  StoredRecord,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { inBatchOrder } from './batch.js';
import { ConfigError, StoreUnavailableError } from '../errors/index.js';
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
 * Options of {@link mysqlStore}.
 *
 * @example
 * ```ts
 * const options: MysqlStoreOptions = { pool, table: 'app.oncely_records', returning: true, purge: { intervalMs: 10_000 } };
 * ```
 */
export interface MysqlStoreOptions {
  /** The user's `mysql2/promise` pool; the store never ends it. */
  pool: MysqlQueryable;
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

function quoted(name: string | undefined): { table: string; index: string } {
  const full = name ?? 'oncely_records';
  const parts = full.split('.');
  if (parts.length > 2 || !parts.every((part) => IDENTIFIER.test(part))) {
    throw new ConfigError(
      `MySQL table name ${JSON.stringify(full)} must be letters, digits and underscores (optionally database.table).`,
    );
  }
  const last = parts[parts.length - 1] as string;
  return { table: parts.map((part) => `\`${part}\``).join('.'), index: `\`${`${last}_expires_at`.slice(0, 64)}\`` };
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
  const { table, index } = quoted(options.table);
  // Binary strings for ids, tokens and fingerprints: exact byte comparison,
  // no collation or trailing-space (PAD SPACE) surprises.
  return `CREATE TABLE IF NOT EXISTS ${table} (
  id          VARBINARY(128)  NOT NULL,
  state       TINYINT         NOT NULL,            -- 0 in progress, 1 completed
  token       VARBINARY(64)   NULL,                -- fencing token of the current owner
  fingerprint VARBINARY(1024) NULL,
  lease_until BIGINT          NOT NULL,            -- epoch ms, server clock
  expires_at  BIGINT          NOT NULL,            -- epoch ms, server clock
  takeover    TINYINT         NOT NULL DEFAULT 0,  -- the current owner took over an expired lease
  outcome     LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
  PRIMARY KEY (id),
  KEY ${index} (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin`;
}

/** MySQL error number of `ADD INDEX` when an index of that name exists (another process added it first). */
const ER_DUP_KEYNAME = 1061;

/**
 * Create the store's table when missing, and the `expires_at` index the
 * purge walks when a table made by an older schema lacks it (MySQL has no
 * `CREATE INDEX IF NOT EXISTS`, so the index is looked up first).
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
  await pool.query(mysqlSchemaSql(options));
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
  const { table: t } = quoted(options.table);
  const purging = purgeSettings(options.purge);
  let timer: PurgeTimer | undefined;

  // Assignments run left to right and each sees the values set before it
  // (MySQL and MariaDB alike). The first two decide on the old row; from
  // then on "token = VALUES(token)" (a fresh random token) means "won".
  const won = 'token <=> VALUES(token)';
  const may = `(expires_at <= ${NOW} OR (state = ${IN_PROGRESS} AND lease_until <= ${NOW} AND fingerprint <=> VALUES(fingerprint)))`;
  const insert = (values: string, stateAssignment: string): string => `INSERT INTO ${t}
  (id, state, token, fingerprint, lease_until, expires_at, takeover, outcome)
  VALUES ${values}
  ON DUPLICATE KEY UPDATE
  takeover = IF(${may}, expires_at > ${NOW}, takeover),
  token = IF(${may}, VALUES(token), token),
  outcome = IF(${won}, NULL, outcome),
  fingerprint = IF(${won}, VALUES(fingerprint), fingerprint),
  ${stateAssignment},
  lease_until = IF(${won}, VALUES(lease_until), lease_until),
  expires_at = IF(${won}, IF(expires_at <= ${NOW}, VALUES(expires_at), GREATEST(expires_at, VALUES(expires_at))), expires_at)`;
  const returningRow = `(?, ${IN_PROGRESS}, ?, ?, ${NOW} + ?, ${NOW} + GREATEST(?, ?), 0, NULL)`;
  const returningSql = (rows: number): string => `${insert(
    Array.from({ length: rows }, () => returningRow).join(', '),
    `state = IF(${won}, ${IN_PROGRESS}, state)`,
  )}
  RETURNING id, token, takeover, state, fingerprint, lease_until, expires_at, outcome, ${NOW} AS now`;
  const claimReturningSql = returningSql(1);
  // MySQL: LAST_INSERT_ID(expr) sets the OK packet's insertId to
  // now * 4 + code (0 inserted, 1 acquired an expired record, 2 took over
  // an expired lease, 3 not acquired), so a won claim needs no read.
  const claimPlainSql = insert(
    `(?, ${IN_PROGRESS}, ?, ?, (LAST_INSERT_ID(${NOW} * 4) DIV 4) + ?, ${NOW} + GREATEST(?, ?), 0, NULL)`,
    `state = IF(LAST_INSERT_ID(${NOW} * 4 + IF(${won}, 1 + takeover, ${NOT_ACQUIRED})) % 4 = ${NOT_ACQUIRED}, state, ${IN_PROGRESS})`,
  );
  const selectSql = `SELECT token, takeover, state, fingerprint, lease_until, expires_at, outcome, ${NOW} AS now FROM ${t} WHERE id = ?`;
  const renewSql = `UPDATE ${t} SET lease_until = ${NOW} + ?, expires_at = GREATEST(expires_at, ${NOW} + ?)
  WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ${NOW}`;
  const completeSql = `UPDATE ${t} SET state = ${COMPLETED}, outcome = ?, expires_at = ${NOW} + ?
  WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ${NOW}`;
  const releaseSql = `DELETE FROM ${t} WHERE id = ? AND token = ? AND state = ${IN_PROGRESS} AND expires_at > ${NOW}`;
  const getSql = `SELECT state, fingerprint, lease_until, expires_at, outcome FROM ${t} WHERE id = ? AND expires_at > ${NOW}`;
  // An expired row is absent already; it is left to the purge.
  const deleteSql = `DELETE FROM ${t} WHERE id = ? AND expires_at > ${NOW}`;
  const purgeSql = `DELETE FROM ${t} WHERE expires_at <= ${NOW} ORDER BY expires_at LIMIT ?`;

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
        if ((error as { errno?: number }).errno !== ER_LOCK_DEADLOCK || attempt >= MAX_ATTEMPTS) throw error;
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
    return { status: 'in_progress', fingerprint, leaseUntil, now };
  };

  const store: MysqlStore = {
    name: 'mysql',
    capabilities: CAPABILITIES,
    table: t,
    async claim(id, input) {
      const token = newToken();
      const leaseMs = Math.round(input.leaseMs);
      const values = [id, token, input.fingerprint, leaseMs, leaseMs, Math.round(input.ttlMs)];
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
        const values = pending.flatMap((id) => [
          id,
          tokens.get(id) as string,
          input.fingerprint,
          Math.round(input.leaseMs),
          Math.round(input.leaseMs),
          Math.round(input.ttlMs),
        ]);
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
