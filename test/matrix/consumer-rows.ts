/**
 * The rows of the consumer lifecycle matrix: the consumer core (`handle`,
 * `handleBatch`), every broker adapter against its real broker (RabbitMQ,
 * JetStream, Redis Streams; Kafka through KafkaJS-shaped payloads, as in
 * test/consumer/kafka.test.ts), and the transactional inboxes (PostgreSQL,
 * SQLite) run inside the core's handler as docs/consumers.md advises.
 *
 * A row only drives its consumer: the cell (consumers.matrix.test.ts)
 * decides the faults and checks what the broker was told. Each row reports
 * through its {@link Setup}: every handler run, every effect, every
 * acknowledgement (at the moment the broker is told), every verdict.
 */
import { AckPolicy, type JetStreamClient, type JetStreamManager, type JsMsg, jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect as connectNats, headers as natsHeaders, type NatsConnection, nanos } from '@nats-io/transport-node';
import amqp, { type Channel, type ChannelModel, type ConsumeMessage } from 'amqplib';
import Database from 'better-sqlite3';
import { Redis } from 'ioredis';
import type { IdempotencyStore } from 'oncely';
import { type ConsumerVerdict, IdempotentConsumer, shouldAcknowledge } from 'oncely/consumer';
import { type AmqpChannelLike, consumeAmqp } from 'oncely/consumer/amqp';
import { postgresInbox, sqliteInbox } from 'oncely/consumer/inbox';
import {
  type EachBatchPayloadLike,
  type EachMessagePayloadLike,
  type KafkaMessageLike,
  kafkaEachBatch,
  kafkaEachMessage,
} from 'oncely/consumer/kafka';
import { consumeNats, type JsMsgLike } from 'oncely/consumer/nats';
import { consumeRedisStream, type IoredisCommandLike } from 'oncely/consumer/redis-streams';
import { memoryStore } from 'oncely/stores/memory';
import { sqliteStore } from 'oncely/stores/sqlite';
import pg from 'pg';
import { sleep, suffix } from '../consumer/helpers.js';

/** What one handler run does, as the cell decides (only the target's first run misbehaves). */
export type Fault = 'none' | 'throw-before' | 'throw-after' | 'slow' | 'rollback';

/** The columns a row may skip (with the reason). */
export type ColumnKey = 'working' | 'rollback';

/** How long broker copies wait before coming back (nack / nak delays, Kafka pauses), ms. */
const RETRY_DELAY_MS = 50;
/** JetStream's ack wait on the row's consumer: shorter than a slow handler, so only working() keeps a delivery. */
const NATS_ACK_WAIT_MS = 200;
/** The "still working" interval of the rows that send one (Redis: a third of its idle time). */
const WORKING_INTERVAL_MS = 60;
/** Redis Streams: pending entries idle this long are taken by XAUTOCLAIM (the broker's own redelivery). */
const REDIS_MIN_IDLE_MS = 200;

/** What a row is given by its cell. */
export interface Setup {
  /** Unique per cell: the consumer name. */
  name: string;
  leaseMs: number;
  storeTimeoutMs: number;
  /** Put the row's real store behind the cell's fault link; answers the store to give oncely. */
  link(inner: IdempotencyStore): IdempotencyStore;
  /** A handler run starts: counts it, answers what this run must do. */
  run(id: string): Fault;
  /** A plain row's effect happened (the inbox rows' effects are rows in their database). */
  effect(id: string): void;
  /** The broker is being told that the message is done (ack, XACK, a resolved offset, eachMessage returned). */
  acked(id: string): void;
  /** A verdict of the core, as soon as it is known. */
  verdict(verdict: ConsumerVerdict): void;
  /** A call of `handle` or `handleBatch` ended; `error` when a batch was cut short (a heartbeat that throws). */
  ended(error?: unknown): void;
  /** The broker's "still working" signal fails right now. */
  workingFails(): boolean;
}

