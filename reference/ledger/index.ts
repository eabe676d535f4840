/**
 * The reference system's ledger: payment events go from the payment's own
 * transaction (a transactional outbox in the business database) through a
 * transport to a consumer that applies each event once (a transactional
 * inbox in the same database), whatever the number of copies and their
 * transport ids.
 *
 * Transports (`brokerUrl`):
 * - none: the outbox rows are relayed to the in-process consumer directly;
 * - `amqp://…`: RabbitMQ, durable queue `payments.events`, AMQP `messageId` = event id;
 * - `nats://…`: JetStream stream `PAYMENTS`, subject `payments.events`, `Nats-Msg-Id` = event id;
 * - `redis://…`: stream `payments.events`, consumer group `ledger`, fields `id` and `event`.
 *
 * The event format and where to publish are in docs/events.md.
 *
 * @example
 * ```ts
 * import { createLedger } from './ledger/index.js';
 * const ledger = createLedger({ db, brokerUrl: process.env.BROKER_URL });
 * await ledger.start();
 * await db.transaction(async (tx) => { await insertPayment(tx); await ledger.recordInOutbox(tx, event); });
 * await ledger.view('acct_1'); // { data: [...], balance: { EUR: 1200 } }
 * ```
 * @module
 */
import { IdempotentConsumer, shouldAcknowledge } from 'oncely/consumer';
import { memoryStore } from 'oncely/stores/memory';
import type { BusinessDb, Sql } from '../db.js';

/**
 * A payment event, as published (JSON) and as recorded in the outbox.
 *
 * @example
 * ```ts
 * const event: PaymentEvent = { id: 'evt_pay_1', type: 'payment.succeeded', account: 'acct_1', payment: 'pay_1', amount: 500, currency: 'EUR' };
 * ```
 */
export interface PaymentEvent {
  id: string;
  type: 'payment.succeeded';
  account: string;
  payment: string;
  amount: number;
  currency: string;
}

/**
 * The ledger of the reference system.
 *
 * @example
 * ```ts
 * const ledger: Ledger = createLedger({ db });
 * await ledger.start();
 * ```
 */
export interface Ledger {
  /** Write the event to the outbox table through `tx`, the payment's own transaction. */
  recordInOutbox(tx: Sql, event: PaymentEvent): Promise<void>;
  /** Relay outbox → transport, start the consumer. */
  start(): Promise<void>;
  /** Stop relaying and consuming; close the broker connections. Never closes `db`. */
  stop(): Promise<void>;
  /** What the ledger recorded for one account, and its balance per currency. */
  view(account: string): Promise<{
    data: Array<{ event: string; payment: string; amount: number; currency: string }>;
    balance: Record<string, number>;
  }>;
}

/**
 * Options of {@link createLedger}.
 *
 * @example
 * ```ts
 * const options: LedgerOptions = { db, brokerUrl: 'redis://127.0.0.1:6379', name: 'ledger' };
 * ```
 */
export interface LedgerOptions {
  /** The business database: the outbox, the inbox and the entries live there (its migrations create them). */
  db: BusinessDb;
  /** `amqp://…`, `nats://…` or `redis://…`; none: in-process relay. */
  brokerUrl?: string;
  /** Consumer name: inbox consumer, NATS durable, Redis consumer group. Default `ledger`. */
  name?: string;
  /** AMQP queue, NATS subject and Redis stream key. Default `payments.events` (tests use their own). */
  topic?: string;
  /** JetStream stream name. Default `PAYMENTS`. */
  natsStream?: string;
  /** How often the outbox is polled, ms. Default 100. */
  relayIntervalMs?: number;
}

/**
 * Default AMQP queue, NATS subject and Redis stream of payment events.
 *
 * @example
 * ```ts
 * await redis.xadd(PAYMENT_EVENTS, '*', 'id', event.id, 'event', JSON.stringify(event));
 * ```
 */
