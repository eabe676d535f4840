/**
 * A consumer process for the multi-process tests: consumes one queue or
 * stream with the shared SQLite store, counts each handled message id in a
 * Redis hash (the effect), prints `ready`, `started <id>` and `done <id>`.
 */
import { connect as amqpConnect } from 'amqplib';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect as natsConnect } from '@nats-io/transport-node';
import Database from 'better-sqlite3';
import { Redis } from 'ioredis';
import { consumeAmqp } from 'oncely/consumer/amqp';
import { consumeNats } from 'oncely/consumer/nats';
import { consumeRedisStream } from 'oncely/consumer/redis-streams';
import { redisStore } from 'oncely/stores/redis';
import { sqliteStore } from 'oncely/stores/sqlite';
import type { ChildConfig } from './helpers.js';

const config = JSON.parse(process.argv[2]!) as ChildConfig;
// The shared store: a SQLite file (one machine) or Redis (server clock).
const store =
  config.store === 'redis'
    ? redisStore({ client: new Redis({ host: '127.0.0.1', port: 6379 }), prefix: config.dbPath })
    : sqliteStore({ database: new Database(config.dbPath) });
const redis = new Redis({ host: '127.0.0.1', port: 6379 });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const handler = async ({ id, takeover }: { id: string; takeover: boolean }) => {
  console.log(`started ${id}${takeover ? ' takeover' : ''}`);
  if (id === config.slowId) await sleep(config.slowMs ?? 60_000);
  if (config.workMs) await sleep(config.workMs);
  await redis.hincrby(config.effectsKey, id, 1);
  console.log(`done ${id}`);
};
const common = { name: config.name, store, leaseMs: config.leaseMs, handler };

if (config.broker === 'amqp') {
  const connection = await amqpConnect('amqp://guest:guest@127.0.0.1:5672');
  const channel = await connection.createChannel();
  await consumeAmqp({ ...common, channel, queue: config.target, retryDelayMs: 100, prefetch: 4 });
} else if (config.broker === 'nats') {
  const [stream, durable] = config.target.split('/') as [string, string];
  const nc = await natsConnect({ servers: '127.0.0.1:4222' });
  await jetstreamManager(nc); // fails fast when JetStream is off
  const consumer = await jetstream(nc).consumers.get(stream, durable);
  const messages = await consumer.consume({ max_messages: 8 });
  consumeNats({ ...common, messages, header: 'Event-Id', retryDelayMs: 100, workingIntervalMs: 300, concurrency: 4 });
} else {
  const client = new Redis({ host: '127.0.0.1', port: 6379 });
  await consumeRedisStream({
    ...common,
    client,
    stream: config.target,
    group: 'g',
    field: 'id',
    count: 4,
    blockMs: 200,
    minIdleMs: 500,
    claimIntervalMs: 100,
  });
}
console.log('ready');
