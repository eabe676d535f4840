/**
 * The FAULT hooks: the real `reference/main.ts` in a child process SIGKILLs
 * itself at a chosen point, is restarted without the fault on the same
 * databases, and the retry with the same key is checked against the
 * database itself.
 *
 * - Transactional mode (STORE_URL = DATABASE_URL on PostgreSQL and MySQL,
 *   `TRANSACTIONAL=on`), killed between the business write and the
 *   completion, with the table's UNIQUE(account, idempotency id) dropped
 *   first: nothing was committed, the retry runs again and charges once, and
 *   no row is ever without its completed record. The constraint is not what
 *   keeps it safe.
 * - Plain mode, for contrast (SQLite, and PostgreSQL with the store
 *   elsewhere): the payment is committed without its record, and the retry
 *   finds it by its idempotency record id.
 * - Orders' recovery points on SQLite, PostgreSQL and MySQL: killed after
 *   `reserve`, after `pay`: the retry resumes after the last completed step.
 *   After `pay` the restarted server's payment service (`PAYMENTS_URL`) is
 *   a recorder that refuses everything: the order still completes, on the
 *   payment made before the crash, and the recorder saw no call.
 *
 * Servers not running locally are skipped. Transactional cases are skipped
 * when the store has no transactional mode.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server as HttpServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { recordId } from 'oncely';
import { afterAll, describe, it } from 'vitest';
import { type BusinessDb, dropTables, openBusinessDb } from '../../reference/db.js';
import { openStore } from '../../reference/store-url.js';
import { exitOf, killAllServers, startServer, type Server } from '../support/reference-process.js';

const URLS = {
  postgres: process.env.REFERENCE_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test',
  mysql: process.env.REFERENCE_MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test',
} as const;
type Kind = 'sqlite' | keyof typeof URLS;

const cleanups: Array<() => Promise<void> | void> = [];
afterAll(async () => {
  killAllServers();
  for (const cleanup of cleanups.reverse()) await cleanup();
});

/** Whether a store at `url` is up and has transactional mode. */
async function probe(url: string): Promise<{ up: boolean; transactions: boolean }> {
  try {
    const opened = await openStore(url);
    const transactions = opened.store.transactions !== undefined;
    await opened.close();
    return { up: true, transactions };
  } catch {
    return { up: false, transactions: false };
  }
}
const probes = { postgres: await probe(URLS.postgres), mysql: await probe(URLS.mysql) };

interface Answer {
  status: number;
  replayed: boolean;
  text: string;
  json: () => Record<string, unknown>;
}

