/** oncely/consumer/amqp against the real RabbitMQ (127.0.0.1:5672). */
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import amqp, { type Channel, type ChannelModel } from 'amqplib';
import { Redis } from 'ioredis';
import { Engine, type IdempotencyStore } from 'oncely';
import { type AmqpConsumer, consumeAmqp } from 'oncely/consumer/amqp';
import { memoryStore } from 'oncely/stores/memory';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Child, sleep, spawnConsumer, suffix, waitFor } from './helpers.js';

const URL = 'amqp://guest:guest@127.0.0.1:5672';
let connection: ChannelModel;
let channel: Channel;
let redis: Redis;
const queues: string[] = [];
const running: AmqpConsumer[] = [];
const children: Child[] = [];
const files: string[] = [];
const keys: string[] = [];

async function newQueue(args: Record<string, unknown> = {}): Promise<string> {
  const queue = `oncely-test-${suffix()}`;
  await channel.assertQueue(queue, { durable: false, arguments: args });
  queues.push(queue);
  return queue;
}

function publish(queue: string, id: string, body = id): void {
  channel.sendToQueue(queue, Buffer.from(body), { messageId: id });
}

async function start(options: Omit<Parameters<typeof consumeAmqp>[0], 'channel'>): Promise<AmqpConsumer> {
  const ch = await connection.createChannel();
  const consumer = await consumeAmqp({ retryDelayMs: 50, ...options, channel: ch });
  running.push(consumer);
  return consumer;
}

const counter = () => {
  const counts = new Map<string, number>();
  return { counts, add: (id: string) => counts.set(id, (counts.get(id) ?? 0) + 1) };
};

beforeAll(async () => {
  connection = await amqp.connect(URL);
  channel = await connection.createChannel();
  redis = new Redis({ host: '127.0.0.1', port: 6379 });
});

afterAll(async () => {
  for (const child of children) await child.kill();
  for (const consumer of running) await consumer.stop();
  for (const queue of queues) await channel.deleteQueue(queue).catch(() => undefined);
  if (keys.length > 0) await redis.del(...keys);
  for (const file of files) for (const ext of ['', '-wal', '-shm']) rmSync(file + ext, { force: true });
  await connection.close();
  redis.disconnect();
});

