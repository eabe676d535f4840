/**
 * The reference system in-process with its business data on PostgreSQL and
 * on MySQL/MariaDB (`DATABASE_URL`), each test on its own table prefix:
 *
 * - plain mode (STORE_URL elsewhere): payments, orders (reserve, pay,
 *   record), trades, users and the ledger, duplicates and concurrency;
 * - the same with STORE_URL on the same database: transactional mode when
 *   the store has transactions (the business rows then commit with the
 *   record's completion), plain mode with the reason said when it has not;
 * - after every test, from the database itself: no payment or order row
 *   without its completed record.
 *
 * A server that is not running is skipped.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type RunningReference, startReference } from '../../reference/app.js';
import { type BusinessDb, dropTables, openBusinessDb } from '../../reference/db.js';
import { openStore } from '../../reference/store-url.js';

const URLS = {
  postgres: process.env.REFERENCE_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test',
  mysql: process.env.REFERENCE_MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test',
} as const;

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** Whether the store at `url` is up, and whether it has transactional mode (yet). */
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

interface Answer {
  status: number;
  replayed: boolean;
  text: string;
  json: () => Record<string, unknown>;
}

async function call(base: string, method: string, path: string, account: string, key?: string, body?: unknown): Promise<Answer> {
  const headers: Record<string, string> = { authorization: `Bearer ${account}` };
  if (key !== undefined) headers['idempotency-key'] = key;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return {
    status: res.status,
    replayed: res.headers.get('idempotent-replayed') === 'true',
    text,
    json: () => JSON.parse(text) as Record<string, unknown>,
  };
}

const listOf = async (base: string, path: string, account: string) =>
  (await call(base, 'GET', path, account)).json().data as Array<Record<string, unknown>>;

/** A reference on its own tables; `db` reads them directly; `close` stops it and drops them. */
async function start(
  databaseUrl: string,
  storeUrl: string,
  extra: Parameters<typeof startReference>[0] = {},
): Promise<{ ref: RunningReference; db: BusinessDb; close(): Promise<void> }> {
  const tablePrefix = `r${randomBytes(4).toString('hex')}_`;
  const dataDir = mkdtempSync(join(tmpdir(), 'oncely-ref-db-'));
  dirs.push(dataDir);
  const ref = await startReference({ storeUrl, databaseUrl, tablePrefix, dataDir, port: 0, ...extra });
  const db = await openBusinessDb({ url: databaseUrl, prefix: tablePrefix });
  return {
    ref,
    db,
    async close() {
      await ref.close();
      await dropTables(db);
      await db.close();
    },
  };
}

/** Rows of `table` for `account` whose record is not completed in the store on the same database. */
async function orphans(db: BusinessDb, table: string, account: string): Promise<number> {
  const row = await db.get<{ n: number | string }>(
    `SELECT count(*) AS n FROM ${table} b LEFT JOIN oncely_records r ON r.id = b.idempotency_id AND r.state = 1
     WHERE b.account = ? AND r.id IS NULL`,
    [account],
  );
  return Number(row?.n);
}

const fresh = (what: string) => `${what}-${randomBytes(6).toString('hex')}`;

