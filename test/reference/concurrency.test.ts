/**
 * 100 concurrent requests with one new key through the reference system,
 * on the memory store and on SQLite: the payment is made exactly once;
 * every other request gets the in-flight 409 or (with WAIT_MS) the replay;
 * none gets a 5xx.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type ReferenceOptions, startReference } from '../../reference/app.js';

const N = 100;
const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-ref-conc-'));
  dirs.push(dir);
  return dir;
}

interface Answer {
  status: number;
  replayed: boolean;
  text: string;
  problemType: string | undefined;
}

async function post(url: string, account: string, key: string, body: unknown): Promise<Answer> {
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${account}`, 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  const problemType = res.headers.get('content-type')?.startsWith('application/problem+json')
    ? ((JSON.parse(text) as { type?: string }).type ?? undefined)
    : undefined;
  return { status: res.status, replayed: res.headers.get('idempotent-replayed') === 'true', text, problemType };
}

async function list(url: string, path: string, account: string): Promise<unknown[]> {
  const res = await fetch(url + path, { headers: { authorization: `Bearer ${account}` } });
  expect(res.status).toBe(200);
  return ((await res.json()) as { data: unknown[] }).data;
}

const stores: Array<[string, () => string]> = [
  ['memory', () => 'memory:'],
  ['sqlite', () => `sqlite:${join(tempDir(), 'oncely.db')}`],
];

describe.each(stores)('100 concurrent duplicates on the %s store', (_kind, storeUrl) => {
  const start = (extra: ReferenceOptions) =>
    startReference({ storeUrl: storeUrl(), dataDir: tempDir(), port: 0, paymentDelayMs: 300, ...extra });

  it('one payment; every other answer is the in-flight 409 (or a replay if it came after); no 5xx', async () => {
    const ref = await start({});
    try {
      const account = `acct-${process.pid}-${Date.now()}`;
      const key = `conc-${Math.random().toString(36).slice(2)}`;
      const body = { amount: 500, currency: 'EUR' };
      const answers = await Promise.all(Array.from({ length: N }, () => post(`${ref.url}/payments`, account, key, body)));
      const executed = answers.filter((a) => a.status === 201 && !a.replayed);
      const replays = answers.filter((a) => a.status === 201 && a.replayed);
      const conflicts = answers.filter((a) => a.status === 409);
      expect(answers.filter((a) => a.status >= 500)).toEqual([]);
      expect(executed).toHaveLength(1);
      expect(conflicts.length + replays.length).toBe(N - 1);
      for (const c of conflicts) expect(c.problemType).toBe('https://oncely.dev/problems/in-flight');
      for (const r of replays) expect(r.text).toBe(executed[0]!.text);
      expect(conflicts.length).toBeGreaterThan(0);
      const payments = await list(ref.url, '/payments', account);
      expect(payments).toHaveLength(1);
      expect(payments[0]).toEqual(JSON.parse(executed[0]!.text));
    } finally {
      await ref.close();
    }
  });

  it('with WAIT_MS: one payment, the 99 others get its replay; no 5xx', async () => {
    const ref = await start({ waitMs: 10_000 });
    try {
      const account = `acct-${process.pid}-${Date.now()}`;
      const key = `conc-${Math.random().toString(36).slice(2)}`;
      const body = { amount: 700, currency: 'USD', description: 'waited' };
      const answers = await Promise.all(Array.from({ length: N }, () => post(`${ref.url}/payments`, account, key, body)));
      expect(answers.filter((a) => a.status !== 201)).toEqual([]);
      const executed = answers.filter((a) => !a.replayed);
      expect(executed).toHaveLength(1);
      for (const a of answers) expect(a.text).toBe(executed[0]!.text);
      expect(await list(ref.url, '/payments', account)).toHaveLength(1);
    } finally {
      await ref.close();
    }
  });

  it('with WAIT_MS: 100 concurrent copies of one order make one order and one payment', async () => {
    const ref = await start({ waitMs: 10_000 });
    try {
      const account = `acct-${process.pid}-${Date.now()}`;
      const key = `conc-order-${Math.random().toString(36).slice(2)}`;
      const body = { currency: 'EUR', items: [{ sku: 'tea', quantity: 3, price: 250 }] };
      const answers = await Promise.all(Array.from({ length: N }, () => post(`${ref.url}/orders`, account, key, body)));
      expect(answers.filter((a) => a.status !== 201)).toEqual([]);
      expect(answers.filter((a) => !a.replayed)).toHaveLength(1);
      const orders = (await list(ref.url, '/orders', account)) as Array<{ payment: string; total: number }>;
      const payments = (await list(ref.url, '/payments', account)) as Array<{ id: string; amount: number }>;
      expect(orders).toHaveLength(1);
      expect(payments).toHaveLength(1);
      expect(payments[0]!.id).toBe(orders[0]!.payment);
      expect(payments[0]!.amount).toBe(750);
    } finally {
      await ref.close();
    }
  });
});
