/** oncely/consumer/nats against the real NATS JetStream (127.0.0.1:4222). */
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AckPolicy, type JetStreamClient, type JsMsg, type JetStreamManager, jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect, headers, type NatsConnection, nanos } from '@nats-io/transport-node';
import { Redis } from 'ioredis';
import { consumeNats, type NatsConsumer, type NatsConsumerOptions } from 'oncely/consumer/nats';
import { memoryStore } from 'oncely/stores/memory';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Child, sleep, spawnConsumer, suffix, waitFor } from './helpers.js';

let nc: NatsConnection;
let jsm: JetStreamManager;
let js: JetStreamClient;
let redis: Redis;
const streams: string[] = [];
const running: NatsConsumer<JsMsg>[] = [];
const children: Child[] = [];
const files: string[] = [];
const keys: string[] = [];

/** A new stream with one durable pull consumer `d` (ack wait 2 s). */
async function newStream(): Promise<{ stream: string; subject: string }> {
  const s = suffix();
  const stream = `ONCELY_TEST_${s}`;
  const subject = `oncely.test.${s}`;
  await jsm.streams.add({ name: stream, subjects: [subject] });
  await jsm.consumers.add(stream, { durable_name: 'd', ack_policy: AckPolicy.Explicit, ack_wait: nanos(2_000) });
  streams.push(stream);
  return { stream, subject };
}

/** Publish with an application event id header (Nats-Msg-Id copies would be dropped by JetStream's own duplicate window). */
async function publish(subject: string, eventId: string, msgId?: string): Promise<void> {
  const h = headers();
  h.set('Event-Id', eventId);
  await js.publish(subject, eventId, { headers: h, ...(msgId ? { msgID: msgId } : {}) });
}

async function start(
  stream: string,
  options: Omit<NatsConsumerOptions<JsMsg>, 'messages'>,
  seen?: (message: JsMsg) => void,
): Promise<NatsConsumer<JsMsg>> {
  const source = await (await js.consumers.get(stream, 'd')).consume({ max_messages: 16 });
  const messages = seen
    ? Object.assign(
        (async function* () {
          for await (const m of source) {
            seen(m);
            yield m;
          }
        })(),
        { close: () => source.close() },
      )
    : source;
  const consumer = consumeNats({ retryDelayMs: 50, concurrency: 8, ...options, messages });
  running.push(consumer);
  return consumer;
}

async function pending(stream: string): Promise<number> {
  const info = await jsm.consumers.info(stream, 'd');
  return info.num_pending + info.num_ack_pending;
}

beforeAll(async () => {
  nc = await connect({ servers: '127.0.0.1:4222' });
  jsm = await jetstreamManager(nc);
  js = jetstream(nc);
  redis = new Redis({ host: '127.0.0.1', port: 6379 });
});

afterAll(async () => {
  for (const child of children) await child.kill();
  for (const consumer of running) await consumer.stop();
  for (const stream of streams) await jsm.streams.delete(stream).catch(() => undefined);
  if (keys.length > 0) await redis.del(...keys);
  for (const file of files) for (const ext of ['', '-wal', '-shm']) rmSync(file + ext, { force: true });
  await nc.close();
  redis.disconnect();
});

