/**
 * The reference system's business data (payments, trades, users, orders)
 * in SQLite via better-sqlite3, in WAL mode, under `DATA_DIR`.
 *
 * Payments, trades and orders carry the idempotency record id of the request
 * that created them, UNIQUE per account: a handler re-executed after a lease
 * takeover finds the row its crashed predecessor committed and answers with
 * it instead of acting twice.
 *
 * @module
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';

/** The better-sqlite3 database type. */
export type BusinessDb = Database.Database;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS payments (
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
CREATE INDEX IF NOT EXISTS payments_account ON payments (account, seq);
CREATE TABLE IF NOT EXISTS trades (
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
CREATE INDEX IF NOT EXISTS trades_account ON trades (account, seq);
CREATE TABLE IF NOT EXISTS users (
  account TEXT NOT NULL,
  id TEXT NOT NULL,
  name TEXT NOT NULL,
  email TEXT NOT NULL,
  updated TEXT NOT NULL,
  PRIMARY KEY (account, id)
);
CREATE TABLE IF NOT EXISTS orders (
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
CREATE INDEX IF NOT EXISTS orders_account ON orders (account, seq);
`;

/**
 * Open (creating when missing) the business database `reference.db` in
 * `dataDir`, switch it to WAL and create the tables.
 */
export function openBusinessDb(dataDir: string): BusinessDb {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const path = join(dataDir, 'reference.db');
  prepareDbFile(path);
  const db = new Database(path);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = NORMAL');
  db.pragma('busy_timeout = 5000');
  db.exec(SCHEMA);
  restrictDbFiles(path);
  return db;
}

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

/** True when `error` is SQLite refusing a duplicate in a UNIQUE index. */
export function isUniqueViolation(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return code === 'SQLITE_CONSTRAINT_UNIQUE' || code === 'SQLITE_CONSTRAINT_PRIMARYKEY';
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