async function post(base: string, path: string, account: string, key: string, body: unknown): Promise<Answer> {
  const res = await fetch(base + path, {
    method: 'POST',
    headers: { authorization: `Bearer ${account}`, 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, replayed: res.headers.get('idempotent-replayed') === 'true', text, json: () => JSON.parse(text) as Record<string, unknown> };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Retry while the dead server's claim is still in flight (409): its session or lease ends within seconds. */
async function retry(base: string, path: string, account: string, key: string, body: unknown): Promise<Answer> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const answer = await post(base, path, account, key, body);
    if (answer.status !== 409 || Date.now() > deadline) return answer;
    await sleep(100);
  }
}

/** One scenario's databases: a temp dir (SQLite files) and, on a server, its own table prefix. */
interface Setup {
  kind: Kind;
  dir: string;
  db: BusinessDb;
  /** Environment of the child: DATABASE_URL and its prefix, STORE_URL. */
  env: Record<string, string>;
  /** The record's state in the store: 0 in progress, 1 completed, undefined absent. */
  recordState(id: string): Promise<number | undefined>;
}

/**
 * `store`: `same` puts the records in the business database (transactional
 * mode when the store has it), `file` in a SQLite file of their own.
 */
async function setUp(kind: Kind, store: 'same' | 'file'): Promise<Setup> {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-ref-fault-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const prefix = `f${randomBytes(4).toString('hex')}_`;
  const databaseUrl = kind === 'sqlite' ? `sqlite:${join(dir, 'reference.db')}` : URLS[kind];
  // Opened (and migrated) before the server starts: the test may change the tables first.
  const db = await openBusinessDb({ url: databaseUrl, prefix });
  cleanups.push(async () => {
    if (kind !== 'sqlite') await dropTables(db);
    await db.close();
  });
  const storeUrl = store === 'same' ? databaseUrl : `sqlite:${join(dir, 'oncely.db')}`;
  const recordState = async (id: string): Promise<number | undefined> => {
    if (store === 'same' && kind !== 'sqlite') {
      const row = await db.get<{ state: number | string }>('SELECT state FROM oncely_records WHERE id = ?', [id]);
      return row === undefined ? undefined : Number(row.state);
    }
    const file = new Database(join(dir, 'oncely.db'), { readonly: true, fileMustExist: true });
    try {
      const row = file.prepare('SELECT state FROM oncely_records WHERE id = ? AND expires_at > ?').get(id, Date.now()) as { state: number } | undefined;
      return row?.state;
    } finally {
      file.close();
    }
  };
  return { kind, dir, db, env: { DATABASE_URL: databaseUrl, DATABASE_TABLE_PREFIX: prefix, STORE_URL: storeUrl }, recordState };
}

/** Start a server with `FAULT`, send the request, and wait until the fault has killed it. */
async function crashOn(setup: Setup, fault: string, send: (server: Server) => Promise<unknown>, extra: Record<string, string> = {}) {
  const server = await startServer(setup.dir, { ...setup.env, ...extra, FAULT: fault });
  const sent = await send(server).catch((error: unknown) => error);
  const exit = await exitOf(server);
  return { sent, exit, output: server.output() };
}

const count = async (db: BusinessDb, table: string, account: string): Promise<number> =>
  Number((await db.get<{ n: number | string }>(`SELECT count(*) AS n FROM ${table} WHERE account = ?`, [account]))?.n);

/** Rows of `table` for `account` whose idempotency record is not completed. */
async function withoutRecord(setup: Setup, table: string, account: string): Promise<string[]> {
  const rows = await setup.db.all<{ id: string; idempotency_id: string }>(`SELECT id, idempotency_id FROM ${table} WHERE account = ?`, [account]);
  const orphans: string[] = [];
  for (const row of rows) if ((await setup.recordState(row.idempotency_id)) !== 1) orphans.push(row.id);
  return orphans;
}

/** Drop the UNIQUE(account, idempotency id) of a table: the test shows it is not what keeps transactional mode safe. */
async function dropOnce(db: BusinessDb, table: string): Promise<void> {
  await db.run(db.dialect === 'mysql' ? `ALTER TABLE ${table} DROP INDEX ${table}_once` : `ALTER TABLE ${table} DROP CONSTRAINT ${table}_once`);
}

const PAY = { amount: 2500, currency: 'EUR', customer: 'cus_fault' };
const ORDER = { currency: 'EUR', items: [{ sku: 'book', quantity: 2, price: 1500 }] };
const fresh = (what: string) => `${what}-${randomBytes(6).toString('hex')}`;

describe.concurrent('transactional mode: SIGKILL between the business write and the completion', { timeout: 90_000 }, () => {
  for (const kind of ['postgres', 'mysql'] as const) {
    const { up, transactions } = probes[kind];

    it.skipIf(!up || !transactions)(`${kind}: a payment: nothing committed, the retry charges once, without the unique constraint`, async ({ expect }) => {
      const setup = await setUp(kind, 'same');
      const { payments } = setup.db.tables;
      await dropOnce(setup.db, payments);
      const account = fresh('acct');
      const key = fresh('k');
      const id = recordId(key, account);

      const crash = await crashOn(setup, 'after-business-write:payments', (s) => post(s.url, '/payments', account, key, PAY), { TRANSACTIONAL: 'on' });
      expect(crash.exit.signal).toBe('SIGKILL');
      expect(crash.sent).toBeInstanceOf(Error); // the connection died with the server
      expect(crash.output).toMatch(/transactional mode on/);
      expect(crash.output).toMatch(/FAULT=after-business-write:payments: SIGKILL in payments/);
      // The row was written in the store's transaction, which died uncommitted with its connection.
      expect(await count(setup.db, payments, account)).toBe(0);
      const events = `SELECT count(*) AS n FROM ${setup.db.tables.ledgerOutbox} WHERE payload LIKE ?`;
      expect(Number((await setup.db.get<{ n: number | string }>(events, [`%${account}%`]))?.n)).toBe(0); // the outbox event too
      expect(await setup.recordState(id)).toBe(0); // in progress, owned by the dead process

      const server = await startServer(setup.dir, { ...setup.env, TRANSACTIONAL: 'on' });
      const answer = await retry(server.url, '/payments', account, key, PAY);
      expect(answer.status, answer.text).toBe(201);
      expect(answer.replayed).toBe(false); // run again: there was nothing to find
      expect(answer.json()).toMatchObject({ amount: 2500, currency: 'EUR', customer: 'cus_fault' });
      expect(await count(setup.db, payments, account)).toBe(1);
      expect(await withoutRecord(setup, payments, account)).toEqual([]);
      const replay = await post(server.url, '/payments', account, key, PAY);
      expect(replay).toMatchObject({ status: 201, replayed: true, text: answer.text });
      expect(await count(setup.db, payments, account)).toBe(1);
    });

    it.skipIf(!up || !transactions)(`${kind}: an order: the order row rolled back, its payment kept, the retry records it once`, async ({ expect }) => {
      const setup = await setUp(kind, 'same');
      const { orders, payments, reservations } = setup.db.tables;
      await dropOnce(setup.db, orders);
      const account = fresh('acct');
      const key = fresh('o');

      const crash = await crashOn(setup, 'after-business-write:orders', (s) => post(s.url, '/orders', account, key, ORDER), { TRANSACTIONAL: 'on' });
      expect(crash.exit.signal).toBe('SIGKILL');
      expect(await count(setup.db, orders, account)).toBe(0);
      expect(await count(setup.db, payments, account)).toBe(1); // the pay step's own request completed
      expect(await setup.db.all(`SELECT status FROM ${reservations} WHERE account = ?`, [account])).toEqual([{ status: 'held' }]);

      const server = await startServer(setup.dir, { ...setup.env, TRANSACTIONAL: 'on' });
      const answer = await retry(server.url, '/orders', account, key, ORDER);
      expect(answer.status, answer.text).toBe(201);
      const paymentId = (await setup.db.get<{ id: string }>(`SELECT id FROM ${payments} WHERE account = ?`, [account]))!.id;
      expect(answer.json()).toMatchObject({ status: 'paid', total: 3000, payment: paymentId });
      expect(await count(setup.db, orders, account)).toBe(1);
      expect(await count(setup.db, payments, account)).toBe(1);
      expect(await setup.db.all(`SELECT status FROM ${reservations} WHERE account = ?`, [account])).toEqual([{ status: 'ordered' }]);
      expect(await withoutRecord(setup, orders, account)).toEqual([]);
      expect(await withoutRecord(setup, payments, account)).toEqual([]);
    });
  }
});

describe.concurrent('plain mode, for contrast: the same SIGKILL leaves a committed payment without its record', { timeout: 90_000 }, () => {
  for (const kind of ['sqlite', 'postgres'] as const) {
    it.skipIf(kind !== 'sqlite' && !probes[kind].up)(`${kind}, records in a SQLite file: the retry finds the payment by its idempotency record id`, async ({ expect }) => {
      const setup = await setUp(kind, 'file');
      const { payments } = setup.db.tables;
      const account = fresh('acct');
      const key = fresh('k');

      const crash = await crashOn(setup, 'after-business-write', (s) => post(s.url, '/payments', account, key, PAY));
      expect(crash.exit.signal).toBe('SIGKILL');
      expect(crash.output).toMatch(/transactional mode off/);
      // Committed, while its record is still in progress: what UNIQUE(account, idempotency id) is there for.
      expect(await count(setup.db, payments, account)).toBe(1);
      expect(await withoutRecord(setup, payments, account)).toHaveLength(1);
      const committed = await setup.db.get<{ id: string }>(`SELECT id FROM ${payments} WHERE account = ?`, [account]);

      const server = await startServer(setup.dir, setup.env);
      const answer = await retry(server.url, '/payments', account, key, PAY);
      expect(answer.status, answer.text).toBe(201);
      expect(answer.replayed).toBe(false);
      expect(answer.json().id).toBe(committed!.id); // found, not charged again
      expect(await count(setup.db, payments, account)).toBe(1);
      expect(await withoutRecord(setup, payments, account)).toEqual([]);
    });
  }
});

/** A payment service that refuses everything (400) and counts the calls. */
async function recorder(): Promise<{ url: string; calls: () => number }> {
  let calls = 0;
  const server: HttpServer = createServer((req, res) => {
    calls++;
    req.resume();
    res.writeHead(400, { 'content-type': 'application/json' }).end('{"detail":"this recorder refuses every payment"}');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, calls: () => calls };
}

describe.concurrent('recovery points: an order killed after each step resumes, and pays once', { timeout: 90_000 }, () => {
  for (const kind of ['sqlite', 'postgres', 'mysql'] as const) {
    const up = kind === 'sqlite' || probes[kind].up;

    it.skipIf(!up)(`${kind}: killed after reserve: the retry reuses the reservation, then pays and records`, async ({ expect }) => {
      const setup = await setUp(kind, 'same');
      const { orders, payments, reservations } = setup.db.tables;
      const account = fresh('acct');
      const key = fresh('o');

      const crash = await crashOn(setup, 'after-step:reserve', (s) => post(s.url, '/orders', account, key, ORDER));
      expect(crash.exit.signal).toBe('SIGKILL');
      const reserved = await setup.db.all<{ id: string }>(`SELECT id FROM ${reservations} WHERE account = ?`, [account]);
      expect(reserved).toHaveLength(1);
      expect(await count(setup.db, payments, account)).toBe(0);

      const server = await startServer(setup.dir, setup.env);
      const answer = await retry(server.url, '/orders', account, key, ORDER);
      expect(answer.status, answer.text).toBe(201);
      expect(await setup.db.all(`SELECT id, status, order_id FROM ${reservations} WHERE account = ?`, [account])).toEqual([
        { id: reserved[0]!.id, status: 'ordered', order_id: answer.json().id },
      ]);
      expect(await count(setup.db, payments, account)).toBe(1);
      expect(await count(setup.db, orders, account)).toBe(1);
    });

    it.skipIf(!up)(`${kind}: killed after pay: the retry records the order on the first payment, without calling the payment service`, async ({ expect }) => {
      const setup = await setUp(kind, 'same');
      const { orders, payments } = setup.db.tables;
      const account = fresh('acct');
      const key = fresh('o');

      const crash = await crashOn(setup, 'after-step:pay', (s) => post(s.url, '/orders', account, key, ORDER));
      expect(crash.exit.signal).toBe('SIGKILL');
      const paid = await setup.db.all<{ id: string; amount: number | string }>(`SELECT id, amount FROM ${payments} WHERE account = ?`, [account]);
      expect(paid.map((p) => Number(p.amount))).toEqual([3000]);
      expect(await count(setup.db, orders, account)).toBe(0);

      // Paying again would now fail (the recorder refuses, 502): only resuming after the stored pay step succeeds.
      const psp = await recorder();
      const server = await startServer(setup.dir, { ...setup.env, PAYMENTS_URL: psp.url });
      const answer = await retry(server.url, '/orders', account, key, ORDER);
      expect(answer.status, answer.text).toBe(201);
      expect(answer.json()).toMatchObject({ status: 'paid', total: 3000, payment: paid[0]!.id });
      expect(psp.calls()).toBe(0);
      expect(await count(setup.db, payments, account)).toBe(1);
      expect(await count(setup.db, orders, account)).toBe(1);
    });
  }
});
