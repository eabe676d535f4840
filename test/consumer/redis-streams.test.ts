/** oncely/consumer/redis-streams against the real Redis (127.0.0.1:6379), with ioredis and node-redis. */
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { Engine } from 'oncely';
import { consumeRedisStream, type RedisStreamConsumer, type RedisStreamConsumerOptions } from 'oncely/consumer/redis-streams';
import { memoryStore } from 'oncely/stores/memory';
import { createClient } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Child, sleep, spawnConsumer, suffix, waitFor } from './helpers.js';

let redis: Redis;
const clients: Array<{ disconnect(): unknown }> = [];
const keys: string[] = [];
const running: RedisStreamConsumer[] = [];
const children: Child[] = [];
const files: string[] = [];

function newStream(): string {
  const stream = `oncely-test:stream:${suffix()}`;
  keys.push(stream);
  return stream;
}

async function publish(stream: string, id: string): Promise<void> {
  await redis.xadd(stream, '*', 'id', id, 'body', `payload of ${id}`);
}

async function pending(stream: string, group = 'g'): Promise<number> {
  const summary = (await redis.xpending(stream, group)) as [number, ...unknown[]];
  return Number(summary[0]);
}

async function start(options: Omit<RedisStreamConsumerOptions, 'client'> & { client?: RedisStreamConsumerOptions['client'] }) {
  let client = options.client;
  if (!client) {
    const own = new Redis({ host: '127.0.0.1', port: 6379 });
    clients.push(own);
    client = own;
  }
  const consumer = await consumeRedisStream({ blockMs: 100, minIdleMs: 300, claimIntervalMs: 50, field: 'id', ...options, client });
  running.push(consumer);
  return consumer;
}

beforeAll(() => {
  redis = new Redis({ host: '127.0.0.1', port: 6379 });
});

afterAll(async () => {
  for (const child of children) await child.kill();
  for (const consumer of running) await consumer.stop();
  for (const client of clients) client.disconnect();
  if (keys.length > 0) await redis.del(...keys);
  for (const file of files) for (const ext of ['', '-wal', '-shm']) rmSync(file + ext, { force: true });
  redis.disconnect();
});

