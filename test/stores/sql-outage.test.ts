/**
 * Store-level outage of PostgreSQL and MariaDB: every operation rejects
 * quickly while the server is down, and the same store object recovers once
 * it is back. The shared servers serve other test files in parallel, so each
 * case starts a throwaway server of its own (temporary data directory, free
 * loopback port), crashes it (`pg_ctl stop -m immediate`, `kill -9`) and
 * starts it again on the same data.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { IdempotencyStore } from 'oncely';
import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
import { migratePostgres, postgresStore } from 'oncely/stores/postgres';
import mysql from 'mysql2/promise';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';

const LONG = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };
/** What "rejects quickly" means: the pools are set to give up after about 1 s. */
const REJECT_WITHIN_MS = 2_000;
const newId = (): string => randomBytes(32).toString('hex');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolve(typeof address === 'object' && address !== null ? address.port : 0));
    });
  });
}

async function waitFor(probe: () => Promise<unknown>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await probe();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await sleep(100);
    }
  }
}

/** The operations of the contract, on records prepared before the outage. */
function operations(store: IdempotencyStore, id: string, token: string): Record<string, () => Promise<unknown>> {
  return {
    claim: () => store.claim(newId(), LONG),
    renew: () => store.renew(id, token, 30_000),
    complete: () => store.complete(id, token, 'x', 60_000),
    release: () => store.release(id, token),
    get: () => store.get(id),
    delete: () => store.delete(newId()),
    purgeExpired: () => store.purgeExpired(10),
  };
}

/** Check that the store rejects every operation within the bound, and report the slowest. */
async function expectAllReject(store: IdempotencyStore, id: string, token: string): Promise<void> {
  for (const [name, op] of Object.entries(operations(store, id, token))) {
    const started = Date.now();
    const outcome = await op().then(
      () => 'resolved',
      () => 'rejected',
    );
    const elapsed = Date.now() - started;
    expect(`${name}: ${outcome}`).toBe(`${name}: rejected`);
    expect(elapsed, `${name} took ${elapsed} ms`).toBeLessThan(REJECT_WITHIN_MS);
  }
}

/** Prepare: a completed record and one in progress, so that recovery can be checked against both. */
async function prepare(store: IdempotencyStore): Promise<{ done: string; busy: string; token: string }> {
  const done = newId();
  const first = await store.claim(done, LONG);
  if (first.status !== 'acquired') throw new Error('expected acquired');
  expect(await store.complete(done, first.token, 'kept', 60_000)).toBe(true);
  const busy = newId();
  const second = await store.claim(busy, LONG);
  if (second.status !== 'acquired') throw new Error('expected acquired');
  return { done, busy, token: second.token };
}

/** After the restart the same store object answers again, with the records it had. */
async function expectRecovered(store: IdempotencyStore, records: { done: string; busy: string; token: string }) {
  expect(await store.claim(records.done, LONG)).toMatchObject({ status: 'completed', record: { outcome: 'kept' } });
  expect(await store.claim(records.busy, LONG)).toMatchObject({ status: 'in_progress' });
  expect(await store.renew(records.busy, records.token, 30_000)).toBe(true);
  expect(await store.complete(records.busy, records.token, 'after', 60_000)).toBe(true);
  const fresh = await store.claim(newId(), LONG);
  expect(fresh.status).toBe('acquired');
  expect(await store.purgeExpired(10)).toBeGreaterThanOrEqual(0);
}

const cleanups: Array<() => void> = [];
afterAll(() => {
  for (const cleanup of cleanups.reverse()) {
    try {
      cleanup();
    } catch {
      // best effort: a temp directory or a dead process
    }
  }
});

// ---------------------------------------------------------------- PostgreSQL

const pgBin = (() => {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return undefined;
  const versions = readdirSync(root).sort((a, b) => Number(b) - Number(a));
  for (const version of versions) if (existsSync(join(root, version, 'bin', 'initdb'))) return join(root, version, 'bin');
  return undefined;
})();

