/**
 * `oncely/consumer/redis-streams`: idempotent Redis Streams consumer groups
 * over the user's own ioredis or node-redis client (typed structurally;
 * neither library is a dependency).
 *
 * - Message id: the entry id, or a field of the entry (`field`), or your own
 *   `messageId(entry)`. Use a field when producers may add one event twice.
 * - Loop: `XREADGROUP … >` in batches; every batch is claimed in one store
 *   round trip; handled and duplicate entries are `XACK`ed after completion.
 * - In flight elsewhere, failed, or store down: the entry stays pending; an
 *   `XAUTOCLAIM` (entries idle for `minIdleMs`) picks it up again later, also
 *   the entries of a consumer that crashed.
 * - While a handler runs, its entries are re-claimed by this consumer (`XCLAIM
 *   … JUSTID`, the stream's "still working" signal) so that no one else's
 *   `XAUTOCLAIM` takes them, and the store lease is renewed.
 *
 * Give the consumer its own connection (ioredis `client.duplicate()`): the
 * blocking `XREADGROUP` holds it up to `blockMs`. Replies are read in the
 * RESP2 shape (the default of both clients).
 *
 * @example
 * ```ts
 * import Redis from 'ioredis';
 * import { consumeRedisStream } from 'oncely/consumer/redis-streams';
 *
 * const running = await consumeRedisStream({
 *   client: new Redis(), stream: 'orders', group: 'shipping', store,
 *   handler: async ({ message }) => ship(message.fields),
 * });
 * // later: await running.stop();
 * ```
 * @module
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { type ConsumerOptions, IdempotentConsumer, pause, readMessageId, shouldAcknowledge } from './core.js';

/**
 * An ioredis client (`call` sends any command).
 *
 * @example
 * ```ts
 * import Redis from 'ioredis';
 * const client: IoredisCommandLike = new Redis();
 * ```
 */
export interface IoredisCommandLike {
  call(command: string, ...args: Array<string | number>): Promise<unknown>;
}

/**
 * A node-redis v4/v5 client (`sendCommand` sends any command).
 *
 * @example
 * ```ts
 * import { createClient } from 'redis';
 * const client: NodeRedisCommandLike = await createClient().connect();
 * ```
 */
export interface NodeRedisCommandLike {
  sendCommand(args: string[]): Promise<unknown>;
}

/**
 * Any client the adapter accepts.
 *
 * @example
 * ```ts
 * import { createClient } from 'redis';
 * const client: RedisCommandClient = await createClient().connect();
 * ```
 */
export type RedisCommandClient = IoredisCommandLike | NodeRedisCommandLike;

/**
 * One stream entry as the handler receives it.
 *
 * @example
 * ```ts
 * const handler = ({ message }: { message: RedisStreamEntry }) => ship(JSON.parse(message.fields.body ?? '{}'));
 * ```
 */
export interface RedisStreamEntry {
  /** The stream key. */
  stream: string;
  /** The entry id, e.g. `1700000000000-0`. */
  id: string;
  /** The entry's fields (the last value wins when a field repeats). */
  fields: Record<string, string>;
}

/**
 * Options of {@link consumeRedisStream}.
 *
 * @example
 * ```ts
 * const options: RedisStreamConsumerOptions = { client, stream: 'orders', group: 'shipping', field: 'id', store, handler };
 * ```
 */
export interface RedisStreamConsumerOptions extends Omit<ConsumerOptions<RedisStreamEntry>, 'name'> {
  /** A connected ioredis or node-redis client, used only by this consumer (never closed by it). */
  client: RedisCommandClient;
  /** Stream key. */
  stream: string;
  /** Consumer group; created (with `MKSTREAM`) when missing. */
  group: string;
  /** This process's consumer name in the group. Default `<host>-<pid>-<random>`. */
  consumer?: string;
  /** Name for record ids. Default: the group name. */
  name?: string;
  /** A field carrying the message id (instead of the entry id). */
  field?: string;
  /** Your own message id (wins over `field`). */
  messageId?: (entry: RedisStreamEntry) => string | undefined;
  /** Entries read (and claimed in the store) per round. Default 16. */
  count?: number;
  /** How long one `XREADGROUP` blocks, ms. Default 1 000 (also bounds how long `stop()` waits). */
  blockMs?: number;
  /** Pending entries idle this long are taken over by `XAUTOCLAIM`, ms. Default 30 000. Keep it above `workingIntervalMs`. */
  minIdleMs?: number;
  /** How often to look for idle pending entries, ms. Default `minIdleMs / 2`. */
  claimIntervalMs?: number;
  /** Where a new group starts: `'0'` (the whole stream, default) or `'$'` (new entries only). */
  startId?: string;
}

/**
 * A running Redis Streams consumer.
 *
 * @example
 * ```ts
 * const running: RedisStreamConsumer = await consumeRedisStream(options);
 * await running.stop();
 * ```
 */
export interface RedisStreamConsumer {
  /** The idempotent core (events, record ids). */
  readonly consumer: IdempotentConsumer<RedisStreamEntry>;
  /** This process's consumer name in the group. */
  readonly consumerName: string;
  /** Settles when the loop ends (after `stop()`); rejects if it failed for good. */
  readonly done: Promise<void>;
  /** Finish the current batch and stop (within `blockMs`). */
  stop(): Promise<void>;
}

