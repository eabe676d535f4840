/**
 * A Redis outage at the store level: on a throwaway redis-server of our own
 * (never the shared one on 6379), every operation of a store whose client
 * is set to fail fast rejects promptly while the server is down, and the
 * same store object works again once the server is back.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { type RedisClientLike, redisStore } from 'oncely/stores/redis';
import { createClient } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const INPUT = { fingerprint: 'v1:outage', leaseMs: 30_000, ttlMs: 60_000 };

async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = 6390 + Math.floor(Math.random() * 500);
    const free = await new Promise<boolean>((resolve) => {
      const server = createServer();
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error('no free port in 6390-6889');
}

/** A redis-server without persistence on `port`, as a child process of this test. */
class ThrowawayRedis {
  #child: ChildProcess | undefined;
  constructor(
    readonly port: number,
    readonly dir: string,
  ) {}

  async start(): Promise<void> {
    const child = spawn(
      'redis-server',
      ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', this.dir],
      { stdio: 'ignore' },
    );
    this.#child = child;
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`redis-server on ${this.port} exited with ${child.exitCode}`);
      const pong = await run('redis-cli', ['-p', String(this.port), 'ping']).then(
        (r) => r.stdout.trim() === 'PONG',
        () => false,
      );
      if (pong) return;
      if (Date.now() > deadline) throw new Error(`redis-server on ${this.port} did not start`);
      await sleep(50);
    }
  }

  /** `shutdown nosave`, then wait for the process to be gone. */
  async stop(): Promise<void> {
    const child = this.#child;
    if (child === undefined || child.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    await run('redis-cli', ['-p', String(this.port), 'shutdown', 'nosave']).catch(() => {});
    await exited;
  }

  /** Last resort in afterAll: kill our own child, by its pid. */
  kill(): void {
    if (this.#child !== undefined && this.#child.exitCode === null) this.#child.kill('SIGKILL');
  }

  async cli(...args: string[]): Promise<string> {
    return (await run('redis-cli', ['-p', String(this.port), ...args])).stdout.trim();
  }
}

type Kind = 'ioredis' | 'node-redis';

async function failFastClient(kind: Kind, port: number): Promise<{ client: RedisClientLike; close(): void }> {
  if (kind === 'ioredis') {
    const client = new Redis({
      host: '127.0.0.1',
      port,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      lazyConnect: true,
    });
    client.on('error', () => {}); // reconnection errors are expected here
    await client.connect();
    return { client, close: () => client.disconnect() };
  }
  const client = createClient({ url: `redis://127.0.0.1:${port}`, disableOfflineQueue: true });
  client.on('error', () => {}); // node-redis throws on an unhandled 'error' event
  await client.connect();
  return { client, close: () => void client.destroy() };
}

/** How long `operation` took to settle, and whether it rejected. */
async function settle(operation: () => Promise<unknown>): Promise<{ ms: number; rejected: boolean }> {
  const started = performance.now();
  const rejected = await operation().then(
    () => false,
    () => true,
  );
  return { ms: performance.now() - started, rejected };
}

describe.each<Kind>(['ioredis', 'node-redis'])('redis store outage (%s)', (kind) => {
  let dir: string;
  let server: ThrowawayRedis;
  let connection: Awaited<ReturnType<typeof failFastClient>>;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'oncely-redis-outage-'));
    server = new ThrowawayRedis(await freePort(), dir);
    await server.start();
    connection = await failFastClient(kind, server.port);
  });

  afterAll(async () => {
    connection?.close();
    await server?.stop().catch(() => server.kill());
    server?.kill();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('rejects every operation within a second while Redis is down, then recovers with the same store', async () => {
    const store = redisStore({ client: connection.client, prefix: `outage-${randomBytes(4).toString('hex')}` });

    // Up: a record exists whose token we hold.
    const before = newId();
    const claim = await store.claim(before, INPUT);
    if (claim.status !== 'acquired') throw new Error('expected acquired');

    await server.stop();

    const operations: Record<string, () => Promise<unknown>> = {
      claim: () => store.claim(newId(), INPUT),
      claimMany: () => store.claimMany!([newId(), newId()], INPUT),
      renew: () => store.renew(before, claim.token, 30_000),
      complete: () => store.complete(before, claim.token, 'x', 60_000),
      release: () => store.release(before, claim.token),
      get: () => store.get(before),
      delete: () => store.delete(before),
    };
    // Twice: right after the shutdown, and once the client is busy reconnecting.
    for (const round of [0, 1]) {
      if (round === 1) await sleep(300);
      for (const [name, operation] of Object.entries(operations)) {
        const { ms, rejected } = await settle(operation);
        expect({ round, name, rejected }).toEqual({ round, name, rejected: true });
        expect(ms, `${name} took ${Math.round(ms)} ms`).toBeLessThan(1_000);
      }
    }
    // Also when they all go at once.
    const started = performance.now();
    const all = await Promise.allSettled(Object.values(operations).map((operation) => operation()));
    expect(all.every((r) => r.status === 'rejected')).toBe(true);
    expect(performance.now() - started).toBeLessThan(1_000);

    await server.start();

    // The same store object recovers once the client has reconnected.
    const deadline = Date.now() + 15_000;
    let after = await store.claim(newId(), INPUT).catch(() => undefined);
    while (after === undefined) {
      if (Date.now() > deadline) throw new Error('the store did not recover within 15 s');
      await sleep(100);
      after = await store.claim(newId(), INPUT).catch(() => undefined);
    }
    expect(after.status).toBe('acquired');
    const id = newId();
    const fresh = await store.claim(id, INPUT);
    if (fresh.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(id, fresh.token, 'after the outage', 60_000)).toBe(true);
    const replay = await store.claim(id, INPUT);
    expect(replay.status === 'completed' && replay.record.outcome).toBe('after the outage');

    // Without persistence, the restarted server forgot the earlier record.
    expect(await store.get(before)).toBeNull();
    expect(await store.complete(before, claim.token, 'late', 60_000)).toBe(false);
  });

  it('reloads its scripts when the server lost its script cache', async () => {
    const store = redisStore({ client: connection.client, prefix: `flush-${randomBytes(4).toString('hex')}` });
    const id = newId();
    expect((await store.claim(id, INPUT)).status).toBe('acquired');
    expect(await server.cli('script', 'flush')).toBe('OK');
    expect((await store.claim(id, INPUT)).status).toBe('in_progress');
    expect((await store.get(id))?.state).toBe('in_progress');
  });
});