/** One row started for one cell. */
export interface RowRun {
  /** The store record id of a message id. */
  recordIdOf(id: string): string;
  /** The first delivery of the messages (one batch in the batch rows). */
  deliver(ids: readonly string[]): Promise<void>;
  /**
   * Deliver the messages not acknowledged yet again: calling the core or the
   * KafkaJS-shaped handler again (as KafkaJS fetches a record again). A no-op
   * for the real brokers, which redeliver by themselves.
   */
  redeliver(ids: readonly string[]): Promise<void>;
  /** Another copy of each message (a publisher's retry; a Kafka partition read again from the start). */
  copy(ids: readonly string[]): Promise<void>;
  /** Inbox rows: the effect rows and inbox rows of a message in its database, read now. */
  committed?(id: string): Promise<{ effects: number; inbox: number }>;
  /**
   * Stop consuming (waiting for running handlers), then answer how many of
   * the row's messages the broker still holds unacknowledged (undefined
   * without a broker), and drop what the row made.
   */
  close(): Promise<number | undefined>;
}

export interface Row {
  name: string;
  /** Several messages per delivery, claimed with one `claimMany`. */
  batch?: boolean;
  /** Stops at the first message not handled (Kafka partitions: `stopAtFirstBreak`). */
  ordered?: boolean;
  /** The effect commits in one transaction with an inbox row. */
  inbox?: boolean;
  /** When the "still working" signal fails, the broker hands the running message out again (and the copy is left in flight). */
  redeliversStalled?: boolean;
  /** The failing "still working" signal cuts the batch short (a Kafka rebalance). */
  interruptedByWorking?: boolean;
  /** Columns that cannot happen in this row, with the reason. */
  skip?: Partial<Record<ColumnKey, string>>;
  start(setup: Setup): Promise<RowRun>;
}

// ─── shared connections (one per file) ──────────────────────────────────────

interface Shared {
  amqp?: Promise<{ connection: ChannelModel; admin: Channel }>;
  nats?: Promise<{ nc: NatsConnection; jsm: JetStreamManager; js: JetStreamClient }>;
  redis?: Redis;
  pg?: Promise<{ pool: pg.Pool; effects: string; inbox: string; uniques: string }>;
}
const shared: Shared = {};

function amqpShared() {
  shared.amqp ??= (async () => {
    const connection = await amqp.connect('amqp://guest:guest@127.0.0.1:5672');
    return { connection, admin: await connection.createChannel() };
  })();
  return shared.amqp;
}

function natsShared() {
  shared.nats ??= (async () => {
    const nc = await connectNats({ servers: '127.0.0.1:4222' });
    return { nc, jsm: await jetstreamManager(nc), js: jetstream(nc) };
  })();
  return shared.nats;
}

function redisAdmin(): Redis {
  shared.redis ??= new Redis({ host: '127.0.0.1', port: 6379 });
  return shared.redis;
}

function pgShared() {
  shared.pg ??= (async () => {
    const s = suffix();
    const pool = new pg.Pool({ host: '127.0.0.1', user: 'postgres', database: 'test', max: 12 });
    const tables = { effects: `oncely_matrix_effects_${s}`, inbox: `oncely_matrix_records_${s}`, uniques: `oncely_matrix_uniques_${s}` };
    await pool.query(`CREATE TABLE ${tables.effects} (message_id text NOT NULL)`);
    await pool.query(`CREATE TABLE ${tables.uniques} (id text PRIMARY KEY); INSERT INTO ${tables.uniques} (id) VALUES ('taken')`);
    // The inbox's records: an oncely records table (and its sessions table) of the matrix's own.
    const migrating = postgresInbox({ pool, consumer: 'migrate', recordsTable: tables.inbox });
    await migrating.migrate();
    await migrating.close();
    return { pool, ...tables };
  })();
  return shared.pg;
}

