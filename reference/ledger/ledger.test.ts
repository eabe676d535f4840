/**
 * The ledger over each transport, with the real brokers: an event published
 * three times (sequentially, concurrently, and once with another transport
 * id) appears once; an event whose payment transaction rolls back never does.
 * The in-process outbox also on PostgreSQL and MySQL business databases
 * (their inboxes differ), each test on its own table prefix.
 */
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect as natsConnect } from '@nats-io/transport-node';
import amqp from 'amqplib';
import { Redis } from 'ioredis';
import { afterEach, describe, expect, it } from 'vitest';
import { type BusinessDb, dropTables, openBusinessDb } from '../db.js';
import { createLedger, type Ledger, type PaymentEvent } from './index.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function waitFor(check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (await check()) return;
    await sleep(25);
  }
  throw new Error('timed out');
}

type Publish = (payload: string, transportId: string) => Promise<void>;
interface Broker {
  url: string | undefined;
  /** Publish straight to the broker, as another program would. */
  open(names: { topic: string; natsStream: string; name: string }): Promise<{ publish: Publish; cleanup(): Promise<void> }>;
}

const brokers: Record<string, Broker> = {
  'in-process outbox': {
    url: undefined,
    async open() {
      return { publish: async () => {}, cleanup: async () => {} };
    },
  },
  amqp: {
    url: 'amqp://guest:guest@127.0.0.1:5672',
    async open({ topic }) {
      const connection = await amqp.connect('amqp://guest:guest@127.0.0.1:5672');
      const channel = await connection.createConfirmChannel();
      return {
        async publish(payload, transportId) {
          channel.sendToQueue(topic, Buffer.from(payload), { messageId: transportId, persistent: true });
          await channel.waitForConfirms();
        },
        async cleanup() {
          await channel.deleteQueue(topic);
          await connection.close();
        },
      };
    },
  },
  nats: {
    url: 'nats://127.0.0.1:4222',
    async open({ topic, natsStream }) {
      const nc = await natsConnect({ servers: '127.0.0.1:4222' });
      const js = jetstream(nc);
      return {
        async publish(payload, transportId) {
          await js.publish(topic, payload, { msgID: transportId });
        },
        async cleanup() {
          await (await jetstreamManager(nc)).streams.delete(natsStream);
          await nc.close();
        },
      };
    },
  },
  redis: {
    url: 'redis://127.0.0.1:6379',
    async open({ topic }) {
      const redis = new Redis({ host: '127.0.0.1', port: 6379 });
      return {
        async publish(payload, transportId) {
          await redis.xadd(topic, '*', 'id', transportId, 'event', payload);
        },
        async cleanup() {
          await redis.del(topic);
          redis.disconnect();
        },
      };
    },
  },
};

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

const event = (id: string, account: string, amount: number, currency = 'EUR'): PaymentEvent => ({
  id,
  type: 'payment.succeeded',
  account,
  payment: `pay_${id}`,
  amount,
  currency,
});

const POSTGRES_URL = process.env.REFERENCE_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const MYSQL_URL = process.env.REFERENCE_MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test';

/** The business database of one test: a SQLite file, or its own tables on a shared server. */
async function openDb(kind: 'sqlite' | 'postgres' | 'mysql', s: string): Promise<BusinessDb> {
  if (kind === 'sqlite') {
    const path = join(tmpdir(), `oncely-ledger-${s}.db`);
    const db = await openBusinessDb({ url: `sqlite:${path}` });
    cleanups.push(async () => {
      await db.close();
      for (const ext of ['', '-wal', '-shm']) rmSync(path + ext, { force: true });
    });
    return db;
  }
  const db = await openBusinessDb({ url: kind === 'postgres' ? POSTGRES_URL : MYSQL_URL, prefix: `l${s}_` });
  cleanups.push(async () => {
    await dropTables(db);
    await db.close();
  });
  return db;
}

const cases: Array<[string, 'sqlite' | 'postgres' | 'mysql', Broker]> = [
  ...Object.entries(brokers).map(([transport, broker]): [string, 'sqlite', Broker] => [`${transport} on sqlite`, 'sqlite', broker]),
  ['in-process outbox on postgres', 'postgres', brokers['in-process outbox']!],
  ['in-process outbox on mysql', 'mysql', brokers['in-process outbox']!],
];

