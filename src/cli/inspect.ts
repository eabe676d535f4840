/**
 * `oncely inspect` and `oncely purge`: open a store from a URL with the
 * user's own driver (loaded lazily, never a dependency of oncely), read the
 * record of one key, or delete expired records.
 *
 * A stored response body is shown only on request (`showBody`): it is the
 * customer's data. Outcomes sealed by `withEncryption` are opened only with
 * the keys given; without them only their key id is shown.
 *
 * @example
 * ```ts
 * import { inspectKey, openStoreUrl } from './inspect.js';
 * const opened = await openStoreUrl('sqlite:./data/oncely.db');
 * try {
 *   console.log(await inspectKey(opened.store, { key: 'pay-0001', scope: 'acct_1' }));
 * } finally {
 *   await opened.close();
 * }
 * ```
 * @module
 */

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { type RecordIdSecret, recordIdFor } from '../engine/fingerprint.js';
import type { IdempotencyStore, StoredRecord } from '../engine/store.js';
import { DecryptFailedError, type DecryptFailureReason } from '../errors/index.js';
import { decodeOutcome } from '../http/outcome.js';
import { type EncryptionKey, isSealed, outcomeCipher, sealedKeyId } from '../stores/encryption.js';

/** A store opened from a URL, and how to close it with its client. */
export interface OpenedStore {
  store: IdempotencyStore;
  /** `sqlite`, `redis`, `postgres` or `mysql`. */
  kind: string;
  close(): Promise<void>;
}

/** Options of {@link openStoreUrl}. */
export interface OpenStoreOptions {
  /** SQL table name [`oncely_records`]. */
  table?: string;
  /** Redis key prefix [the store's default]. */
  prefix?: string;
}

/** A driver the user must install is missing; the message says which and how. */
export class MissingDriverError extends Error {}

/**
 * Loads a driver from the user's project (the current directory) first, then
 * from wherever oncely is installed. The specifier is a plain string, so
 * TypeScript does not need the driver's types either.
 */
async function loadDriver(name: string, forUrl: string): Promise<Record<string, unknown>> {
  try {
    const resolved = createRequire(join(process.cwd(), 'noop.js')).resolve(name);
    return (await import(pathToFileURL(resolved).href)) as Record<string, unknown>;
  } catch {
    // not resolvable from the current directory: try oncely's own resolution
  }
  try {
    return (await import(name)) as Record<string, unknown>;
  } catch {
    throw new MissingDriverError(
      `${forUrl} needs the ${name} package, which oncely does not install: run \`npm install ${name}\` in your project.`,
    );
  }
}

/** `default` of a CommonJS module imported from ESM, else the module itself. */
function cjs(module: Record<string, unknown>): Record<string, unknown> {
  return (module.default as Record<string, unknown> | undefined) ?? module;
}

/**
 * Opens `sqlite:<path>`, `redis://…` / `rediss://…`, `postgres://…` /
 * `postgresql://…` or `mysql://…` / `mariadb://…`. Nothing is created:
 * SQL tables must exist (a missing table is an error from the database).
 *
 * @throws Error for an unknown scheme, a missing driver, or an unreachable store.
 */