/** Close the connections the rows opened (and drop the Postgres tables). */
export async function closeShared(): Promise<void> {
  if (shared.amqp) await (await shared.amqp).connection.close();
  if (shared.nats) await (await shared.nats).nc.close();
  shared.redis?.disconnect();
  if (shared.pg) {
    const { pool, effects, inbox, uniques } = await shared.pg;
    await pool.query(
      `DROP TABLE IF EXISTS ${effects}; DROP TABLE IF EXISTS ${inbox}; DROP TABLE IF EXISTS ${inbox}_sessions; DROP TABLE IF EXISTS ${uniques}`,
    );
    await pool.end();
  }
}

// ─── helpers ─────────────────────────────────────────────────────────────────

/** The handler of the plain rows: the effect is a counter in the cell. */
function plainHandler(setup: Setup) {
  return async ({ id }: { id: string }): Promise<void> => {
    const fault = setup.run(id);
    if (fault === 'throw-before') throw new Error('failed before the effect');
    if (fault === 'slow') await sleep(Math.round(setup.leaseMs * 0.8));
    setup.effect(id);
    if (fault === 'throw-after') throw new Error('failed after the effect');
  };
}

/** Report the core's verdicts to the cell, as soon as each is known (also inside a batch that ends in an error). */
function observe<M>(consumer: IdempotentConsumer<M>, setup: Setup): void {
  const handle = consumer.handle.bind(consumer);
  consumer.handle = async (message, id, options) => {
    const verdict = await handle(message, id, options);
    setup.verdict(verdict);
    setup.ended();
    return verdict;
  };
  const handleBatch = consumer.handleBatch.bind(consumer);
  consumer.handleBatch = async (items, options = {}) => {
    let verdicts: ConsumerVerdict[];
    try {
      verdicts = await handleBatch(items, {
        ...options,
        onVerdict: (verdict, index) => {
          setup.verdict(verdict);
          return options.onVerdict?.(verdict, index);
        },
      });
    } catch (error) {
      setup.ended(error);
      throw error;
    }
    setup.ended();
    return verdicts;
  };
}

const injected = (what: string) => new Error(`${what} (injected)`);

/** A broker's count, read until it is 0 or `timeoutMs` passed (acks travel asynchronously). */
async function drained(read: () => Promise<number>, timeoutMs = 1_000): Promise<number> {
  const until = Date.now() + timeoutMs;
  let left = await read();
  while (left > 0 && Date.now() < until) {
    await sleep(50);
    left = await read();
  }
  return left;
}

/** The consumer core driven directly: "acknowledged" is `shouldAcknowledge(verdict)`, a redelivery is another call. */
function coreRun(setup: Setup, consumer: IdempotentConsumer<{ id: string }>, batch: boolean, inner: IdempotencyStore): RowRun {
  observe(consumer, setup);
  const working = () => {
    if (setup.workingFails()) throw injected('working(): the broker connection is gone');
  };
  const one = async (id: string) => {
    const verdict = await consumer.handle({ id }, id, { working });
    if (shouldAcknowledge(verdict)) setup.acked(id);
  };
  const deliver = async (ids: readonly string[]) => {
    if (!batch) {
      await Promise.all(ids.map(one));
      return;
    }
    const items = ids.map((id) => ({ message: { id }, id }));
    const verdicts = await consumer.handleBatch(items, { working });
    verdicts.forEach((verdict, i) => {
      if (shouldAcknowledge(verdict)) setup.acked(items[i]!.id);
    });
  };
  return {
    recordIdOf: (id) => consumer.recordIdOf(id),
    deliver,
    redeliver: deliver,
    copy: deliver,
    async close() {
      consumer.close();
      await inner.close();
      return undefined;
    },
  };
}

// ─── rows ────────────────────────────────────────────────────────────────────

const coreHandle: Row = {
  name: 'core handle',
  async start(setup) {
    const inner = memoryStore();
    const consumer = new IdempotentConsumer<{ id: string }>({
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      handler: plainHandler(setup),
    });
    return coreRun(setup, consumer, false, inner);
  },
};

const coreBatch: Row = {
  name: 'core handleBatch',
  batch: true,
  async start(setup) {
    const inner = memoryStore();
    const consumer = new IdempotentConsumer<{ id: string }>({
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      handler: plainHandler(setup),
    });
    return coreRun(setup, consumer, true, inner);
  },
};

