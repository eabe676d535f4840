/**
 * Start test/support/store-child.ts in a child process and follow its
 * output, for the crash tests of process sessions and transactional mode.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import mysql from 'mysql2/promise';
import type { IdempotencyStore } from 'oncely';
import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
import { migratePostgres, postgresStore } from 'oncely/stores/postgres';
import { sqliteStore } from 'oncely/stores/sqlite';
import pg from 'pg';

const ROOT = join(import.meta.dirname, '..', '..');
const children = new Set<ChildProcess>();

/** A running store child. */
export interface StoreChild {
  child: ChildProcess;
  /** Everything it printed so far (stdout and stderr). */
  output(): string;
  /** Resolve with the first line starting with `prefix` (rejects when the child exits first, or after `ms`). */
  line(prefix: string, ms?: number): Promise<string>;
  /** Resolve once the child has exited: its exit code, or the signal that ended it. */
  exited(): Promise<number | NodeJS.Signals>;
}

/** SIGKILL every child still running (call from afterAll). */
export function killStoreChildren(): void {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
}

/** Start the store child with `env` (see store-child.ts for the settings). */
export function spawnStoreChild(env: Record<string, string>): StoreChild {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', 'test/support/store-child.ts'], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  let out = '';
  const listeners = new Set<() => void>();
  const onData = (chunk: Buffer): void => {
    out += chunk.toString();
    for (const listener of listeners) listener();
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  const exit = new Promise<number | NodeJS.Signals>((resolve) => {
    child.once('exit', (code, signal) => {
      children.delete(child);
      resolve(signal ?? code ?? -1);
    });
  });
  return {
    child,
    output: () => out,
    exited: () => exit,
    // Generous: a cold tsx start on a loaded machine can take many seconds.
    line(prefix, ms = 45_000) {
      return new Promise((resolve, reject) => {
        const check = (): boolean => {
          const found = out.split('\n').find((line) => line.startsWith(prefix));
          if (found === undefined) return false;
          done();
          resolve(found);
          return true;
        };
        const timer = setTimeout(() => {
          done();
          reject(new Error(`no "${prefix}" line within ${ms} ms:\n${out}`));
        }, ms);
        const done = (): void => {
          clearTimeout(timer);
          listeners.delete(listener);
        };
        const listener = (): void => {
          check();
        };
        if (check()) return;
        listeners.add(listener);
        void exit.then((how) => {
          // Output may still be in flight when the exit event fires.
          setTimeout(() => {
            if (check()) return;
            done();
            reject(new Error(`the child exited (${how}) without a "${prefix}" line:\n${out}`));
          }, 50);
        });
      });
    },
  };
}

/** One SQL backend of the crash tests: its tables, a store on them in this process, and ground truth read from the database. */
export interface Backend {
  name: 'postgres' | 'mysql' | 'sqlite';
  /** What the child needs to find the same tables. */
  env: Record<string, string>;
  /** A store on the same table, in this process. */
  store: IdempotencyStore;
  /** Business rows written for record `id` (committed ones). */
  businessRows(id: string): Promise<number>;
  /** Write one business row for `id` through a transaction's driver handle. */
  write(client: unknown, id: string): Promise<void>;
  /** Drop the tables and close what was opened. */
  teardown(): Promise<void>;
}

/** Open `name` with fresh tables of its own (random names). The business table has no unique constraint. */
export async function openBackend(name: Backend['name']): Promise<Backend> {
  const suffix = randomBytes(6).toString('hex');
  const table = `oncely_crash_${suffix}`;
  const business = `oncely_crash_business_${suffix}`;
  const env = { STORE: name, TABLE: table, BUSINESS: business };
  if (name === 'postgres') {
    const pool = new pg.Pool({ host: '127.0.0.1', port: 5432, user: 'postgres', database: 'test', max: 4, ...pgEnv() });
    pool.on('error', () => {});
    await migratePostgres(pool, { table });
    await pool.query(`CREATE TABLE "${business}" (record_id text NOT NULL, amount int NOT NULL)`);
    const store = postgresStore({ pool, table, purge: false });
    return {
      name,
      env,
      store,
      async businessRows(id) {
        return (await pool.query(`SELECT count(*)::int AS n FROM "${business}" WHERE record_id = $1`, [id])).rows[0].n;
      },
      async write(client, id) {
        await (client as pg.PoolClient).query(`INSERT INTO "${business}" (record_id, amount) VALUES ($1, 42)`, [id]);
      },
      async teardown() {
        await store.close();
        for (const dropped of [table, `${table}_sessions`, business]) await pool.query(`DROP TABLE IF EXISTS "${dropped}"`);
        await pool.end();
      },
    };
  }
  if (name === 'mysql') {
    const pool = mysql.createPool({ host: '127.0.0.1', port: 3306, user: 'root', database: 'test', connectionLimit: 4, ...mysqlEnv() });
    await migrateMysql(pool, { table });
    await pool.query(`CREATE TABLE \`${business}\` (record_id VARCHAR(128) NOT NULL, amount INT NOT NULL) ENGINE = InnoDB`);
    const store = mysqlStore({ pool, table, purge: false });
    return {
      name,
      env,
      store,
      async businessRows(id) {
        const [rows] = await pool.query(`SELECT COUNT(*) AS n FROM \`${business}\` WHERE record_id = ?`, [id]);
        return Number((rows as Array<{ n: number }>)[0]!.n);
      },
      async write(client, id) {
        await (client as mysql.PoolConnection).execute(`INSERT INTO \`${business}\` (record_id, amount) VALUES (?, 42)`, [id]);
      },
      async teardown() {
        await store.close();
        for (const dropped of [table, `${table}_sessions`, business]) await pool.query(`DROP TABLE IF EXISTS \`${dropped}\``);
        await pool.end();
      },
    };
  }
  const dir = mkdtempSync(join(tmpdir(), 'oncely-crash-'));
  const file = join(dir, 'crash.db');
  const database = new Database(file);
  const store = sqliteStore({ database, table, purge: false });
  database.exec(`CREATE TABLE "${business}" (record_id TEXT NOT NULL, amount INTEGER NOT NULL)`);
  const count = database.prepare(`SELECT count(*) AS n FROM "${business}" WHERE record_id = ?`);
  return {
    name,
    env: { ...env, SQLITE_FILE: file },
    store,
    async businessRows(id) {
      return (count.get(id) as { n: number }).n;
    },
    async write(client, id) {
      (client as Database.Database).prepare(`INSERT INTO "${business}" (record_id, amount) VALUES (?, 42)`).run(id);
    },
    async teardown() {
      await store.close();
      database.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function pgEnv(): pg.PoolConfig {
  const config: pg.PoolConfig = {};
  if (process.env.PGHOST) config.host = process.env.PGHOST;
  if (process.env.PGPORT) config.port = Number(process.env.PGPORT);
  if (process.env.PGUSER) config.user = process.env.PGUSER;
  if (process.env.PGDATABASE) config.database = process.env.PGDATABASE;
  return config;
}

function mysqlEnv(): mysql.PoolOptions {
  const config: mysql.PoolOptions = {};
  if (process.env.MYSQL_HOST) config.host = process.env.MYSQL_HOST;
  if (process.env.MYSQL_PORT) config.port = Number(process.env.MYSQL_PORT);
  if (process.env.MYSQL_USER) config.user = process.env.MYSQL_USER;
  if (process.env.MYSQL_DATABASE) config.database = process.env.MYSQL_DATABASE;
  return config;
}