describe.each(Object.entries(URLS))('DATABASE_URL on %s', async (kind, databaseUrl) => {
  const { up, transactions } = await probe(databaseUrl);

  describe.each([
    ['STORE_URL elsewhere (memory:): plain mode', 'memory:', false],
    ['STORE_URL on the same database', databaseUrl, transactions],
  ] as const)('%s', (_name, storeUrl, transactional) => {
    it.skipIf(!up)('payments: pay, replay, 422, read back, the ledger; 30 concurrent copies make one payment', async () => {
      const { ref, db, close } = await start(databaseUrl, storeUrl, { paymentDelayMs: 150 });
      try {
        const health = (await (await fetch(`${ref.url}/healthz`)).json()) as Record<string, unknown>;
        expect(health).toMatchObject({ database: kind, transactional });
        expect(ref.transactional.on).toBe(transactional);
        if (storeUrl !== 'memory:' && !transactions) expect(ref.transactional.why).toMatch(/has no transactions/);

        const account = fresh('acct');
        const key = fresh('k');
        const body = { amount: 4200, currency: 'EUR', customer: 'cus_1', description: 'tea' };
        const first = await call(ref.url, 'POST', '/payments', account, key, body);
        expect(first.status, first.text).toBe(201);
        expect(first.json()).toMatchObject({ amount: 4200, currency: 'EUR', customer: 'cus_1', description: 'tea', status: 'succeeded' });
        const again = await call(ref.url, 'POST', '/payments', account, key, body);
        expect(again).toMatchObject({ status: 201, replayed: true, text: first.text });
        expect((await call(ref.url, 'POST', '/payments', account, key, { ...body, amount: 1 })).status).toBe(422);
        const id = first.json().id as string;
        expect((await call(ref.url, 'GET', `/payments/${id}`, account)).json()).toEqual(first.json());
        expect((await call(ref.url, 'GET', `/payments/${id}`, fresh('other'))).status).toBe(404);

        const dupKey = fresh('k');
        const answers = await Promise.all(Array.from({ length: 30 }, () => call(ref.url, 'POST', '/payments', account, dupKey, { amount: 7, currency: 'SEK' })));
        expect(answers.filter((a) => a.status !== 201 && a.status !== 409)).toEqual([]);
        expect(answers.filter((a) => a.status === 201 && !a.replayed)).toHaveLength(1);
        expect(await listOf(ref.url, '/payments', account)).toHaveLength(2);

        // The ledger: each payment once, relayed from the outbox written in the payment's transaction.
        const deadline = Date.now() + 5_000;
        let ledger: { data: unknown[]; balance: Record<string, number> } = { data: [], balance: {} };
        while (ledger.data.length < 2 && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 50));
          ledger = (await call(ref.url, 'GET', '/ledger', account)).json() as typeof ledger;
        }
        expect(ledger.balance).toEqual({ EUR: 4200, SEK: 7 });

        if (storeUrl !== 'memory:') expect(await orphans(db, db.tables.payments, account)).toBe(0);
      } finally {
        await close();
      }
    });

    it.skipIf(!up)('orders: reserve, pay (the step key), record; 20 concurrent copies make one order and one payment', async () => {
      const { ref, db, close } = await start(databaseUrl, storeUrl, { waitMs: 10_000 });
      try {
        const account = fresh('acct');
        const key = fresh('o');
        const body = { currency: 'EUR', items: [{ sku: 'tea', quantity: 2, price: 350 }, { sku: 'cup', quantity: 1, price: 1200 }] };
        const answers = await Promise.all(Array.from({ length: 20 }, () => call(ref.url, 'POST', '/orders', account, key, body)));
        expect(answers.filter((a) => a.status !== 201)).toEqual([]);
        expect(answers.filter((a) => !a.replayed)).toHaveLength(1);
        const order = answers[0]!.json();
        expect(order).toMatchObject({ status: 'paid', total: 1900, currency: 'EUR', items: body.items });
        expect(answers.every((a) => a.text === answers[0]!.text)).toBe(true);

        const payments = await listOf(ref.url, '/payments', account);
        expect(payments).toEqual([expect.objectContaining({ id: order.payment, amount: 1900 })]);
        expect(await listOf(ref.url, '/orders', account)).toEqual([order]);
        const reservations = await db.all<{ status: string; order_id: string; total: number | string }>(
          `SELECT status, order_id, total FROM ${db.tables.reservations} WHERE account = ?`,
          [account],
        );
        expect(reservations.map((r) => ({ ...r, total: Number(r.total) }))).toEqual([{ status: 'ordered', order_id: order.id, total: 1900 }]);
        if (storeUrl !== 'memory:') {
          expect(await orphans(db, db.tables.orders, account)).toBe(0);
          expect(await orphans(db, db.tables.payments, account)).toBe(0);
        }
      } finally {
        await close();
      }
    });

    it.skipIf(!up)('trades and users', async () => {
      const { ref, close } = await start(databaseUrl, storeUrl);
      try {
        const account = fresh('acct');
        const key = fresh('t');
        const trade = { symbol: 'ACME', side: 'buy', quantity: 9_000_000_000_000, price: 12.5 };
        const first = await call(ref.url, 'POST', '/execute-trade', account, key, trade);
        expect(first.status, first.text).toBe(201);
        expect(first.json()).toMatchObject({ ...trade, status: 'executed' });
        expect((await call(ref.url, 'POST', '/execute-trade', account, key, trade)).replayed).toBe(true);
        expect(await listOf(ref.url, '/trades', account)).toEqual([first.json()]);

        const user = { name: 'Ada', email: 'ada@example.com' };
        expect((await call(ref.url, 'PUT', '/users/u1', account, undefined, user)).status).toBe(201);
        expect((await call(ref.url, 'PUT', '/users/u1', account, undefined, user)).status).toBe(200);
        expect((await call(ref.url, 'GET', '/users/u1', account)).json()).toMatchObject(user);
        expect((await call(ref.url, 'GET', '/users/u1', fresh('other'))).status).toBe(404);
        expect((await call(ref.url, 'DELETE', '/users/u1', account)).status).toBe(204);
        expect((await call(ref.url, 'DELETE', '/users/u1', account)).status).toBe(404);
      } finally {
        await close();
      }
    });
  });

  it.skipIf(!up)('TRANSACTIONAL=on refuses to start when the store is elsewhere; off keeps plain mode on the same database', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'oncely-ref-db-'));
    dirs.push(dataDir);
    const options = { databaseUrl, tablePrefix: `r${randomBytes(4).toString('hex')}_`, dataDir, port: 0 };
    await expect(startReference({ ...options, storeUrl: 'memory:', transactional: 'on' })).rejects.toThrow(
      /TRANSACTIONAL=on, but transactional mode cannot apply: STORE_URL is another database/,
    );
    const { ref, close } = await start(databaseUrl, databaseUrl, { transactional: 'off' });
    try {
      expect(ref.transactional).toEqual({ on: false, why: 'TRANSACTIONAL=off' });
    } finally {
      await close();
    }
    const db = await openBusinessDb({ url: databaseUrl, prefix: options.tablePrefix });
    await dropTables(db);
    await db.close();
  });
});