describe('ledger', () => {
  for (const [name, kind, broker] of cases) {
    it(`${name}: each event appears once, however many copies arrive and with whatever transport id`, async () => {
      const s = randomBytes(4).toString('hex');
      const db = await openDb(kind, s);
      const names = { topic: `payments.events.test.${s}`, natsStream: `PAYMENTS_TEST_${s}`, name: `ledger_${s}` };
      const ledger: Ledger = createLedger({ db, brokerUrl: broker.url, relayIntervalMs: 20, ...names });
      await ledger.start();
      cleanups.push(() => ledger.stop());
      const direct = await broker.open(names);
      cleanups.push(() => direct.cleanup());

      const account = `acct_${s}`;
      // Through the outbox, recorded three times inside payment transactions.
      const a = event(`evt_a_${s}`, account, 1_000);
      for (let i = 0; i < 3; i++) await db.transaction((tx) => ledger.recordInOutbox(tx, a));
      // A payment transaction that rolls back: its event never leaves the outbox.
      await expect(
        db.transaction(async (tx) => {
          await ledger.recordInOutbox(tx, event(`evt_rolled_back_${s}`, account, 99_999));
          throw new Error('payment failed');
        }),
      ).rejects.toThrow('payment failed');
      if (broker.url) {
        // Published by another program: sequentially (once with another transport id)…
        const b = event(`evt_b_${s}`, account, 250);
        await direct.publish(JSON.stringify(b), b.id);
        await direct.publish(JSON.stringify(b), b.id);
        await direct.publish(JSON.stringify(b), `other-transport-id-${s}`);
        // …and concurrently.
        const c = event(`evt_c_${s}`, account, 40, 'USD');
        await Promise.all([1, 2, 3].map((n) => direct.publish(JSON.stringify(c), `copy-${n}-${s}`)));
      }
      const expected = broker.url ? 3 : 1;
      await waitFor(async () => (await ledger.view(account)).data.length >= expected);
      await sleep(800); // late copies would show up now
      const view = await ledger.view(account);
      expect(view.data.map((e) => e.payment).sort()).toEqual(
        (broker.url ? [`pay_evt_a_${s}`, `pay_evt_b_${s}`, `pay_evt_c_${s}`] : [`pay_evt_a_${s}`]).sort(),
      );
      expect(view.balance).toEqual(broker.url ? { EUR: 1_250, USD: 40 } : { EUR: 1_000 });
      expect(view.data[0]).toMatchObject({ event: 'payment.succeeded', amount: expect.any(Number), currency: expect.any(String) });
    });
  }

  it.each(['sqlite', 'postgres', 'mysql'] as const)(
    'the %s inbox applies an event id once when copies arrive at the same moment',
    async (kind) => {
      const s = randomBytes(4).toString('hex');
      const db = await openDb(kind, s);
      const insert = `INSERT INTO ${db.tables.ledgerEntries} (event_id, consumer, type, account, payment, amount, currency, recorded_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)`;
      const params = [`evt_${s}`, 'c', 'payment.succeeded', `acct_${s}`, `pay_${s}`, 5, 'EUR', Date.now()];
      const applied = await Promise.all(Array.from({ length: 10 }, () => db.applyOnce('c', `evt_${s}`, insert, params)));
      expect(applied.filter(Boolean)).toHaveLength(1);
      // A failing write leaves no processed id: the next copy runs.
      await expect(db.applyOnce('c', `evt2_${s}`, `INSERT INTO ${db.tables.ledgerEntries} (event_id) VALUES (?)`, ['x'])).rejects.toThrow();
      expect(await db.applyOnce('c', `evt2_${s}`, insert, [`evt2_${s}`, ...params.slice(1)])).toBe(true);
      const rows = await db.all(`SELECT event_id FROM ${db.tables.ledgerEntries} WHERE account = ?`, [`acct_${s}`]);
      expect(rows).toHaveLength(2);
    },
  );
});