const amqpRow: Row = {
  name: 'amqp consumeAmqp',
  skip: { working: 'RabbitMQ has no "still working" signal: the adapter sends none (a delivery comes back only when its channel closes)' },
  async start(setup) {
    const { connection, admin } = await amqpShared();
    const queue = `oncely-matrix-${suffix()}`;
    await admin.assertQueue(queue, { durable: false });
    const channel = await connection.createChannel();
    // The real channel, seen through a wrapper that notes each ack as it is sent.
    const seen: AmqpChannelLike = {
      consume: (q, onMessage, options) => channel.consume(q, (m) => onMessage(m), options),
      ack: (message) => {
        setup.acked(String(message.properties.messageId));
        channel.ack(message as ConsumeMessage);
      },
      nack: (message, allUpTo, requeue) => channel.nack(message as ConsumeMessage, allUpTo, requeue),
      cancel: (tag) => channel.cancel(tag),
      prefetch: (count) => channel.prefetch(count),
    };
    const inner = memoryStore();
    const running = await consumeAmqp({
      channel: seen,
      queue,
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      retryDelayMs: RETRY_DELAY_MS,
      handler: plainHandler(setup),
    });
    observe(running.consumer, setup);
    const publish = async (ids: readonly string[]) => {
      for (const id of ids) admin.sendToQueue(queue, Buffer.from(id), { messageId: id });
    };
    return {
      recordIdOf: (id) => running.consumer.recordIdOf(id),
      deliver: publish,
      redeliver: async () => {},
      copy: publish,
      async close() {
        await running.stop();
        // Closing the channel requeues whatever it still held unacknowledged.
        await channel.close().catch(() => undefined);
        const left = await drained(async () => (await admin.checkQueue(queue)).messageCount);
        await admin.deleteQueue(queue).catch(() => undefined);
        await inner.close();
        return left;
      },
    };
  },
};

const natsRow: Row = {
  name: 'nats consumeNats',
  redeliversStalled: true,
  async start(setup) {
    const { jsm, js } = await natsShared();
    const s = suffix();
    const stream = `ONCELY_MATRIX_${s}`;
    const subject = `oncely.matrix.${s}`;
    await jsm.streams.add({ name: stream, subjects: [subject] });
    await jsm.consumers.add(stream, { durable_name: 'd', ack_policy: AckPolicy.Explicit, ack_wait: nanos(NATS_ACK_WAIT_MS) });
    const source = await (await js.consumers.get(stream, 'd')).consume({ max_messages: 16 });
    // Each JsMsg seen through a wrapper that notes its ack and can make working() throw.
    const wrap = (m: JsMsg): JsMsgLike => ({
      seq: m.seq,
      subject: m.subject,
      data: m.data,
      info: m.info,
      headers: m.headers,
      ack: () => {
        setup.acked(m.headers?.get('Event-Id') ?? '');
        m.ack();
      },
      nak: (millis) => m.nak(millis),
      working: () => {
        if (setup.workingFails()) throw injected('working(): the connection is closed');
        m.working();
      },
    });
    const messages = Object.assign(
      (async function* () {
        for await (const m of source) yield wrap(m);
      })(),
      { close: () => source.close() },
    );
    const inner = memoryStore();
    const running = consumeNats({
      messages,
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      header: 'Event-Id',
      retryDelayMs: RETRY_DELAY_MS,
      workingIntervalMs: WORKING_INTERVAL_MS,
      concurrency: 4,
      handler: plainHandler(setup),
    });
    observe(running.consumer, setup);
    // Copies carry the event id in their own header (a Nats-Msg-Id copy would be dropped by JetStream's duplicate window).
    const publish = async (ids: readonly string[]) => {
      for (const id of ids) {
        const h = natsHeaders();
        h.set('Event-Id', id);
        await js.publish(subject, id, { headers: h });
      }
    };
    return {
      recordIdOf: (id) => running.consumer.recordIdOf(id),
      deliver: publish,
      redeliver: async () => {},
      copy: publish,
      async close() {
        await running.stop();
        const left = await drained(async () => {
          const info = await jsm.consumers.info(stream, 'd');
          return info.num_pending + info.num_ack_pending;
        });
        await jsm.streams.delete(stream).catch(() => undefined);
        await inner.close();
        return left;
      },
    };
  },
};