export async function openStoreUrl(url: string, options: OpenStoreOptions = {}): Promise<OpenedStore> {
  const table = options.table;
  if (url.startsWith('sqlite:')) {
    let path = url.slice('sqlite:'.length);
    if (path.startsWith('//')) path = path.slice(2);
    if (path === '') throw new Error('sqlite: needs a file path, e.g. sqlite:./data/oncely.db');
    // A mistyped path must not create an empty database and report "no record".
    if (!existsSync(path)) throw new Error(`no such file: ${path}`);
    const Database = cjs(await loadDriver('better-sqlite3', 'sqlite:')) as unknown as new (
      path: string,
      options: { fileMustExist: boolean },
    ) => { close(): void; prepare(sql: string): { get(...params: unknown[]): unknown } };
    const { sqliteStore } = await import('../stores/sqlite.js');
    const database = new Database(path, { fileMustExist: true });
    const name = table ?? 'oncely_records';
    if (!database.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?").get(name)) {
      database.close();
      throw new Error(`${path} has no table ${name} (another table? pass --table)`);
    }
    const store = sqliteStore({
      database: database as never,
      ...(table ? { table } : {}),
      migrate: false,
      purgeIntervalMs: 0,
    });
    return {
      store,
      kind: 'sqlite',
      async close() {
        await store.close();
        database.close();
      },
    };
  }
  if (url.startsWith('redis://') || url.startsWith('rediss://')) {
    const ioredis = await loadDriver('ioredis', 'redis://');
    const Redis = (ioredis.Redis ?? cjs(ioredis)) as new (
      url: string,
      options: object,
    ) => { connect(): Promise<void>; quit(): Promise<unknown>; disconnect(): void; on(e: string, f: (error: Error) => void): void };
    const client = new Redis(url, { lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 1, connectTimeout: 3_000, retryStrategy: () => null });
    let lastError: Error | undefined;
    client.on('error', (error) => {
      lastError = error; // the real cause; connect() only says the connection closed
    });
    try {
      await client.connect();
    } catch (error) {
      client.disconnect();
      throw lastError ?? error;
    }
    const { redisStore } = await import('../stores/redis.js');
    const store = redisStore({ client: client as never, ...(options.prefix ? { prefix: options.prefix } : {}) });
    return {
      store,
      kind: 'redis',
      async close() {
        await store.close();
        await client.quit().catch(() => client.disconnect());
      },
    };
  }
  if (url.startsWith('postgres://') || url.startsWith('postgresql://')) {
    const pg = cjs(await loadDriver('pg', 'postgres://'));
    const Pool = pg.Pool as new (config: object) => { end(): Promise<void>; on(e: string, f: () => void): void };
    const pool = new Pool({ connectionString: url, connectionTimeoutMillis: 3_000, max: 2 });
    pool.on('error', () => {});
    const { postgresStore } = await import('../stores/postgres.js');
    const store = postgresStore({ pool: pool as never, ...(table ? { table } : {}) });
    return {
      store,
      kind: 'postgres',
      async close() {
        await store.close();
        await pool.end();
      },
    };
  }
  if (url.startsWith('mysql://') || url.startsWith('mariadb://')) {
    const mysql = cjs(await loadDriver('mysql2/promise', 'mysql://'));
    const u = new URL(url);
    u.protocol = 'mysql:';
    const createPool = mysql.createPool as (config: object) => { end(): Promise<void> };
    const pool = createPool({ uri: u.toString(), connectTimeout: 3_000, connectionLimit: 2 });
    const { mysqlStore } = await import('../stores/mysql.js');
    const store = mysqlStore({ pool: pool as never, ...(table ? { table } : {}) });
    return {
      store,
      kind: 'mysql',
      async close() {
        await store.close();
        await pool.end();
      },
    };
  }
  throw new Error(`unsupported store URL ${JSON.stringify(redact(url))}: use sqlite:<path>, redis://, postgres:// or mysql://`);
}

/** Which record to read: the key as the client sent it, and where it was used. */
export interface RecordQuery {
  key: string;
  /** The scope the server gave it (the account, for the reference system) ['']. */
  scope?: string;
  /** The middleware's `namespace` option ['']. */
  namespace?: string;
}

/** How {@link inspectKey} reads a record. */
export interface InspectOptions {
  /** Include the head of a stored body (`bodyHead`). Default false: only its size. */
  showBody?: boolean;
  /** Keys to open outcomes sealed by `withEncryption` (`ONCELY_ENCRYPTION_KEY`). */
  encryptionKeys?: readonly EncryptionKey[];
  /** The `secret` the server derives keyed record ids with (`ONCELY_RECORD_SECRET`). */
  secret?: RecordIdSecret;
}

/** What {@link inspectKey} reports. */
export interface Inspection {
  /** The record id the store indexes: SHA-256 (or, with a secret, HMAC-SHA-256) of namespace, scope and key. */
  id: string;
  /** `absent` when there is no record, or it expired. */
  state: 'absent' | StoredRecord['state'];
  fingerprint?: string | null;
  /** In-progress records: when the lease ends (ISO time) and how far away that is. */
  leaseUntil?: string;
  leaseRemainingMs?: number;
  /** When the record stops existing (ISO time). */
  expiresAt?: string;
  /** Completed records: the head of the stored outcome. */
  outcome?: {
    /** `encrypted`: sealed, and not opened (no key given, or none of them opens it). */
    kind: 'response' | 'marker' | 'processed' | 'unreadable' | 'encrypted';
    status?: number;
    headers?: Array<[string, string]>;
    location?: string;
    /** The first 500 characters of the body; only with `showBody`. */
    bodyHead?: string;
    bodyBytes?: number;
    /** True when there is a body and it was left out (no `showBody`). */
    bodyHidden?: boolean;
    /** The key id of a sealed outcome (opened or not). */
    keyId?: string;
    /** Why a sealed outcome could not be opened with the keys given. */
    decryptError?: DecryptFailureReason;
  };
}