export const PAYMENT_EVENTS = 'payments.events';
/**
 * Default JetStream stream of payment events.
 *
 * @example
 * ```ts
 * await jsm.streams.info(PAYMENTS_STREAM);
 * ```
 */
export const PAYMENTS_STREAM = 'PAYMENTS';

/**
 * Parse and check an event; `undefined` when it is not a valid
 * `payment.succeeded` event.
 *
 * @example
 * ```ts
 * parsePaymentEvent('{"id":"evt_1","type":"payment.succeeded","account":"a","payment":"pay_1","amount":5,"currency":"EUR"}');
 * ```
 */
export function parsePaymentEvent(raw: string | Uint8Array): PaymentEvent | undefined {
  let value: unknown;
  try {
    value = JSON.parse(typeof raw === 'string' ? raw : Buffer.from(raw).toString('utf8'));
  } catch {
    return undefined;
  }
  const e = value as Partial<PaymentEvent> | null;
  if (e === null || typeof e !== 'object') return undefined;
  if (typeof e.id !== 'string' || e.id.length === 0 || e.id.length > 255) return undefined;
  if (e.type !== 'payment.succeeded') return undefined;
  if (typeof e.account !== 'string' || typeof e.payment !== 'string' || typeof e.currency !== 'string') return undefined;
  if (typeof e.amount !== 'number' || !Number.isSafeInteger(e.amount)) return undefined;
  return { id: e.id, type: e.type, account: e.account, payment: e.payment, amount: e.amount, currency: e.currency };
}

/** The JSON of an event, with its fields in the documented order. */
function serialise(event: PaymentEvent): string {
  const { id, type, account, payment, amount, currency } = event;
  return JSON.stringify({ id, type, account, payment, amount, currency });
}

interface OutboxRow {
  /** A number, or a string for PostgreSQL's BIGINT. */
  seq: number | string;
  event_id: string;
  payload: string;
}

/** A way to move outbox payloads to the consumer. */
interface Transport {
  /** Publish one event; resolves once the broker has it. */
  publish(eventId: string, payload: string): Promise<void>;
  /** Start delivering to `deliver` (its verdict decides ack / redelivery). */
  consume(deliver: Deliver): Promise<void>;
  close(): Promise<void>;
}

/** Apply one payload copy, keyed by its event id (or the transport id when it has none). */
type Deliver = (payload: string | Uint8Array, transportId: string) => Promise<{ eventId: string; ignored: boolean }>;

/**
 * Make the ledger over the business database. See the module documentation.
 *
 * @example
 * ```ts
 * const ledger = createLedger({ db, brokerUrl: 'nats://127.0.0.1:4222' });
 * await ledger.start();
 * ```
 */