const redisRow: Row = {
  name: 'redis-streams consumeRedisStream',
  batch: true,
  redeliversStalled: true,
  async start(setup) {
    const admin = redisAdmin();
    const stream = `oncely-test:matrix:${suffix()}`;
    const entries = new Map<string, string>();
    const inner = memoryStore();
    const store = setup.link(inner);
    const clients: Redis[] = [];
    const running: Array<Awaited<ReturnType<typeof consumeRedisStream>>> = [];
    // Two consumers of one group: the one that does not hold an entry takes it with XAUTOCLAIM once it idles.
    const startConsumer = async () => {
      const client = new Redis({ host: '127.0.0.1', port: 6379 });
      clients.push(client);
      const seen: IoredisCommandLike = {
        call: (command, ...args) => {
          if (command === 'XCLAIM' && setup.workingFails()) return Promise.reject(injected('XCLAIM: connection reset'));
          if (command === 'XACK') for (const entry of args.slice(2)) setup.acked(entries.get(String(entry)) ?? '');
          return client.call(command, ...args);
        },
      };
      const consumer = await consumeRedisStream({
        client: seen,
        stream,
        group: 'g',
        field: 'id',
        name: setup.name,
        store,
        leaseMs: setup.leaseMs,
        storeTimeoutMs: setup.storeTimeoutMs,
        blockMs: 50,
        minIdleMs: REDIS_MIN_IDLE_MS,
        claimIntervalMs: 50,
        handler: plainHandler(setup),
      });
      observe(consumer.consumer, setup);
      running.push(consumer);
    };
    let sequence = 0;
    const publish = async (ids: readonly string[]) => {
      for (const id of ids) {
        // Entry ids chosen here: a consumer may XACK an entry before XADD's own answer arrives.
        const entry = `0-${++sequence}`;
        entries.set(entry, id);
        await admin.xadd(stream, entry, 'id', id);
      }
    };
    return {
      recordIdOf: (id) => running[0]!.consumer.recordIdOf(id),
      async deliver(ids) {
        // Added before the consumers start, so that the first XREADGROUP reads them as one batch.
        await publish(ids);
        await Promise.all([startConsumer(), startConsumer()]);
      },
      redeliver: async () => {},
      copy: publish,
      async close() {
        await Promise.all(running.map((r) => r.stop()));
        for (const client of clients) client.disconnect();
        const left = await drained(async () => Number(((await admin.xpending(stream, 'g')) as [unknown])[0]));
        await admin.del(stream);
        await inner.close();
        return left;
      },
    };
  },
};

const rebalance = () => Object.assign(injected('The group is rebalancing, so a rejoin is needed'), { type: 'REBALANCE_IN_PROGRESS' });

function kafkaRecord(id: string, offset: number): KafkaMessageLike {
  return { offset: String(offset), key: null, value: Buffer.from(id), headers: { 'event-id': Buffer.from(id) } };
}