/** Reads the record of `query.key` in `store`; bodies only with `options.showBody`. */
export async function inspectKey(store: IdempotencyStore, query: RecordQuery, options: InspectOptions = {}): Promise<Inspection> {
  const id = recordIdFor(options.secret)(query.key, query.scope ?? '', query.namespace ?? '');
  const record = await store.get(id);
  if (record === null) return { id, state: 'absent' };
  const now = Date.now();
  const result: Inspection = {
    id,
    state: record.state,
    fingerprint: record.fingerprint,
    expiresAt: new Date(record.expiresAt).toISOString(),
  };
  if (record.state === 'in_progress') {
    result.leaseUntil = new Date(record.leaseUntil).toISOString();
    result.leaseRemainingMs = record.leaseUntil - now;
    return result;
  }
  let stored = record.outcome;
  let keyId: string | undefined;
  if (isSealed(stored)) {
    keyId = sealedKeyId(stored);
    if (options.encryptionKeys === undefined || options.encryptionKeys.length === 0) {
      result.outcome = { kind: 'encrypted', ...(keyId ? { keyId } : {}) };
      return result;
    }
    try {
      stored = outcomeCipher(options.encryptionKeys).open(id, stored);
    } catch (error) {
      if (!(error instanceof DecryptFailedError)) throw error;
      result.outcome = { kind: 'encrypted', ...(keyId ? { keyId } : {}), decryptError: error.reason };
      return result;
    }
  }
  const sealed = keyId ? { keyId } : {};
  const body = (text: string, bytes: number) =>
    options.showBody ? { bodyHead: text.slice(0, 500), bodyBytes: bytes } : { bodyBytes: bytes, ...(bytes > 0 ? { bodyHidden: true } : {}) };
  try {
    const outcome = decodeOutcome(stored);
    if (outcome.kind === 'response') {
      const { body: raw } = outcome.response;
      const text = typeof raw === 'string' ? raw : Buffer.from(raw).toString('base64');
      result.outcome = {
        kind: 'response',
        status: outcome.response.status,
        headers: outcome.response.headers,
        ...body(text, typeof raw === 'string' ? Buffer.byteLength(raw) : raw.byteLength),
        ...sealed,
      };
    } else if (outcome.kind === 'marker') {
      result.outcome = { kind: 'marker', status: outcome.status, ...(outcome.location ? { location: outcome.location } : {}), ...sealed };
    } else {
      result.outcome = { kind: 'processed', status: outcome.status, ...sealed };
    }
  } catch {
    // Not an HTTP outcome (the function form or a consumer stored it): its raw text counts as the body.
    result.outcome = { kind: 'unreadable', ...body(stored, Buffer.byteLength(stored)), ...sealed };
  }
  return result;
}

/** An {@link Inspection} as lines of text for a terminal. */
export function formatInspection(inspection: Inspection): string {
  const lines = [`record      ${inspection.id}`, `state       ${inspection.state}`];
  if (inspection.state === 'absent') {
    lines.push('            (no record: never used, expired, or another scope/namespace)');
    return lines.join('\n');
  }
  lines.push(`fingerprint ${inspection.fingerprint ?? '(none)'}`);
  if (inspection.leaseUntil !== undefined) {
    const remaining = inspection.leaseRemainingMs ?? 0;
    lines.push(
      `lease until ${inspection.leaseUntil} (${remaining > 0 ? `${remaining} ms left` : `ended ${-remaining} ms ago: the next retry takes over`})`,
    );
  }
  lines.push(`expires     ${inspection.expiresAt}`);
  const outcome = inspection.outcome;
  if (outcome) {
    lines.push(`outcome     ${outcome.kind}${outcome.status !== undefined ? ` ${outcome.status}` : ''}`);
    if (outcome.keyId !== undefined) {
      const why =
        outcome.decryptError === 'unknown-key'
          ? ': not among the keys in ONCELY_ENCRYPTION_KEY'
          : outcome.decryptError !== undefined
            ? `: does not open (${outcome.decryptError})`
            : outcome.kind === 'encrypted'
              ? ': set ONCELY_ENCRYPTION_KEY to open it'
              : '';
      lines.push(`sealed with ${outcome.keyId}${why}`);
    }
    if (outcome.location) lines.push(`location    ${outcome.location}`);
    for (const [name, value] of outcome.headers ?? []) lines.push(`  ${name}: ${value}`);
    if (outcome.bodyHidden) {
      lines.push(`body        (${outcome.bodyBytes} bytes, hidden: --show-body prints it)`);
    } else if (outcome.bodyHead !== undefined) {
      const more = outcome.bodyBytes !== undefined && outcome.bodyBytes > outcome.bodyHead.length ? ` … (${outcome.bodyBytes} bytes)` : '';
      lines.push(`body        ${outcome.bodyHead}${more}`);
    }
  }
  return lines.join('\n');
}

/** Deletes up to `limit` expired records; 0 for stores that expire records themselves. */
export async function purge(store: IdempotencyStore, limit: number): Promise<{ deleted: number; nativeTtl: boolean }> {
  if (store.capabilities.nativeTtl) return { deleted: 0, nativeTtl: true };
  return { deleted: await store.purgeExpired(limit), nativeTtl: false };
}

/** The URL without its password, for messages. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return url;
  }
}
