/**
 * The shared stores behind a real front door: 100 concurrent duplicates run
 * the handler once, round trips per request are counted (a new key costs
 * claim + complete, a replay one claim), and a Redis outage in the middle of
 * traffic answers 503 within the store timeout, runs nothing, and recovers in
 * the same process with no record lost or stuck.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import mysql from 'mysql2/promise';
import type { IdempotencyStore } from 'oncely';
import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
import { migratePostgres, postgresStore } from 'oncely/stores/postgres';
import { redisStore } from 'oncely/stores/redis';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApp, type TestApp } from './apps.js';

const suffix = randomBytes(4).toString('hex');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const newKey = () => `k-${randomBytes(8).toString('hex')}`;

/** Count store operations; each operation of these stores is one round trip (proven in test/stores). */
function counting(store: IdempotencyStore) {
  const calls: Record<string, number> = {};
  const wrapped = Object.create(store) as IdempotencyStore;
  for (const name of ['claim', 'renew', 'complete', 'release', 'get'] as const) {
    const original = store[name].bind(store) as (...args: unknown[]) => Promise<unknown>;
    (wrapped as unknown as Record<string, unknown>)[name] = (...args: unknown[]) => {
      calls[name] = (calls[name] ?? 0) + 1;
      return original(...args);
    };
  }
  const reset = () => {
    for (const k of Object.keys(calls)) delete calls[k];
  };
  return { store: wrapped, calls, reset };
}

async function post(app: TestApp, key: string, body: unknown = { amount: 1 }, headers: Record<string, string> = {}) {
  const res = await fetch(`${app.url}/payments`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'idempotency-key': key, ...headers },
    body: JSON.stringify(body),
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

const cleanups: Array<() => Promise<unknown>> = [];
afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

const STORES: Record<string, () => Promise<IdempotencyStore>> = {
  redis: async () => {
    const client = new Redis({ host: '127.0.0.1', port: 6379, enableOfflineQueue: false, maxRetriesPerRequest: 1 });
    await new Promise((resolve) => client.once('ready', resolve));
    const prefix = `oncely-http-${suffix}`;
    cleanups.push(async () => {
      const keys = await client.keys(`${prefix}:*`);
      if (keys.length > 0) await client.del(...keys);
      client.disconnect();
    });
    return redisStore({ client, prefix });
  },
  postgres: async () => {
    const pool = new pg.Pool({ host: '127.0.0.1', user: 'postgres', database: 'test', max: 10 });
    const table = `oncely_http_${suffix}`;
    await migratePostgres(pool, { table });
    cleanups.push(async () => {
      await pool.query(`DROP TABLE IF EXISTS ${table}`);
      await pool.end();
    });
    return postgresStore({ pool, table });
  },
  mysql: async () => {
    const pool = mysql.createPool({ host: '127.0.0.1', user: 'root', database: 'test', connectionLimit: 10 });
    const table = `oncely_http_${suffix}`;
    await migrateMysql(pool, { table });
    cleanups.push(async () => {
      await pool.query(`DROP TABLE IF EXISTS ${table}`);
      await pool.end();
    });
    return mysqlStore({ pool, table });
  },
};

for (const [name, make] of Object.entries(STORES)) {
  describe(`fastify on ${name}`, () => {
    let app: TestApp;
    let counter: ReturnType<typeof counting>;
    beforeAll(async () => {
      counter = counting(await make());
      app = await startApp('fastify', { store: counter.store, leaseMs: 10_000 });
    });
    afterAll(() => app.close());

    it('runs the handler once among 100 concurrent duplicates, with no 5xx', async () => {
      const key = newKey();
      const results = await Promise.all(Array.from({ length: 100 }, () => post(app, key, { amount: 3 }, { 'x-delay': '300' })));
      expect(app.executions()).toBe(1);
      expect(results.filter((r) => r.status !== 201 && r.status !== 409)).toEqual([]);
      expect(results.filter((r) => r.status === 201 && !r.headers.get('idempotent-replayed')).length).toBe(1);
    });

    it('costs two round trips for a new key and one for a replay', async () => {
      const key = newKey();
      counter.reset();
      expect((await post(app, key)).status).toBe(201);
      expect(counter.calls).toEqual({ claim: 1, complete: 1 });
      counter.reset();
      const replay = await post(app, key);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(counter.calls).toEqual({ claim: 1 });
    });
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

describe('fastify on redis through an outage of the server', () => {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-http-outage-'));
  let port: number;
  let server: ChildProcess | undefined;
  let client: Redis;
  let app: TestApp;

  // Its own redis-server, with AOF so that records survive the restart as in production.
  const startRedis = async () => {
    server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'yes', '--appendfsync', 'always', '--dir', dir], {
      stdio: 'ignore',
    });
    for (let i = 0; i < 100; i++) {
      if (spawnSync('redis-cli', ['-p', String(port), 'ping'], { encoding: 'utf8' }).stdout.trim() === 'PONG') return;
      await sleep(50);
    }
    throw new Error('redis-server did not start');
  };
  const stopRedis = async () => {
    server?.kill('SIGKILL');
    await new Promise((r) => server?.once('exit', r));
    server = undefined;
  };

  beforeAll(async () => {
    port = await freePort();
    await startRedis();
    client = new Redis({ host: '127.0.0.1', port, enableOfflineQueue: false, maxRetriesPerRequest: 1, retryStrategy: () => 100 });
    await new Promise((resolve) => client.once('ready', resolve));
    app = await startApp('fastify', { store: redisStore({ client }), storeTimeoutMs: 500, leaseMs: 2_000 });
  });
  afterAll(async () => {
    await app?.close();
    client?.disconnect();
    await stopRedis();
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers 503 while Redis is down, runs nothing, and recovers with every record intact', async () => {
    const before = newKey();
    const first = await post(app, before, { amount: 5 });
    expect(first.status).toBe(201);
    expect(app.executions()).toBe(1);

    await stopRedis();
    for (const key of [newKey(), before, newKey()]) {
      const started = Date.now();
      const r = await post(app, key, { amount: 5 });
      expect(r.status).toBe(503);
      expect(r.headers.get('retry-after')).toBe('1');
      expect(r.headers.get('content-type')).toMatch(/problem\+json/);
      expect(Date.now() - started).toBeLessThan(1_500);
    }
    expect(app.executions()).toBe(1);

    await startRedis();
    let recovered = false;
    for (let i = 0; i < 50 && !recovered; i++) {
      await sleep(100);
      recovered = (await post(app, before, { amount: 5 })).status !== 503;
    }
    expect(recovered).toBe(true);
    const replay = await post(app, before, { amount: 5 });
    expect(replay.status).toBe(201);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(replay.text).toBe(first.text);
    const fresh = await post(app, newKey(), { amount: 6 });
    expect(fresh.status).toBe(201);
    expect(app.executions()).toBe(2);
  });
});