const kafkaEachMessageRow: Row = {
  name: 'kafka eachMessage',
  async start(setup) {
    const topic = `matrix-${suffix()}`;
    const inner = memoryStore();
    const eachMessage = kafkaEachMessage({
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      header: 'event-id',
      retryDelayMs: RETRY_DELAY_MS,
      workingIntervalMs: WORKING_INTERVAL_MS,
      handler: plainHandler(setup),
    });
    observe(eachMessage.consumer, setup);
    const offsets = new Map<string, number>();
    const payload = (id: string): EachMessagePayloadLike => ({
      topic,
      partition: 0,
      message: kafkaRecord(id, offsets.get(id)!),
      heartbeat: async () => {
        if (setup.workingFails()) throw rebalance();
      },
      pause: () => () => {},
    });
    // KafkaJS commits the offset once eachMessage returns; a throw has it fetch the record again.
    const attempt = async (id: string) => {
      try {
        await eachMessage(payload(id));
      } catch {
        return;
      }
      setup.acked(id);
    };
    const all = async (ids: readonly string[]) => {
      for (const id of ids) await attempt(id);
    };
    return {
      recordIdOf: (id) => eachMessage.consumer.recordIdOf(id),
      async deliver(ids) {
        for (const [i, id] of ids.entries()) offsets.set(id, i);
        await all(ids);
      },
      redeliver: all,
      // The same offset fetched again (a commit lost in a rebalance).
      copy: all,
      async close() {
        eachMessage.consumer.close();
        await inner.close();
        return undefined;
      },
    };
  },
};

const kafkaEachBatchRow: Row = {
  name: 'kafka eachBatch',
  batch: true,
  ordered: true,
  interruptedByWorking: true,
  async start(setup) {
    const topic = `matrix-${suffix()}`;
    const inner = memoryStore();
    const eachBatch = kafkaEachBatch({
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      header: 'event-id',
      retryDelayMs: RETRY_DELAY_MS,
      workingIntervalMs: WORKING_INTERVAL_MS,
      handler: plainHandler(setup),
    });
    observe(eachBatch.consumer, setup);
    let records: KafkaMessageLike[] = [];
    let resolved = -1;
    let heartbeats = 0;
    // The partition as the KafkaJS runner serves it: fetched from the first unresolved offset.
    const payload = (from: number): EachBatchPayloadLike => ({
      batch: { topic, partition: 0, messages: records.filter((m) => Number(m.offset) > from) },
      resolveOffset: (offset) => {
        resolved = Math.max(resolved, Number(offset));
        setup.acked(records[Number(offset)]!.value!.toString());
      },
      heartbeat: async () => {
        // A rebalance: the first heartbeat of the batch goes through, every later one throws.
        if (setup.workingFails() && ++heartbeats > 1) throw rebalance();
      },
      commitOffsetsIfNecessary: async () => {},
      isRunning: () => true,
      isStale: () => false,
      pause: () => () => {},
    });
    const fetch = async (from: number) => {
      // A throw (failure, rebalance) makes KafkaJS fetch again from the committed offset.
      await eachBatch(payload(from)).catch(() => undefined);
    };
    return {
      recordIdOf: (id) => eachBatch.consumer.recordIdOf(id),
      async deliver(ids) {
        records = ids.map((id, i) => kafkaRecord(id, i));
        await fetch(resolved);
      },
      redeliver: () => fetch(resolved),
      // The whole partition read again from its start (a rebalance onto a member with an older commit).
      copy: () => fetch(-1),
      async close() {
        eachBatch.consumer.close();
        await inner.close();
        // What KafkaJS would fetch again: the records after the last resolved offset.
        return records.length - 1 - resolved;
      },
    };
  },
};

const inboxSkip = {
  working: 'the inbox rows run in the core handler without a broker: there is no "still working" signal of their own (see the core rows)',
};