/**
 * Send one command with either client.
 * @internal
 *
 * @example
 * ```ts
 * await redisCommand(client, ['XACK', 'orders', 'shipping', '1700000000000-0']);
 * ```
 */
export function redisCommand(client: RedisCommandClient, args: string[]): Promise<unknown> {
  if (typeof (client as IoredisCommandLike).call === 'function') {
    const [command, ...rest] = args;
    return (client as IoredisCommandLike).call(command!, ...rest);
  }
  return (client as NodeRedisCommandLike).sendCommand(args);
}

const text = (value: unknown): string => (typeof value === 'string' ? value : Buffer.isBuffer(value) ? value.toString('utf8') : String(value));

function parseEntries(stream: string, raw: unknown): RedisStreamEntry[] {
  if (!Array.isArray(raw)) return [];
  const entries: RedisStreamEntry[] = [];
  for (const item of raw) {
    // XAUTOCLAIM on Redis 6.2 answers nil for entries deleted meanwhile.
    if (!Array.isArray(item) || !Array.isArray(item[1])) continue;
    const flat = item[1] as unknown[];
    const fields: Record<string, string> = {};
    for (let i = 0; i + 1 < flat.length; i += 2) fields[text(flat[i])] = text(flat[i + 1]);
    entries.push({ stream, id: text(item[0]), fields });
  }
  return entries;
}

/**
 * Consume a stream through a consumer group, idempotently. See the module
 * documentation for the loop.
 *
 * @example
 * ```ts
 * const running = await consumeRedisStream({ client, stream: 'payments', group: 'ledger', field: 'id', store, handler });
 * ```
 */
export async function consumeRedisStream(options: RedisStreamConsumerOptions): Promise<RedisStreamConsumer> {
  const { client, stream, group, field, count = 16, blockMs = 1_000, minIdleMs = 30_000, startId = '0' } = options;
  const claimIntervalMs = options.claimIntervalMs ?? Math.max(10, Math.floor(minIdleMs / 2));
  const consumerName = options.consumer ?? `${hostname()}-${process.pid}-${randomBytes(4).toString('hex')}`;
  const consumer = new IdempotentConsumer<RedisStreamEntry>({
    workingIntervalMs: Math.max(10, Math.floor(minIdleMs / 3)),
    ...options,
    name: options.name ?? group,
  });
  const readId =
    options.messageId ?? ((entry: RedisStreamEntry) => (field === undefined ? entry.id : entry.fields[field]));
  const call = (...args: Array<string | number>): Promise<unknown> => redisCommand(client, args.map(String));

  try {
    await call('XGROUP', 'CREATE', stream, group, startId, 'MKSTREAM');
  } catch (error) {
    if (!/BUSYGROUP/.test(String((error as Error)?.message ?? error))) {
      // A consumer that never started must not stay subscribed to a shared engine.
      consumer.close();
      throw error;
    }
  }

  let running = true;
  let cursor = '0-0';
  let nextClaimAt = 0;

  const readBatch = async (): Promise<RedisStreamEntry[]> => {
    if (Date.now() >= nextClaimAt) {
      const reply = (await call('XAUTOCLAIM', stream, group, consumerName, minIdleMs, cursor, 'COUNT', count)) as unknown[];
      cursor = text(reply[0]);
      if (cursor === '0-0') nextClaimAt = Date.now() + claimIntervalMs;
      const claimed = parseEntries(stream, reply[1]);
      if (claimed.length > 0) return claimed;
    }
    const reply = await call('XREADGROUP', 'GROUP', group, consumerName, 'COUNT', count, 'BLOCK', blockMs, 'STREAMS', stream, '>');
    if (!Array.isArray(reply) || reply.length === 0) return [];
    return parseEntries(stream, (reply[0] as unknown[])[1]);
  };

  const handleBatch = async (entries: RedisStreamEntry[]): Promise<void> => {
    const items: Array<{ message: RedisStreamEntry; id: string }> = [];
    for (const entry of entries) {
      // An entry without an id stays pending (it will show in XPENDING); nothing can deduplicate it.
      const id = readMessageId(consumer, () => readId(entry));
      if (id !== undefined) items.push({ message: entry, id });
    }
    const idle = Math.max(1, Math.floor(minIdleMs / 6));
    const working = (): Promise<unknown> =>
      call('XCLAIM', stream, group, consumerName, idle, ...items.map((item) => item.message.id), 'JUSTID');
    const verdicts = await consumer.handleBatch(items, { working, overlapCompletion: true });
    const ack = verdicts.flatMap((verdict, i) => (shouldAcknowledge(verdict) ? [items[i]!.message.id] : []));
    if (ack.length > 0) {
      try {
        await call('XACK', stream, group, ...ack);
      } catch (error) {
        // Unacked entries are re-read later and recognised as duplicates.
        consumer.emit('brokerError', { id: undefined, operation: 'xack', error });
      }
    }
  };

  const loop = async (): Promise<void> => {
    let failures = 0;
    while (running) {
      let entries: RedisStreamEntry[];
      try {
        entries = await readBatch();
        failures = 0;
      } catch (error) {
        consumer.emit('brokerError', { id: undefined, operation: 'read', error });
        failures++;
        await pause(Math.min(100 * 2 ** failures, 5_000));
        continue;
      }
      if (entries.length > 0) await handleBatch(entries);
    }
  };
  const done = loop();

  return {
    consumer,
    consumerName,
    done,
    async stop() {
      running = false;
      await done;
      consumer.close();
    },
  };
}