describe('nats consumer (real JetStream)', () => {
  it('handles every message published three times (sequentially and concurrently) once', async () => {
    const { stream, subject } = await newStream();
    const counts = new Map<string, number>();
    let acked = 0;
    await start(stream, {
      name: `c-${suffix()}`,
      store: memoryStore(),
      header: 'Event-Id',
      hooks: { processed: () => acked++, duplicate: () => acked++ },
      handler: async ({ id }) => {
        counts.set(id, (counts.get(id) ?? 0) + 1);
        await sleep(5);
      },
    });
    for (let i = 0; i < 10; i++) for (let copy = 0; copy < 3; copy++) await publish(subject, `seq-${i}`);
    await Promise.all(Array.from({ length: 30 }, (_, n) => publish(subject, `con-${n % 10}`)));
    await waitFor(() => acked === 60, 15_000, '60 acknowledgements');
    expect(counts.size).toBe(20);
    expect([...counts.values()].every((n) => n === 1)).toBe(true);
    await waitFor(async () => (await pending(stream)) === 0, 5_000, 'nothing pending');
  });

  it('leaves an in-flight duplicate for redelivery (nak with delay), sends working() while the handler runs', async () => {
    const { stream, subject } = await newStream();
    let runs = 0;
    const events = { inFlight: 0, duplicate: 0 };
    const deliveries = new Map<number, number>();
    await start(stream, {
      name: `c-${suffix()}`,
      store: memoryStore(),
      header: 'Event-Id',
      workingIntervalMs: 500,
      hooks: { inFlight: () => events.inFlight++, duplicate: () => events.duplicate++ },
      handler: async () => {
        runs++;
        // Longer than the consumer's 2 s ack wait: only working() keeps JetStream from redelivering it.
        await sleep(3_000);
      },
    }, (m) => deliveries.set(m.seq, (deliveries.get(m.seq) ?? 0) + 1));
    await publish(subject, 'slow', 'slow-a');
    await publish(subject, 'slow', 'slow-b');
    await waitFor(() => events.duplicate === 1, 15_000, 'the duplicate');
    await waitFor(async () => (await pending(stream)) === 0, 5_000, 'nothing pending');
    await sleep(300);
    expect(events.inFlight).toBeGreaterThanOrEqual(1);
    expect(runs).toBe(1);
    // Without working() JetStream would have redelivered the first copy (seq 1) after 2 s.
    expect(deliveries.get(1)).toBe(1);
    expect(deliveries.get(2)).toBeGreaterThanOrEqual(2);
  });

  it('releases a failed message (default id: Nats-Msg-Id); JetStream redelivers it and it is handled', async () => {
    const { stream, subject } = await newStream();
    const attempts: string[] = [];
    let processed = 0;
    let released = 0;
    await start(stream, {
      name: `c-${suffix()}`,
      store: memoryStore(),
      hooks: { processed: () => processed++, released: () => released++ },
      handler: async ({ id }) => {
        attempts.push(id);
        if (attempts.length === 1) throw new Error('transient');
      },
    });
    await publish(subject, 'flaky', 'msg-flaky');
    await waitFor(() => processed === 1, 10_000, 'the retry');
    expect(attempts).toEqual(['msg-flaky', 'msg-flaky']);
    expect(released).toBe(1);
  });

  it('a consumer killed (SIGKILL) inside a handler: the restarted one takes over, one effect (shared Redis store)', async () => {
    const { stream, subject } = await newStream();
    const prefix = `oncely-test-store-${suffix()}`;
    const effectsKey = `oncely-test:effects:${suffix()}`;
    keys.push(effectsKey);
    const base = {
      broker: 'nats' as const,
      store: 'redis' as const,
      target: `${stream}/d`,
      dbPath: prefix,
      name: 'killed',
      effectsKey,
      leaseMs: 1_000,
    };
    const first = spawnConsumer({ ...base, slowId: 'k', slowMs: 60_000 });
    children.push(first);
    await first.waitForLine(/^ready$/);
    // 'a' is handled and acknowledged before the crash; the kill lands inside k's handler, before its effect.
    // (A kill between another handler's effect and its completion would repeat that effect: at least once.)
    await publish(subject, 'a');
    await first.waitForLine(/^done a$/);
    await sleep(300);
    await publish(subject, 'k');
    await first.waitForLine(/^started k$/);
    await first.kill('SIGKILL');
    const second = spawnConsumer(base);
    children.push(second);
    await publish(subject, 'b');
    await waitFor(async () => (await redis.hget(effectsKey, 'k')) === '1', 20_000, 'the effect of k');
    // The restarted consumer ran k by taking over the dead one's lease.
    await second.waitForLine(/^started k takeover$/, 1_000);
    await sleep(1_500);
    expect(await redis.hgetall(effectsKey)).toEqual({ a: '1', k: '1', b: '1' });
    await second.kill();
    const records = await redis.keys(`${prefix}:*`);
    if (records.length > 0) await redis.del(...records);
  });

  it('two consumer processes on one durable consumer never handle a message twice', async () => {
    const { stream, subject } = await newStream();
    const dbPath = join(tmpdir(), `oncely-nats-${suffix()}.db`);
    files.push(dbPath);
    const effectsKey = `oncely-test:effects:${suffix()}`;
    keys.push(effectsKey);
    const base = { broker: 'nats' as const, target: `${stream}/d`, dbPath, name: 'pair', effectsKey, leaseMs: 5_000, workMs: 20 };
    const pair = [spawnConsumer(base), spawnConsumer(base)];
    children.push(...pair);
    await Promise.all(pair.map((c) => c.waitForLine(/^ready$/)));
    await Promise.all(Array.from({ length: 60 }, (_, n) => publish(subject, `m-${n % 20}`)));
    await waitFor(async () => (await redis.hlen(effectsKey)) === 20, 20_000, '20 effects');
    await waitFor(async () => (await pending(stream)) === 0, 15_000, 'nothing pending');
    const effects = await redis.hgetall(effectsKey);
    expect(Object.values(effects).every((n) => n === '1')).toBe(true);
    expect(pair.every((c) => c.lines.some((l) => l.startsWith('done ')))).toBe(true);
    await Promise.all(pair.map((c) => c.kill()));
  });

  it('when the subscription fails (consumer deleted), done settles only after the running handlers settled their messages', async () => {
    const { stream, subject } = await newStream();
    const store = memoryStore();
    let finished = false;
    let started!: () => void;
    const handlerStarted = new Promise<void>((resolve) => (started = resolve));
    // abort_on_missing_resource: the iterator throws once the consumer is gone (instead of waiting for it to come back).
    const messages = await (await js.consumers.get(stream, 'd')).consume({ max_messages: 16, abort_on_missing_resource: true });
    const consumer = consumeNats({
      messages,
      name: `c-${suffix()}`,
      store,
      header: 'Event-Id',
      concurrency: 4,
      handler: async () => {
        started();
        await sleep(600);
        finished = true;
      },
    });
    running.push(consumer);
    await publish(subject, 'slow');
    await handlerStarted;
    await jsm.consumers.delete(stream, 'd');
    await expect(consumer.done).rejects.toBeDefined();
    // A process that exits on `done` must not cut a handler short and leave its claim to the lease.
    expect(finished).toBe(true);
    expect((await store.get(consumer.consumer.recordIdOf('slow')))?.state).toBe('completed');
  });
});