export function createLedger(options: LedgerOptions): Ledger {
  const { db, brokerUrl } = options;
  const name = options.name ?? 'ledger';
  const topic = options.topic ?? PAYMENT_EVENTS;
  const natsStream = options.natsStream ?? PAYMENTS_STREAM;
  const relayIntervalMs = options.relayIntervalMs ?? 100;
  const t = db.tables;
  const insertOutbox = `INSERT INTO ${t.ledgerOutbox} (event_id, payload, created_at) VALUES (?, ?, ?)`;
  const unpublished = `SELECT seq, event_id, payload FROM ${t.ledgerOutbox} WHERE published_at IS NULL ORDER BY seq LIMIT 100`;
  const markPublished = `UPDATE ${t.ledgerOutbox} SET published_at = ? WHERE seq = ?`;
  const insertEntry = `INSERT INTO ${t.ledgerEntries} (event_id, consumer, type, account, payment, amount, currency, recorded_at)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)`;
  const entriesOf = `SELECT type, payment, amount, currency FROM ${t.ledgerEntries} WHERE consumer = ? AND account = ? ORDER BY seq`;

  /** The consumer side: the event id is the key, whatever the transport's own id. */
  const deliver: Deliver = async (payload, transportId) => {
    const event = parsePaymentEvent(payload);
    if (!event) {
      // A poison message must not block the queue: reported and acknowledged.
      console.error(`[ledger] ignored an invalid payment event (transport id ${transportId})`);
      return { eventId: transportId, ignored: true };
    }
    // The transactional inbox: the entry and the processed event id commit together.
    await db.applyOnce(name, event.id, insertEntry, [
      event.id,
      name,
      event.type,
      event.account,
      event.payment,
      event.amount,
      event.currency,
      Date.now(),
    ]);
    return { eventId: event.id, ignored: false };
  };

  let transport: Transport | undefined;
  let timer: NodeJS.Timeout | undefined;
  let relaying: Promise<void> | undefined;
  let started = false;
  let stopped = false;

  // The in-process path: the same idempotent consumer core the brokers use.
  const local = new IdempotentConsumer<OutboxRow>({
    name: `${name}-local`,
    store: memoryStore(),
    handler: async ({ message }) => {
      await deliver(message.payload, String(message.seq));
    },
  });

  const relayOnce = async (): Promise<void> => {
    while (!stopped) {
      const rows = await db.all<OutboxRow>(unpublished);
      if (rows.length === 0) return;
      for (const row of rows) {
        if (stopped) return;
        if (transport) await transport.publish(row.event_id, row.payload);
        else {
          const verdict = await local.handle(row, parsePaymentEvent(row.payload)?.id ?? `outbox:${row.seq}`);
          if (!shouldAcknowledge(verdict)) return; // retried on the next tick
        }
        // Published (or applied) before it is marked: a crash in between only re-sends a copy the inbox recognises.
        await db.run(markPublished, [Date.now(), row.seq]);
      }
    }
  };
  const kick = (): void => {
    if (!started || stopped || relaying) return;
    relaying = relayOnce()
      .catch((error: unknown) => console.error('[ledger] relay failed; retrying:', error instanceof Error ? error.message : error))
      .finally(() => {
        relaying = undefined;
      });
  };

  return {
    async recordInOutbox(tx, event) {
      const checked = parsePaymentEvent(serialise(event));
      if (!checked) throw new TypeError(`not a valid payment event: ${JSON.stringify(event)}`);
      await tx.run(insertOutbox, [checked.id, serialise(checked), Date.now()]);
      // Relayed by the next poll, once the caller's transaction has committed.
    },
    async start() {
      if (started) return;
      if (brokerUrl) {
        transport = await openTransport(brokerUrl, { name, topic, natsStream });
        await transport.consume(deliver);
      }
      started = true;
      timer = setInterval(kick, relayIntervalMs);
      timer.unref();
      kick();
    },
    async stop() {
      stopped = true;
      clearInterval(timer);
      await relaying;
      await transport?.close();
      transport = undefined;
    },
    async view(account) {
      const rows = await db.all<{ type: string; payment: string; amount: number | string; currency: string }>(entriesOf, [name, account]);
      const data = rows.map((row) => ({ event: row.type, payment: row.payment, amount: Number(row.amount), currency: row.currency }));
      const balance: Record<string, number> = {};
      for (const entry of data) balance[entry.currency] = (balance[entry.currency] ?? 0) + entry.amount;
      return { data, balance };
    },
  };
}

interface TransportNames {
  name: string;
  topic: string;
  natsStream: string;
}

async function openTransport(url: string, names: TransportNames): Promise<Transport> {
  const scheme = url.slice(0, url.indexOf(':')).toLowerCase();
  if (scheme === 'amqp' || scheme === 'amqps') return amqpTransport(url, names);
  if (scheme === 'nats' || scheme === 'tls') return natsTransport(url, names);
  if (scheme === 'redis' || scheme === 'rediss') return redisTransport(url, names);
  throw new Error(`The ledger's broker URL must start with amqp://, nats:// or redis:// (got ${url}).`);
}

const consumerStore = () => memoryStore();

