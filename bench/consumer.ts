/**
 * The consumer benchmark (issue 5): messages per second through a Redis
 * Streams consumer group and a RabbitMQ queue, bare and with oncely's
 * idempotency layer (memory store, Redis store), in one run; plus the store
 * calls per message (a counting wrapper around the store).
 *
 *   node --conditions=source --import tsx bench/consumer.ts
 *   MESSAGES=5000 ROUNDS=3 BATCH=16 (the defaults: well under a minute)
 *
 * Each round drains a pre-filled stream/queue of MESSAGES messages with
 * every contestant back to back (the order rotates per round); the table
 * shows the median rate and its ratio to the bare consumer of that broker.
 * The handler does nothing, so the figures are the layer's own cost.
 * Needs Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672. Not a test.
 */
import { randomBytes } from 'node:crypto';
import { cpus } from 'node:os';
import amqp from 'amqplib';
import { Redis } from 'ioredis';
import type { IdempotencyStore } from 'oncely';
import { consumeAmqp } from 'oncely/consumer/amqp';
import { consumeRedisStream } from 'oncely/consumer/redis-streams';
import { memoryStore } from 'oncely/stores/memory';
import { redisStore } from 'oncely/stores/redis';

const MESSAGES = Number(process.env.MESSAGES ?? 5_000);
const ROUNDS = Number(process.env.ROUNDS ?? 3);
const BATCH = Number(process.env.BATCH ?? 16);
const RUN = randomBytes(4).toString('hex');
const AMQP_URL = process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A store wrapper counting calls per operation (each is one round trip on the stores used here). */
function counting(inner: IdempotencyStore) {
  const calls: Record<string, number> = {};
  const wrapped = { ...inner } as IdempotencyStore;
  for (const op of ['claim', 'claimMany', 'renew', 'complete', 'release', 'get'] as const) {
    const fn = inner[op] as ((...args: unknown[]) => Promise<unknown>) | undefined;
    if (!fn) continue;
    (wrapped as unknown as Record<string, unknown>)[op] = (...args: unknown[]) => {
      calls[op] = (calls[op] ?? 0) + 1;
      return fn.apply(inner, args);
    };
  }
  return { store: wrapped, calls };
}

type Mode = 'bare' | 'oncely+memory' | 'oncely+redis';
interface Result {
  rate: number;
  calls?: Record<string, number>;
}

const admin = new Redis({ host: '127.0.0.1', port: 6379 });
const storeClient = new Redis({ host: '127.0.0.1', port: 6379 });
let roundNo = 0;

function storeFor(mode: Mode) {
  if (mode === 'bare') return undefined;
  return counting(mode === 'oncely+memory' ? memoryStore({ maxEntries: MESSAGES * 2 }) : redisStore({ client: storeClient, prefix: `bench-${RUN}-${roundNo++}` }));
}

async function redisStreams(mode: Mode): Promise<Result> {
  const stream = `bench:consumer:${RUN}:${roundNo++}`;
  const fill = admin.pipeline();
  for (let i = 0; i < MESSAGES; i++) fill.xadd(stream, '*', 'id', `m-${i}`, 'body', 'x');
  await fill.exec();
  const reader = new Redis({ host: '127.0.0.1', port: 6379 });
  let handled = 0;
  const started = performance.now();
  const counted = storeFor(mode);
  try {
    if (mode === 'bare') {
      await reader.xgroup('CREATE', stream, 'g', '0', 'MKSTREAM');
      while (handled < MESSAGES) {
        const reply = (await reader.call('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', BATCH, 'BLOCK', 1000, 'STREAMS', stream, '>')) as
          | Array<[string, Array<[string, string[]]>]>
          | null;
        const entries = reply?.[0]?.[1] ?? [];
        if (entries.length === 0) continue;
        handled += entries.length;
        await reader.xack(stream, 'g', ...entries.map((e) => e[0]));
      }
    } else {
      const running = await consumeRedisStream({
        client: reader,
        stream,
        group: 'g',
        store: counted!.store,
        ttlMs: 60_000,
        count: BATCH,
        blockMs: 1000,
        hooks: { processed: () => void handled++ },
        handler: () => undefined,
      });
      while (handled < MESSAGES) await sleep(2);
      const rate = MESSAGES / ((performance.now() - started) / 1000);
      await running.stop();
      return { rate, calls: counted!.calls };
    }
    return { rate: MESSAGES / ((performance.now() - started) / 1000) };
  } finally {
    reader.disconnect();
    await admin.del(stream);
  }
}