describe('amqp consumer (real RabbitMQ)', () => {
  it('handles every message published three times (sequentially and concurrently) once', async () => {
    const queue = await newQueue();
    const { counts, add } = counter();
    let acked = 0;
    await start({
      queue,
      name: `c-${suffix()}`,
      store: memoryStore(),
      hooks: { processed: () => acked++, duplicate: () => acked++ },
      handler: async ({ id }) => {
        add(id);
        await sleep(5);
      },
    });
    for (let i = 0; i < 10; i++) for (let copy = 0; copy < 3; copy++) publish(queue, `seq-${i}`);
    await Promise.all(Array.from({ length: 30 }, (_, n) => Promise.resolve().then(() => publish(queue, `con-${n % 10}`))));
    await waitFor(() => acked === 60, 15_000, '60 acknowledgements');
    expect(counts.size).toBe(20);
    expect([...counts.values()].every((n) => n === 1)).toBe(true);
    await sleep(200);
    expect((await channel.checkQueue(queue)).messageCount).toBe(0);
  });

  it('leaves an in-flight duplicate for redelivery, then acknowledges it as a duplicate', async () => {
    const queue = await newQueue();
    let runs = 0;
    const events = { inFlight: 0, duplicate: 0 };
    await start({
      queue,
      name: `c-${suffix()}`,
      store: memoryStore(),
      hooks: { inFlight: () => events.inFlight++, duplicate: () => events.duplicate++ },
      handler: async () => {
        runs++;
        await sleep(400);
      },
    });
    publish(queue, 'slow');
    publish(queue, 'slow');
    await waitFor(() => events.duplicate === 1, 10_000, 'the duplicate');
    expect(events.inFlight).toBeGreaterThanOrEqual(1);
    expect(runs).toBe(1);
  });

  it('releases a failed message; the broker redelivers it and it is handled', async () => {
    const queue = await newQueue();
    let attempts = 0;
    let processed = 0;
    let released = 0;
    await start({
      queue,
      name: `c-${suffix()}`,
      store: memoryStore(),
      hooks: { processed: () => processed++, released: () => released++ },
      handler: async () => {
        if (++attempts === 1) throw new Error('transient');
      },
    });
    publish(queue, 'flaky');
    await waitFor(() => processed === 1, 10_000, 'the retry');
    expect(attempts).toBe(2);
    expect(released).toBe(1);
  });

  it('does not run or acknowledge while the store is down; handles the message once it is back', async () => {
    const queue = await newQueue();
    const inner = memoryStore();
    let down = true;
    const store: IdempotencyStore = {
      ...inner,
      claim: (id, input) => (down ? Promise.reject(new Error('connection refused')) : inner.claim(id, input)),
    };
    let runs = 0;
    let storeErrors = 0;
    let processed = 0;
    await start({
      queue,
      name: `c-${suffix()}`,
      store,
      hooks: { storeError: () => storeErrors++, processed: () => processed++ },
      handler: () => void runs++,
    });
    publish(queue, 'during-outage');
    await waitFor(() => storeErrors >= 3, 10_000, 'three refused claims (redeliveries)');
    expect(runs).toBe(0);
    down = false;
    await waitFor(() => processed === 1, 10_000, 'the message after the outage');
    expect(runs).toBe(1);
  });

  it('sends a failed message to the dead-letter queue with deadLetter: true', async () => {
    const dlq = await newQueue();
    const queue = await newQueue({ 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': dlq });
    let attempts = 0;
    await start({
      queue,
      name: `c-${suffix()}`,
      store: memoryStore(),
      deadLetter: true,
      handler: async () => {
        attempts++;
        throw new Error('poison');
      },
    });
    publish(queue, 'poison');
    await waitFor(async () => (await channel.checkQueue(dlq)).messageCount === 1, 10_000, 'the dead letter');
    expect(attempts).toBe(1);
  });

  it('a consumer killed (SIGKILL) inside a handler: the restarted one takes over, one effect', async () => {
    const queue = await newQueue();
    const dbPath = join(tmpdir(), `oncely-amqp-${suffix()}.db`);
    files.push(dbPath);
    const effectsKey = `oncely-test:effects:${suffix()}`;
    keys.push(effectsKey);
    const base = { broker: 'amqp' as const, target: queue, dbPath, name: 'killed', effectsKey, leaseMs: 1_000 };
    const first = spawnConsumer({ ...base, slowId: 'k', slowMs: 60_000 });
    children.push(first);
    await first.waitForLine(/^ready$/);
    // 'a' is handled and acknowledged before the crash; the kill lands inside k's handler, before its effect.
    // (A kill between another handler's effect and its completion would repeat that effect: at least once.)
    publish(queue, 'a');
    await first.waitForLine(/^done a$/);
    await sleep(300);
    publish(queue, 'k');
    await first.waitForLine(/^started k$/);
    await first.kill('SIGKILL');
    const second = spawnConsumer(base);
    children.push(second);
    publish(queue, 'b');
    await waitFor(async () => (await redis.hget(effectsKey, 'k')) === '1', 20_000, 'the effect of k');
    // The restarted consumer ran k by taking over the dead one's lease.
    await second.waitForLine(/^started k takeover$/, 1_000);
    await sleep(1_500);
    expect(await redis.hgetall(effectsKey)).toEqual({ a: '1', k: '1', b: '1' });
    await second.kill();
  });

  it('two consumer processes on one queue never handle a message twice', async () => {
    const queue = await newQueue();
    const dbPath = join(tmpdir(), `oncely-amqp-${suffix()}.db`);
    files.push(dbPath);
    const effectsKey = `oncely-test:effects:${suffix()}`;
    keys.push(effectsKey);
    const base = { broker: 'amqp' as const, target: queue, dbPath, name: 'pair', effectsKey, leaseMs: 5_000, workMs: 20 };
    const pair = [spawnConsumer(base), spawnConsumer(base)];
    children.push(...pair);
    await Promise.all(pair.map((c) => c.waitForLine(/^ready$/)));
    for (let i = 0; i < 20; i++) for (let copy = 0; copy < 3; copy++) publish(queue, `m-${i}`);
    await waitFor(async () => (await redis.hlen(effectsKey)) === 20, 20_000, '20 effects');
    await waitFor(async () => (await channel.checkQueue(queue)).messageCount === 0, 10_000, 'an empty queue');
    await sleep(500);
    const effects = await redis.hgetall(effectsKey);
    expect(Object.values(effects).every((n) => n === '1')).toBe(true);
    // Both processes took part.
    expect(pair.every((c) => c.lines.some((l) => l.startsWith('done ')))).toBe(true);
    await Promise.all(pair.map((c) => c.kill()));
  });

  it('a consumer that fails to start (no such queue) stops listening to a shared engine', async () => {
    const engine = new Engine({ store: memoryStore() });
    const heard: unknown[] = [];
    const ch = await connection.createChannel();
    ch.on('error', () => undefined); // the broker closes the channel: 404 NOT_FOUND
    await expect(
      consumeAmqp({
        channel: ch,
        queue: `oncely-missing-${suffix()}`,
        name: `c-${suffix()}`,
        engine,
        hooks: { storeError: (event) => heard.push(event) },
        handler: () => undefined,
      }),
    ).rejects.toThrow(/NOT_FOUND/);
    engine.emit('storeError', { id: 'r', operation: 'claim', error: new Error('later, for another consumer') });
    expect(heard).toEqual([]);
  });
});