async function amqpTransport(url: string, { name, topic }: TransportNames): Promise<Transport> {
  const amqp = await import('amqplib');
  const { consumeAmqp } = await import('oncely/consumer/amqp');
  const connection = await amqp.connect(url);
  const publisher = await connection.createConfirmChannel();
  await publisher.assertQueue(topic, { durable: true });
  let running: Awaited<ReturnType<typeof consumeAmqp>> | undefined;
  return {
    async publish(eventId, payload) {
      publisher.sendToQueue(topic, Buffer.from(payload), {
        messageId: eventId,
        persistent: true,
        contentType: 'application/json',
        type: 'payment.succeeded',
      });
      await publisher.waitForConfirms();
    },
    async consume(deliver) {
      const channel = await connection.createChannel();
      running = await consumeAmqp({
        channel,
        queue: topic,
        name,
        store: consumerStore(),
        messageId: (message) => parsePaymentEvent(message.content)?.id ?? (message.properties.messageId as string | undefined),
        handler: async ({ message, id }) => {
          await deliver(message.content, id);
        },
      });
    },
    async close() {
      await running?.stop();
      await connection.close().catch(() => undefined);
    },
  };
}

async function natsTransport(url: string, { name, topic, natsStream }: TransportNames): Promise<Transport> {
  const { connect } = await import('@nats-io/transport-node');
  const { AckPolicy, jetstream, jetstreamManager } = await import('@nats-io/jetstream');
  const { consumeNats } = await import('oncely/consumer/nats');
  const parsed = new URL(url);
  const nc = await connect({
    servers: `${parsed.hostname}:${parsed.port || '4222'}`,
    ...(parsed.username ? { user: decodeURIComponent(parsed.username), pass: decodeURIComponent(parsed.password) } : {}),
  });
  const jsm = await jetstreamManager(nc);
  try {
    await jsm.streams.info(natsStream);
  } catch {
    await jsm.streams.add({ name: natsStream, subjects: [topic] });
  }
  const js = jetstream(nc);
  let running: { stop(): Promise<void> } | undefined;
  return {
    async publish(eventId, payload) {
      await js.publish(topic, payload, { msgID: eventId });
    },
    async consume(deliver) {
      try {
        await jsm.consumers.info(natsStream, name);
      } catch {
        await jsm.consumers.add(natsStream, { durable_name: name, ack_policy: AckPolicy.Explicit, filter_subject: topic });
      }
      const messages = await (await js.consumers.get(natsStream, name)).consume();
      running = consumeNats({
        messages,
        name,
        store: consumerStore(),
        messageId: (message) => parsePaymentEvent(message.data)?.id ?? message.headers?.get('Nats-Msg-Id') ?? `${message.info.stream}:${message.seq}`,
        handler: async ({ message, id }) => {
          await deliver(message.data, id);
        },
      });
    },
    async close() {
      await running?.stop();
      await nc.close();
    },
  };
}

async function redisTransport(url: string, { name, topic }: TransportNames): Promise<Transport> {
  const { Redis } = await import('ioredis');
  const { consumeRedisStream } = await import('oncely/consumer/redis-streams');
  const publisher = new Redis(url, { lazyConnect: true });
  await publisher.connect();
  let reader: InstanceType<typeof Redis> | undefined;
  let running: Awaited<ReturnType<typeof consumeRedisStream>> | undefined;
  return {
    async publish(eventId, payload) {
      await publisher.xadd(topic, '*', 'id', eventId, 'event', payload);
    },
    async consume(deliver) {
      reader = publisher.duplicate();
      running = await consumeRedisStream({
        client: reader,
        stream: topic,
        group: name,
        name,
        store: consumerStore(),
        blockMs: 500,
        minIdleMs: 10_000,
        messageId: (entry) => parsePaymentEvent(entry.fields.event ?? '')?.id ?? entry.fields.id ?? entry.id,
        handler: async ({ message, id }) => {
          await deliver(message.fields.event ?? '', id);
        },
      });
    },
    async close() {
      await running?.stop();
      reader?.disconnect();
      publisher.disconnect();
    },
  };
}