/** initdb and the server refuse to run as root: run them as the `postgres` OS user when we are root. */
function asPostgres(command: string, args: string[]): { status: number | null; output: string } {
  const isRoot = process.getuid?.() === 0;
  const result = isRoot
    ? spawnSync('runuser', ['-u', 'postgres', '--', command, ...args], { encoding: 'utf8' })
    : spawnSync(command, args, { encoding: 'utf8' });
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

describe.skipIf(pgBin === undefined)('postgres store during an outage', () => {
  it('rejects every operation quickly while the server is down or frozen, then recovers without a new store', async () => {
    const bin = pgBin as string;
    const dir = mkdtempSync(join(tmpdir(), 'oncely-pg-outage-'));
    if (process.getuid?.() === 0) chownSync(dir, Number(spawnSync('id', ['-u', 'postgres']).stdout), 0);
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const data = join(dir, 'data');
    const init = asPostgres(join(bin, 'initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8', '--no-sync']);
    expect(init.status, init.output).toBe(0);
    const port = await freePort();
    const ctl = (...args: string[]) => asPostgres(join(bin, 'pg_ctl'), ['-D', data, ...args]);
    const start = () => {
      const started = ctl('-o', `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1`, '-l', join(dir, 'log'), '-w', 'start');
      expect(started.status, started.output).toBe(0);
    };
    start();
    cleanups.push(() => ctl('stop', '-m', 'immediate'));

    const pool = new pg.Pool({
      host: '127.0.0.1',
      port,
      user: 'postgres',
      database: 'postgres',
      max: 4,
      connectionTimeoutMillis: 1000,
      query_timeout: 1500,
    });
    pool.on('error', () => {}); // idle connections dropped by the crash must not crash the test process
    cleanups.push(() => void pool.end().catch(() => {}));
    await migratePostgres(pool);
    const store = postgresStore({ pool });
    const records = await prepare(store);

    const stopped = ctl('stop', '-m', 'immediate');
    expect(stopped.status, stopped.output).toBe(0);
    await expectAllReject(store, records.busy, records.token);
    await expectAllReject(store, records.busy, records.token); // and again: nothing wedged

    start();
    await waitFor(() => store.get(records.done), 10_000);
    await expectRecovered(store, records);

    // A frozen server (every process stopped, sockets open: a black hole, not
    // a refusal) must not hang the store either: query_timeout bounds it.
    const postmaster = Number(readFileSync(join(data, 'postmaster.pid'), 'utf8').split('\n')[0]);
    const children = spawnSync('ps', ['-o', 'pid=', '--ppid', String(postmaster)], { encoding: 'utf8' })
      .stdout.split('\n')
      .map((line) => Number(line.trim()))
      .filter((pid) => pid > 0);
    const frozen = [postmaster, ...children];
    const thaw = () => {
      for (const pid of frozen) {
        try {
          process.kill(pid, 'SIGCONT');
        } catch {
          // already gone
        }
      }
    };
    cleanups.push(thaw);
    const again = await prepare(store);
    for (const pid of frozen) process.kill(pid, 'SIGSTOP');
    try {
      await expectAllReject(store, again.busy, again.token);
    } finally {
      thaw();
    }
    await waitFor(() => store.get(again.done), 10_000);
    await expectRecovered(store, again);
  }, 60_000);
});

// ---------------------------------------------------------------- MariaDB

const mariadbd = ['/usr/sbin/mariadbd', '/usr/sbin/mysqld'].find((path) => existsSync(path));
const installDb = ['/usr/bin/mariadb-install-db', '/usr/bin/mysql_install_db'].find((path) => existsSync(path));

describe.skipIf(mariadbd === undefined || installDb === undefined)('mysql store during an outage (MariaDB)', () => {
  it('rejects every operation quickly while the server is down, then recovers without a new store', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'oncely-my-outage-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const data = join(dir, 'data');
    const user = process.getuid?.() === 0 ? ['--user=root'] : [];
    const install = spawnSync(
      installDb as string,
      ['--no-defaults', `--datadir=${data}`, ...user, '--auth-root-authentication-method=normal', '--skip-test-db'],
      { encoding: 'utf8' },
    );
    expect(install.status, `${install.stdout}${install.stderr}`).toBe(0);
    const port = await freePort();
    let server: ChildProcess | undefined;
    const start = () => {
      const log = openSync(join(dir, 'log'), 'a');
      server = spawn(
        mariadbd as string,
        [
          '--no-defaults',
          `--datadir=${data}`,
          `--port=${port}`,
          `--socket=${join(dir, 'sock')}`,
          `--pid-file=${join(dir, 'pid')}`,
          '--bind-address=127.0.0.1',
          '--innodb-buffer-pool-size=16M',
          '--skip-log-bin',
          ...user,
        ],
        { stdio: ['ignore', log, log] },
      );
    };
    const kill = async () => {
      const current = server;
      if (current === undefined || current.exitCode !== null) return;
      const exited = new Promise((resolve) => current.once('exit', resolve));
      current.kill('SIGKILL');
      await exited;
    };
    cleanups.push(() => server?.kill('SIGKILL'));
    const probe = async () => {
      const connection = await mysql.createConnection({ host: '127.0.0.1', port, user: 'root', connectTimeout: 1000 });
      await connection.end();
    };
    start();
    await waitFor(probe, 30_000);

    const pool = mysql.createPool({
      host: '127.0.0.1',
      port,
      user: 'root',
      database: 'mysql',
      connectionLimit: 4,
      connectTimeout: 1000,
    });
    cleanups.push(() => void pool.end().catch(() => {}));
    const table = `oncely_outage_${randomBytes(4).toString('hex')}`;
    await migrateMysql(pool, { table });
    const store = mysqlStore({ pool, table });
    const records = await prepare(store);

    await kill();
    await expectAllReject(store, records.busy, records.token);
    await expectAllReject(store, records.busy, records.token);

    start();
    await waitFor(probe, 30_000);
    await waitFor(() => store.get(records.done), 10_000);
    await expectRecovered(store, records);
  }, 90_000);
});