const postgresInboxRow: Row = {
  name: 'postgres inbox (in the core handler)',
  inbox: true,
  skip: inboxSkip,
  async start(setup) {
    const { pool, effects, inbox: table, uniques } = await pgShared();
    const inbox = postgresInbox({ pool, consumer: setup.name, recordsTable: table });
    const inner = memoryStore();
    const consumer = new IdempotentConsumer<{ id: string }>({
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      handler: async ({ id }) => {
        const fault = setup.run(id);
        await inbox.handle(id, async (client) => {
          if (fault === 'throw-before') throw new Error('failed before the effect');
          // Slow inside the transaction: it stays open while the lease is renewed.
          if (fault === 'slow') await sleep(Math.round(setup.leaseMs * 0.8));
          await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, [id]);
          if (fault === 'rollback') {
            // "Ignore a unique violation": in PostgreSQL the failed INSERT has aborted the transaction anyway.
            try {
              await client.query(`INSERT INTO ${uniques} (id) VALUES ('taken')`);
            } catch (error) {
              if ((error as { code?: string }).code !== '23505') throw error;
            }
          }
          if (fault === 'throw-after') throw new Error('failed after the effect');
        });
      },
    });
    const run = coreRun(setup, consumer, false, inner);
    const count = async (sql: string, values: unknown[]) => Number((await pool.query(sql, values)).rows[0].n);
    return {
      ...run,
      async committed(id) {
        const [e, record] = await Promise.all([
          count(`SELECT count(*) AS n FROM ${effects} WHERE message_id = $1`, [id]),
          inbox.store.get(inbox.consumer.recordIdOf(id)),
        ]);
        return { effects: e, inbox: record?.state === 'completed' ? 1 : 0 };
      },
      async close() {
        const left = await run.close();
        await inbox.close();
        return left;
      },
    };
  },
};

const sqliteInboxRow: Row = {
  name: 'sqlite inbox (in the core handler)',
  inbox: true,
  skip: inboxSkip,
  async start(setup) {
    // One database for the business tables, the inbox, and the consumer's own records (sqliteStore).
    const db = new Database(':memory:');
    db.exec(`CREATE TABLE effects (message_id TEXT NOT NULL); CREATE TABLE uniques (id TEXT PRIMARY KEY); INSERT INTO uniques (id) VALUES ('taken')`);
    // Another name than the consumer's: both keep their records in the same table of this database, and an
    // inbox of the consumer's own name would find the consumer's claim on the message (use
    // `context.transaction()` in the handler for that: the same mechanism without the nesting).
    const inbox = sqliteInbox({ database: db, consumer: `${setup.name}-inbox` });
    const inner = sqliteStore({ database: db });
    const consumer = new IdempotentConsumer<{ id: string }>({
      name: setup.name,
      store: setup.link(inner),
      leaseMs: setup.leaseMs,
      storeTimeoutMs: setup.storeTimeoutMs,
      handler: async ({ id }) => {
        const fault = setup.run(id);
        // The slow part comes before the transaction: an open one holds the file's write lock.
        if (fault === 'slow') await sleep(Math.round(setup.leaseMs * 0.8));
        await inbox.handle(id, (database) => {
          if (fault === 'throw-before') throw new Error('failed before the effect');
          database.prepare('INSERT INTO effects (message_id) VALUES (?)').run(id);
          if (fault === 'rollback') {
            // SQLite's equivalent of PostgreSQL's aborted transaction: a failed statement that rolls
            // back the whole transaction (OR ROLLBACK), caught by the handler. COMMIT then fails.
            try {
              database.prepare(`INSERT OR ROLLBACK INTO uniques (id) VALUES ('taken')`).run();
            } catch (error) {
              if ((error as { code?: string }).code !== 'SQLITE_CONSTRAINT_PRIMARYKEY') throw error;
            }
          }
          if (fault === 'throw-after') throw new Error('failed after the effect');
        });
      },
    });
    const run = coreRun(setup, consumer, false, inner);
    const count = (sql: string, ...values: unknown[]) => (db.prepare(sql).get(...values) as { n: number }).n;
    return {
      ...run,
      async committed(id) {
        return {
          effects: count('SELECT count(*) AS n FROM effects WHERE message_id = ?', id),
          inbox: (await inbox.store.get(inbox.consumer.recordIdOf(id)))?.state === 'completed' ? 1 : 0,
        };
      },
      async close() {
        const left = await run.close();
        await inbox.close();
        db.close();
        return left;
      },
    };
  },
};

/** Every row of the consumer matrix. */
export const ROWS: readonly Row[] = [
  coreHandle,
  coreBatch,
  amqpRow,
  natsRow,
  redisRow,
  kafkaEachMessageRow,
  kafkaEachBatchRow,
  postgresInboxRow,
  sqliteInboxRow,
];