async function rabbit(mode: Mode): Promise<Result> {
  const queue = `bench-consumer-${RUN}-${roundNo++}`;
  const connection = await amqp.connect(AMQP_URL);
  try {
    const publisher = await connection.createConfirmChannel();
    await publisher.assertQueue(queue, { durable: false });
    for (let i = 0; i < MESSAGES; i++) publisher.sendToQueue(queue, Buffer.from('x'), { messageId: `m-${i}` });
    await publisher.waitForConfirms();
    const channel = await connection.createChannel();
    let handled = 0;
    const counted = storeFor(mode);
    const started = performance.now();
    let stop: () => Promise<unknown>;
    if (mode === 'bare') {
      await channel.prefetch(BATCH);
      const { consumerTag } = await channel.consume(queue, (msg) => {
        if (!msg) return;
        handled++;
        channel.ack(msg);
      });
      stop = () => channel.cancel(consumerTag);
    } else {
      const running = await consumeAmqp({
        channel,
        queue,
        store: counted!.store,
        ttlMs: 60_000,
        prefetch: BATCH,
        hooks: { processed: () => void handled++ },
        handler: () => undefined,
      });
      stop = () => running.stop();
    }
    while (handled < MESSAGES) await sleep(2);
    const rate = MESSAGES / ((performance.now() - started) / 1000);
    await stop();
    await publisher.deleteQueue(queue);
    return { rate, calls: counted?.calls };
  } finally {
    await connection.close();
  }
}

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
};

async function main(): Promise<void> {
  const modes: Mode[] = ['bare', 'oncely+memory', 'oncely+redis'];
  const brokers = { 'Redis Streams': redisStreams, RabbitMQ: rabbit } as const;
  const rates = new Map<string, number[]>();
  const calls = new Map<string, Record<string, number>>();
  console.log(`consumer benchmark: ${MESSAGES} messages × ${ROUNDS} rounds, batch/prefetch ${BATCH}, ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}`);
  for (let round = 0; round < ROUNDS; round++) {
    for (const [broker, run] of Object.entries(brokers)) {
      const order = modes.map((_, i) => modes[(i + round) % modes.length]!);
      for (const mode of order) {
        const result = await run(mode);
        const key = `${broker}|${mode}`;
        rates.set(key, [...(rates.get(key) ?? []), result.rate]);
        if (result.calls) calls.set(key, result.calls);
        process.stderr.write(`  round ${round + 1} ${broker} ${mode}: ${Math.round(result.rate)} msg/s\n`);
      }
    }
  }
  console.log('');
  console.log('| broker | consumer | msg/s (median) | ratio to bare | store calls per message |');
  console.log('|---|---|---:|---:|---|');
  for (const broker of Object.keys(brokers)) {
    const bare = median(rates.get(`${broker}|bare`)!);
    for (const mode of modes) {
      const key = `${broker}|${mode}`;
      const rate = median(rates.get(key)!);
      const c = calls.get(key);
      const perMessage = c
        ? `${(Object.values(c).reduce((a, b) => a + b, 0) / MESSAGES).toFixed(2)} (${Object.entries(c)
            .map(([op, n]) => `${op} ${(n / MESSAGES).toFixed(3)}`)
            .join(', ')})`
        : '—';
      console.log(`| ${broker} | ${mode} | ${Math.round(rate)} | ${(rate / bare).toFixed(2)} | ${perMessage} |`);
    }
  }
  admin.disconnect();
  storeClient.disconnect();
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