describe('redis streams consumer (real Redis)', () => {
  for (const kind of ['ioredis', 'node-redis'] as const) {
    it(`handles every message added three times (sequentially and concurrently) once, with ${kind}`, async () => {
      const stream = newStream();
      const counts = new Map<string, number>();
      let acked = 0;
      let client: RedisStreamConsumerOptions['client'] | undefined;
      if (kind === 'node-redis') {
        const nodeRedis = await createClient({ url: 'redis://127.0.0.1:6379' }).connect();
        clients.push({ disconnect: () => nodeRedis.destroy() });
        client = nodeRedis;
      }
      const common = {
        stream,
        group: 'g',
        name: `c-${suffix()}`,
        store: memoryStore(),
        hooks: { processed: () => acked++, duplicate: () => acked++ },
        handler: async ({ id }: { id: string }) => {
          counts.set(id, (counts.get(id) ?? 0) + 1);
          await sleep(2);
        },
      };
      const consumer = await start({ ...common, client });
      // A second consumer in the group (own connection), sharing the in-process store.
      await start({ ...common, engine: consumer.consumer.engine, store: undefined });
      for (let i = 0; i < 10; i++) for (let copy = 0; copy < 3; copy++) await publish(stream, `seq-${i}`);
      await Promise.all(Array.from({ length: 30 }, (_, n) => publish(stream, `con-${n % 10}`)));
      await waitFor(() => acked === 60, 15_000, '60 acknowledgements');
      expect(counts.size).toBe(20);
      expect([...counts.values()].every((n) => n === 1)).toBe(true);
      expect(await pending(stream)).toBe(0);
    });
  }

  it('leaves an in-flight duplicate pending; XAUTOCLAIM picks it up later and it is acknowledged as a duplicate', async () => {
    const stream = newStream();
    let runs = 0;
    const events = { inFlight: 0, duplicate: 0 };
    const store = memoryStore();
    const options = {
      stream,
      group: 'g',
      name: 'inflight',
      store,
      count: 1,
      hooks: { inFlight: () => events.inFlight++, duplicate: () => events.duplicate++ },
      handler: async () => {
        runs++;
        await sleep(500);
      },
    };
    await start(options);
    await start(options);
    await publish(stream, 'slow');
    await publish(stream, 'slow');
    await waitFor(() => events.duplicate === 1, 10_000, 'the duplicate');
    expect(events.inFlight).toBeGreaterThanOrEqual(1);
    expect(runs).toBe(1);
    await waitFor(async () => (await pending(stream)) === 0, 5_000, 'nothing pending');
  });

  it('keeps a long handler\'s entry from being auto-claimed by another consumer (XCLAIM while working)', async () => {
    const stream = newStream();
    let runs = 0;
    let inFlight = 0;
    const options = {
      stream,
      group: 'g',
      name: 'long',
      store: memoryStore(),
      count: 1,
      workingIntervalMs: 100,
      hooks: { inFlight: () => inFlight++ },
      handler: async () => {
        runs++;
        await sleep(1_200); // four times minIdleMs
      },
    };
    await start(options);
    await start(options);
    await publish(stream, 'long');
    await waitFor(async () => runs === 1 && (await pending(stream)) === 0, 10_000, 'the entry acknowledged');
    expect(inFlight).toBe(0);
  });

  it('leaves a failed entry pending (released); it is claimed again and handled', async () => {
    const stream = newStream();
    let attempts = 0;
    let processed = 0;
    let released = 0;
    await start({
      stream,
      group: 'g',
      name: 'flaky',
      store: memoryStore(),
      hooks: { processed: () => processed++, released: () => released++ },
      handler: async () => {
        if (++attempts === 1) throw new Error('transient');
      },
    });
    await publish(stream, 'flaky');
    await waitFor(() => processed === 1, 10_000, 'the retry');
    expect(attempts).toBe(2);
    expect(released).toBe(1);
    expect(await pending(stream)).toBe(0);
  });

  it('uses the entry id by default', async () => {
    const stream = newStream();
    const ids: string[] = [];
    let done = 0;
    await start({
      stream,
      group: 'g',
      name: 'entry-ids',
      store: memoryStore(),
      field: undefined,
      hooks: { processed: () => done++ },
      handler: ({ id, message }) => void ids.push(`${id}=${message.id}`),
    });
    await publish(stream, 'x');
    await waitFor(() => done === 1, 5_000, 'the entry');
    expect(ids[0]).toMatch(/^(\d+-\d+)=\1$/);
  });

  it('a consumer killed (SIGKILL) inside a handler: the restarted one auto-claims and takes over, one effect', async () => {
    const stream = newStream();
    const dbPath = join(tmpdir(), `oncely-streams-${suffix()}.db`);
    files.push(dbPath);
    const effectsKey = `oncely-test:effects:${suffix()}`;
    keys.push(effectsKey);
    const base = { broker: 'redis' as const, target: stream, dbPath, name: 'killed', effectsKey, leaseMs: 1_000 };
    const first = spawnConsumer({ ...base, slowId: 'k', slowMs: 60_000 });
    children.push(first);
    await first.waitForLine(/^ready$/);
    // 'a' is handled and acknowledged before the crash; the kill lands inside k's handler, before its effect.
    // (A kill between another handler's effect and its completion would repeat that effect: at least once.)
    await publish(stream, 'a');
    await first.waitForLine(/^done a$/);
    await sleep(300);
    await publish(stream, 'k');
    await first.waitForLine(/^started k$/);
    await first.kill('SIGKILL');
    const second = spawnConsumer(base);
    children.push(second);
    await publish(stream, 'b');
    await waitFor(async () => (await redis.hget(effectsKey, 'k')) === '1', 20_000, 'the effect of k');
    // The restarted consumer ran k by taking over the dead one's lease.
    await second.waitForLine(/^started k takeover$/, 1_000);
    await waitFor(async () => (await pending(stream)) === 0, 10_000, 'nothing pending');
    expect(await redis.hgetall(effectsKey)).toEqual({ a: '1', k: '1', b: '1' });
    await second.kill();
  });

  it('two consumer processes in one group never handle a message twice (shared Redis store)', async () => {
    const stream = newStream();
    const prefix = `oncely-test-store-${suffix()}`;
    const effectsKey = `oncely-test:effects:${suffix()}`;
    keys.push(effectsKey);
    const base = {
      broker: 'redis' as const,
      store: 'redis' as const,
      target: stream,
      dbPath: prefix,
      name: 'pair',
      effectsKey,
      leaseMs: 5_000,
      workMs: 20,
    };
    const pair = [spawnConsumer(base), spawnConsumer(base)];
    children.push(...pair);
    await Promise.all(pair.map((c) => c.waitForLine(/^ready$/)));
    await Promise.all(Array.from({ length: 60 }, (_, n) => publish(stream, `m-${n % 20}`)));
    await waitFor(async () => (await redis.hlen(effectsKey)) === 20, 20_000, '20 effects');
    await waitFor(async () => (await pending(stream)) === 0, 15_000, 'nothing pending');
    const effects = await redis.hgetall(effectsKey);
    expect(Object.values(effects).every((n) => n === '1')).toBe(true);
    expect(pair.every((c) => c.lines.some((l) => l.startsWith('done ')))).toBe(true);
    await Promise.all(pair.map((c) => c.kill()));
    const written = await redis.keys(`${prefix}:*`);
    // One record per message; beside them each consumer process's session key (ends with its TTL).
    const records = written.filter((key) => !key.startsWith(`${prefix}:session:`));
    expect(records.length).toBe(20);
    await redis.del(...written);
  });

  it('a consumer that fails to start (the key is not a stream) stops listening to a shared engine', async () => {
    const key = newStream();
    await redis.set(key, 'not a stream');
    const engine = new Engine({ store: memoryStore() });
    const heard: unknown[] = [];
    await expect(
      start({ stream: key, group: 'g', name: `c-${suffix()}`, engine, hooks: { storeError: (event) => heard.push(event) }, handler: () => undefined }),
    ).rejects.toThrow(/WRONGTYPE/);
    engine.emit('storeError', { id: 'r', operation: 'claim', error: new Error('later, for another consumer') });
    expect(heard).toEqual([]);
  });
});
