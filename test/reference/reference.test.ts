/**
 * The reference system end to end, in-process on a real port, against the
 * memory store and a temporary SQLite file: every endpoint, the DESIGN 4
 * table through the reference, bad input (a clear 4xx and nothing stored),
 * auth before idempotency, and scope.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type IdempotencyStore, recordId } from 'oncely';
import { memoryStore } from 'oncely/stores/memory';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type ReferenceOptions,
  type RunningReference,
  referenceOptionsFromEnv,
  startReference,
} from '../../reference/app.js';

const PROBLEM = /^application\/problem\+json/;
const BODY_LIMIT = 16 * 1024;
const dirs: string[] = [];

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-ref-'));
  dirs.push(dir);
  return dir;
}

afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

let seq = 0;
/** A fresh key (and a fresh account when asked), unique per run. */
const fresh = (prefix = 'k'): string => `${prefix}-${process.pid}-${Date.now().toString(36)}-${++seq}`;

interface Answer {
  status: number;
  headers: Headers;
  text: string;
  json: () => Record<string, unknown>;
}

async function call(
  base: string,
  method: string,
  path: string,
  options: { account?: string | null; key?: string; body?: unknown; rawBody?: string; headers?: Record<string, string> } = {},
): Promise<Answer> {
  const headers: Record<string, string> = { ...options.headers };
  if (options.account !== null) headers.authorization = `Bearer ${options.account ?? 'acct_default'}`;
  if (options.key !== undefined) headers['idempotency-key'] = options.key;
  let body: string | undefined;
  if (options.rawBody !== undefined) body = options.rawBody;
  else if (options.body !== undefined) body = JSON.stringify(options.body);
  if (body !== undefined) headers['content-type'] ??= 'application/json';
  const res = await fetch(base + path, { method, headers, body });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text, json: () => JSON.parse(text) as Record<string, unknown> };
}

/** A request through node:http, for what fetch refuses: raw latin1 header bytes, repeated fields. */
function raw(
  base: string,
  path: string,
  headers: http.OutgoingHttpHeaders,
  body: string,
): Promise<{ status: number; headers: http.IncomingHttpHeaders; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      base + path,
      { method: 'POST', headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString() }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

async function paymentCount(base: string, account: string): Promise<number> {
  const res = await call(base, 'GET', '/payments', { account });
  expect(res.status).toBe(200);
  return (res.json().data as unknown[]).length;
}

function expectProblem(res: { status: number; headers: Headers | http.IncomingHttpHeaders; text: string }, status: number): Record<string, unknown> {
  expect(res.status, res.text).toBe(status);
  const type = res.headers instanceof Headers ? res.headers.get('content-type') : res.headers['content-type'];
  expect(type).toMatch(PROBLEM);
  const body = JSON.parse(res.text) as Record<string, unknown>;
  expect(body.status).toBe(status);
  expect(typeof body.type).toBe('string');
  expect(typeof body.title).toBe('string');
  expect(typeof body.detail).toBe('string');
  return body;
}

const PAY = { amount: 4200, currency: 'EUR' };

const variants: Array<[string, () => string]> = [
  ['memory', () => 'memory:'],
  ['sqlite', () => `sqlite:${join(tempDir(), 'oncely.db')}`],
];

describe.each(variants)('reference system on the %s store', (kind, storeUrl) => {
  let ref: RunningReference;
  let slow: RunningReference;
  let url: string;
  let dataDir: string;
  let options: ReferenceOptions;

  beforeAll(async () => {
    dataDir = tempDir();
    options = { storeUrl: storeUrl(), dataDir, port: 0, bodyLimit: BODY_LIMIT };
    ref = await startReference(options);
    url = ref.url;
    slow = await startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0, paymentDelayMs: 600 });
  });
  afterAll(async () => {
    await ref?.close();
    await slow?.close();
  });

  it('answers GET /healthz without a token', async () => {
    const res = await call(url, 'GET', '/healthz', { account: null });
    expect(res.status).toBe(200);
    expect(res.json()).toEqual({ status: 'ok', store: kind, database: 'sqlite', transactional: false, idempotency: true });
  });

  it('creates a payment: 201, Location, the body; GET /payments/:id and GET /payments return it', async () => {
    const account = fresh('acct');
    const res = await call(url, 'POST', '/payments', {
      account,
      key: fresh(),
      body: { amount: 1999, currency: 'USD', customer: 'cus_1', description: 'socks' },
    });
    expect(res.status, res.text).toBe(201);
    const payment = res.json();
    expect(payment).toMatchObject({ amount: 1999, currency: 'USD', status: 'succeeded', customer: 'cus_1', description: 'socks' });
    expect(payment.id).toMatch(/^pay_[0-9a-f]{24}$/);
    expect(new Date(payment.created as string).toISOString()).toBe(payment.created);
    expect(res.headers.get('location')).toBe(`/payments/${payment.id}`);
    expect(res.headers.get('idempotent-replayed')).toBeNull();

    const one = await call(url, 'GET', `/payments/${payment.id}`, { account });
    expect(one.status).toBe(200);
    expect(one.json()).toEqual(payment);
    const all = await call(url, 'GET', '/payments', { account });
    expect(all.json()).toEqual({ data: [payment] });
  });

  it('replays a completed payment: same status, identical body, Idempotent-Replayed: true, no second payment', async () => {
    const account = fresh('acct');
    const key = fresh();
    const first = await call(url, 'POST', '/payments', { account, key, body: PAY });
    expect(first.status).toBe(201);
    for (let i = 0; i < 3; i++) {
      const again = await call(url, 'POST', '/payments', { account, key, body: PAY });
      expect(again.status).toBe(201);
      expect(again.text).toBe(first.text);
      expect(again.headers.get('idempotent-replayed')).toBe('true');
      expect(again.headers.get('location')).toBe(first.headers.get('location'));
      expect(again.headers.get('content-type')).toBe(first.headers.get('content-type'));
    }
    // Key order and whitespace do not change the fingerprint (canonical JSON).
    const reordered = await call(url, 'POST', '/payments', { account, key, rawBody: '{ "currency": "EUR",  "amount": 4200 }' });
    expect(reordered.status).toBe(201);
    expect(reordered.headers.get('idempotent-replayed')).toBe('true');
    expect(await paymentCount(url, account)).toBe(1);
  });

  it('refuses the same key with a different body: 422 problem, nothing changes', async () => {
    const account = fresh('acct');
    const key = fresh();
    const first = await call(url, 'POST', '/payments', { account, key, body: PAY });
    expect(first.status).toBe(201);
    const other = await call(url, 'POST', '/payments', { account, key, body: { ...PAY, amount: 4201 } });
    const body = expectProblem(other, 422);
    expect(body.type).toBe('https://oncely.dev/problems/key-reused');
    // The same key on another endpoint is another request too.
    const trade = await call(url, 'POST', '/execute-trade', {
      account,
      key,
      body: { symbol: 'ACME', side: 'buy', quantity: 1, price: 1 },
    });
    expectProblem(trade, 422);
    const again = await call(url, 'POST', '/payments', { account, key, body: PAY });
    expect(again.text).toBe(first.text);
    expect(await paymentCount(url, account)).toBe(1);
  });

  it('requires Idempotency-Key on POST: 400 "Idempotency-Key is missing", handler not run', async () => {
    const account = fresh('acct');
    for (const [path, body] of [
      ['/payments', PAY],
      ['/execute-trade', { symbol: 'ACME', side: 'sell', quantity: 1, price: 2.5 }],
      ['/orders', { currency: 'EUR', items: [{ sku: 'a', quantity: 1, price: 1 }] }],
    ] as const) {
      const res = await call(url, 'POST', path, { account, body });
      const problem = expectProblem(res, 400);
      expect(problem.title).toBe('Idempotency-Key is missing');
      expect(problem.type).toBe('https://oncely.dev/problems/key-missing');
    }
    expect(await paymentCount(url, account)).toBe(0);
  });

  describe('bad input: a clear 4xx problem, nothing stored, the key still usable', () => {
    it('an empty key', async () => {
      const account = fresh('acct');
      const res = await raw(url, '/payments', { authorization: `Bearer ${account}`, 'idempotency-key': '' }, JSON.stringify(PAY));
      const body = expectProblem(res, 400);
      expect(body.type).toBe('https://oncely.dev/problems/key-malformed');
      expect(body.detail).toMatch(/empty/);
      const quoted = await call(url, 'POST', '/payments', { account, key: '""', body: PAY });
      expectProblem(quoted, 400);
      expect(await paymentCount(url, account)).toBe(0);
    });

    it('a 256-character key (255 is accepted)', async () => {
      const account = fresh('acct');
      const long = await call(url, 'POST', '/payments', { account, key: 'a'.repeat(256), body: PAY });
      const body = expectProblem(long, 400);
      expect(body.type).toBe('https://oncely.dev/problems/key-malformed');
      expect(body.detail).toMatch(/256/);
      expect(await paymentCount(url, account)).toBe(0);
      const max = await call(url, 'POST', '/payments', { account, key: 'a'.repeat(255), body: PAY });
      expect(max.status).toBe(201);
      expect(await paymentCount(url, account)).toBe(1);
    });

    it('a non-ASCII key (raw bytes)', async () => {
      const account = fresh('acct');
      const key = `clé-${fresh()}`;
      const latin1 = Buffer.from(key, 'utf8').toString('latin1');
      const res = await raw(url, '/payments', { authorization: `Bearer ${account}`, 'idempotency-key': latin1 }, JSON.stringify(PAY));
      const body = expectProblem(res, 400);
      expect(body.type).toBe('https://oncely.dev/problems/key-malformed');
      expect(body.detail).toMatch(/ASCII/);
      const spaced = await call(url, 'POST', '/payments', { account, key: 'a b', body: PAY });
      expectProblem(spaced, 400);
      expect(await paymentCount(url, account)).toBe(0);
    });

    it('two Idempotency-Key headers, and a comma list', async () => {
      const account = fresh('acct');
      const a = fresh();
      const b = fresh();
      const res = await raw(url, '/payments', { authorization: `Bearer ${account}`, 'idempotency-key': [a, b] }, JSON.stringify(PAY));
      const body = expectProblem(res, 400);
      expect(body.type).toBe('https://oncely.dev/problems/key-malformed');
      const list = await call(url, 'POST', '/payments', { account, key: `${a}, ${b}`, body: PAY });
      expectProblem(list, 400);
      expect(await paymentCount(url, account)).toBe(0);
      // Neither key was consumed.
      expect((await call(url, 'POST', '/payments', { account, key: a, body: PAY })).status).toBe(201);
      expect((await call(url, 'POST', '/payments', { account, key: b, body: PAY })).headers.get('idempotent-replayed')).toBeNull();
      expect(await paymentCount(url, account)).toBe(2);
    });

    it('a body that is not valid JSON, and an empty JSON body', async () => {
      const account = fresh('acct');
      const key = fresh();
      const res = await call(url, 'POST', '/payments', { account, key, rawBody: '{"amount": 42, "currency": ' });
      const body = expectProblem(res, 400);
      expect(body.type).toBe('https://oncely.dev/problems/body-invalid');
      const empty = await call(url, 'POST', '/payments', { account, key, rawBody: '' });
      expectProblem(empty, 400);
      expect(await paymentCount(url, account)).toBe(0);
      const ok = await call(url, 'POST', '/payments', { account, key, body: PAY });
      expect(ok.status).toBe(201);
      expect(ok.headers.get('idempotent-replayed')).toBeNull();
    });

    it('a body over the configured limit: 413', async () => {
      const account = fresh('acct');
      const key = fresh();
      const big = JSON.stringify({ ...PAY, description: 'x'.repeat(BODY_LIMIT) });
      const res = await raw(url, '/payments', { authorization: `Bearer ${account}`, 'idempotency-key': key }, big);
      const body = expectProblem(res, 413);
      expect(body.type).toBe('https://oncely.dev/problems/body-too-large');
      expect(await paymentCount(url, account)).toBe(0);
      const ok = await call(url, 'POST', '/payments', { account, key, body: PAY });
      expect(ok.status).toBe(201);
      expect(ok.headers.get('idempotent-replayed')).toBeNull();
    });

    it('an invalid payment body: 400 problem naming the field, the key not consumed', async () => {
      const account = fresh('acct');
      const key = fresh();
      const invalid: unknown[] = [
        { amount: 0, currency: 'EUR' },
        { amount: -5, currency: 'EUR' },
        { amount: 1.5, currency: 'EUR' },
        { amount: '4200', currency: 'EUR' },
        { amount: 4200, currency: 'eur' },
        { amount: 4200, currency: 'EURO' },
        { amount: 4200 },
        { currency: 'EUR' },
        { amount: 4200, currency: 'EUR', customer: 42 },
        { amount: 4200, currency: 'EUR', description: ['x'] },
        { amount: 4200, currency: 'EUR', ammount: 1 },
        [PAY],
        'pay',
      ];
      for (const body of invalid) {
        const res = await call(url, 'POST', '/payments', { account, key, body });
        const problem = expectProblem(res, 400);
        expect(problem.type).toBe('https://oncely.dev/problems/reference/validation');
      }
      const text = await call(url, 'POST', '/payments', {
        account,
        key,
        rawBody: 'amount=1',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
      });
      expectProblem(text, 415);
      expect(await paymentCount(url, account)).toBe(0);
      const ok = await call(url, 'POST', '/payments', { account, key, body: PAY });
      expect(ok.status).toBe(201);
      expect(ok.headers.get('idempotent-replayed')).toBeNull();
    });
  });

  it('answers 401 before the idempotency layer: missing or malformed token, the key not consumed', async () => {
    const key = fresh();
    const account = fresh('acct');
    const cases: Array<Record<string, string>> = [
      {},
      { authorization: 'Bearer' },
      { authorization: 'Bearer ' },
      { authorization: `Basic ${Buffer.from('a:b').toString('base64')}` },
      { authorization: 'Bearer has space' },
      { authorization: 'Bearer acct!' },
      { authorization: `Bearer ${'a'.repeat(65)}` },
    ];
    for (const headers of cases) {
      const res = await call(url, 'POST', '/payments', { account: null, key, body: PAY, headers });
      const body = expectProblem(res, 401);
      expect(body.type).toBe('https://oncely.dev/problems/reference/unauthorized');
      expect(res.headers.get('www-authenticate')).toMatch(/^Bearer/);
    }
    // Without a key at all, still 401 (auth comes first), not 400.
    expectProblem(await call(url, 'POST', '/payments', { account: null, body: PAY }), 401);
    expectProblem(await call(url, 'GET', '/payments', { account: null }), 401);
    const ok = await call(url, 'POST', '/payments', { account, key, body: PAY });
    expect(ok.status).toBe(201);
    expect(ok.headers.get('idempotent-replayed')).toBeNull();
    // 64 characters is the longest account.
    expect((await call(url, 'GET', '/payments', { account: 'A'.repeat(64) })).status).toBe(200);
  });

  it('scopes keys to the account: the same key from two accounts makes two payments, each sees only its own', async () => {
    const key = fresh();
    const alice = fresh('alice');
    const bob = fresh('bob');
    const a = await call(url, 'POST', '/payments', { account: alice, key, body: PAY });
    const b = await call(url, 'POST', '/payments', { account: bob, key, body: PAY });
    expect(a.status).toBe(201);
    expect(b.status).toBe(201);
    expect(b.headers.get('idempotent-replayed')).toBeNull();
    expect(a.json().id).not.toBe(b.json().id);
    expect(await paymentCount(url, alice)).toBe(1);
    expect(await paymentCount(url, bob)).toBe(1);
    const foreign = await call(url, 'GET', `/payments/${a.json().id}`, { account: bob });
    expect(expectProblem(foreign, 404).type).toBe('https://oncely.dev/problems/reference/not-found');
    expectProblem(await call(url, 'GET', '/payments/pay_nope', { account: alice }), 404);
  });

  it('answers an in-flight duplicate with 409 and Retry-After, then replays once the first finishes', async () => {
    const account = fresh('acct');
    const key = fresh();
    const first = call(slow.url, 'POST', '/payments', { account, key, body: PAY });
    await new Promise((r) => setTimeout(r, 150));
    const dup = await call(slow.url, 'POST', '/payments', { account, key, body: PAY });
    const body = expectProblem(dup, 409);
    expect(body.type).toBe('https://oncely.dev/problems/in-flight');
    expect(Number(dup.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    // A different body while in flight is still a mismatch.
    expectProblem(await call(slow.url, 'POST', '/payments', { account, key, body: { ...PAY, amount: 1 } }), 422);
    const done = await first;
    expect(done.status).toBe(201);
    const replay = await call(slow.url, 'POST', '/payments', { account, key, body: PAY });
    expect(replay.status).toBe(201);
    expect(replay.text).toBe(done.text);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await paymentCount(slow.url, account)).toBe(1);
  });

  it('records each payment once in the ledger (GET /ledger), replays included', async () => {
    const account = fresh('acct');
    const key = fresh();
    expect(await call(url, 'POST', '/payments', { account, key, body: { amount: 300, currency: 'EUR' } })).toMatchObject({ status: 201 });
    await call(url, 'POST', '/payments', { account, key, body: { amount: 300, currency: 'EUR' } });
    expect((await call(url, 'POST', '/payments', { account, key: fresh(), body: { amount: 50, currency: 'USD' } })).status).toBe(201);
    const payments = (await call(url, 'GET', '/payments', { account })).json().data as Array<{ id: string }>;
    let ledger: { data: Array<{ payment: string }>; balance: Record<string, number> } = { data: [], balance: {} };
    for (let i = 0; i < 100 && ledger.data.length < 2; i++) {
      await new Promise((r) => setTimeout(r, 50));
      ledger = (await call(url, 'GET', '/ledger', { account })).json() as typeof ledger;
    }
    expect(ledger.data.map((e) => e.payment)).toEqual(payments.map((p) => p.id));
    expect(ledger.balance).toEqual({ EUR: 300, USD: 50 });
    expect((await call(url, 'GET', '/ledger', { account: fresh('other') })).json()).toEqual({ data: [], balance: {} });
  });

  it('executes trades idempotently', async () => {
    const account = fresh('acct');
    const key = fresh();
    const order = { symbol: 'ACME', side: 'buy', quantity: 10, price: 12.34 };
    const res = await call(url, 'POST', '/execute-trade', { account, key, body: order });
    expect(res.status, res.text).toBe(201);
    const trade = res.json();
    expect(trade).toMatchObject({ ...order, status: 'executed' });
    expect(trade.id).toMatch(/^trd_/);
    expect(res.headers.get('location')).toBe(`/trades/${trade.id}`);
    const again = await call(url, 'POST', '/execute-trade', { account, key, body: order });
    expect(again.text).toBe(res.text);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect((await call(url, 'GET', '/trades', { account })).json()).toEqual({ data: [trade] });
    expect((await call(url, 'GET', `/trades/${trade.id}`, { account })).json()).toEqual(trade);
    for (const bad of [
      { ...order, side: 'hold' },
      { ...order, quantity: 0 },
      { ...order, quantity: 1.5 },
      { ...order, price: 0 },
      { ...order, price: -1 },
      { ...order, symbol: '' },
      { side: 'buy', quantity: 1, price: 1 },
    ]) {
      expectProblem(await call(url, 'POST', '/execute-trade', { account, key: fresh(), body: bad }), 400);
    }
    expect((await call(url, 'GET', '/trades', { account })).json().data).toHaveLength(1);
  });

  it('places an order that reserves, then pays through POST /payments with the pay step\'s derived key', async () => {
    const account = fresh('acct');
    const key = fresh();
    const body = { currency: 'EUR', items: [{ sku: 'tea', quantity: 2, price: 350 }, { sku: 'cup', quantity: 1, price: 1200 }] };
    const res = await call(url, 'POST', '/orders', { account, key, body });
    expect(res.status, res.text).toBe(201);
    const order = res.json();
    expect(order).toMatchObject({ status: 'paid', total: 1900, currency: 'EUR', items: body.items });
    expect(order.id).toMatch(/^ord_/);
    expect(res.headers.get('location')).toBe(`/orders/${order.id}`);
    const payments = (await call(url, 'GET', '/payments', { account })).json().data as Array<Record<string, unknown>>;
    expect(payments).toHaveLength(1);
    expect(payments[0]).toMatchObject({ id: order.payment, amount: 1900, currency: 'EUR' });

    const again = await call(url, 'POST', '/orders', { account, key, body });
    expect(again.text).toBe(res.text);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect((await call(url, 'GET', '/orders', { account })).json()).toEqual({ data: [order] });
    expect((await call(url, 'GET', `/orders/${order.id}`, { account })).json()).toEqual(order);
    expectProblem(await call(url, 'GET', '/orders/ord_nope', { account }), 404);
    expectProblem(await call(url, 'GET', `/orders/${order.id}`, { account: fresh('other') }), 404);

    // The pay step's key (derived from the order's record id) is in the account's scope: paying it directly replays the order's payment.
    const { deriveKey } = await import('oncely/client');
    const direct = await call(url, 'POST', '/payments', {
      account,
      key: deriveKey(recordId(key, account), 'pay'),
      body: { amount: 1900, currency: 'EUR', description: 'order of 2 item(s)' },
    });
    expect(direct.headers.get('idempotent-replayed')).toBe('true');
    expect(direct.json().id).toBe(order.payment);

    for (const bad of [
      { currency: 'EUR', items: [] },
      { currency: 'EUR', items: [{ sku: 'a', quantity: 0, price: 1 }] },
      { currency: 'EUR', items: [{ sku: 'a', quantity: 1, price: 1.5 }] },
      { currency: 'eur', items: [{ sku: 'a', quantity: 1, price: 1 }] },
      { items: [{ sku: 'a', quantity: 1, price: 1 }] },
    ]) {
      expectProblem(await call(url, 'POST', '/orders', { account, key: fresh(), body: bad }), 400);
    }
    expect(await paymentCount(url, account)).toBe(1);
  });

  it('creates, replaces, reads and deletes users with PUT/GET/DELETE, no key needed', async () => {
    const account = fresh('acct');
    const id = fresh('u');
    const created = await call(url, 'PUT', `/users/${id}`, { account, body: { name: 'Ada', email: 'ada@example.com' } });
    expect(created.status).toBe(201);
    expect(created.json()).toMatchObject({ id, name: 'Ada', email: 'ada@example.com' });
    const replaced = await call(url, 'PUT', `/users/${id}`, { account, body: { name: 'Ada L.', email: 'ada@example.com' } });
    expect(replaced.status).toBe(200);
    const same = await call(url, 'PUT', `/users/${id}`, { account, body: { name: 'Ada L.', email: 'ada@example.com' } });
    expect(same.status).toBe(200);
    expect((await call(url, 'GET', `/users/${id}`, { account })).json()).toMatchObject({ name: 'Ada L.' });
    expectProblem(await call(url, 'GET', `/users/${id}`, { account: fresh('other') }), 404);
    expectProblem(await call(url, 'PUT', `/users/${id}`, { account, body: { name: 'x' } }), 400);
    expectProblem(await call(url, 'PUT', `/users/${id}`, { account, body: { name: 'x', email: 'nope' } }), 400);
    expectProblem(await call(url, 'PUT', '/users/bad%20id', { account, body: { name: 'x', email: 'a@b' } }), 400);
    const gone = await call(url, 'DELETE', `/users/${id}`, { account });
    expect(gone.status).toBe(204);
    expectProblem(await call(url, 'DELETE', `/users/${id}`, { account }), 404);
    expectProblem(await call(url, 'GET', `/users/${id}`, { account }), 404);
  });

  it('answers unknown routes, broken URLs and oversized headers with problems too', async () => {
    expectProblem(await call(url, 'GET', '/nowhere'), 404);
    expectProblem(await call(url, 'PATCH', '/payments'), 404);
    expect(expectProblem(await call(url, 'GET', '/payments/%E0%A4%A'), 400).type).toBe(
      'https://oncely.dev/problems/reference/bad-request',
    );
    const huge = await call(url, 'GET', '/healthz', { headers: { 'x-padding': 'a'.repeat(20_000) } });
    expectProblem(huge, 431);
  });

  it('keeps records and business data across a restart', async () => {
    if (kind === 'memory') return; // memory records die with the process, by design
    const account = fresh('acct');
    const key = fresh();
    const first = await call(url, 'POST', '/payments', { account, key, body: PAY });
    expect(first.status).toBe(201);
    await ref.close();
    ref = await startReference(options);
    url = ref.url;
    const replay = await call(url, 'POST', '/payments', { account, key, body: PAY });
    expect(replay.status).toBe(201);
    expect(replay.text).toBe(first.text);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await paymentCount(url, account)).toBe(1);
  });
});

describe('reference system variants', () => {
  it('IDEMPOTENCY=off ignores keys: the same key twice charges twice (the storm baseline)', async () => {
    const ref = await startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0, idempotency: false });
    try {
      const account = fresh('acct');
      const key = fresh();
      const a = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      const b = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      const none = await call(ref.url, 'POST', '/payments', { account, body: PAY });
      expect([a.status, b.status, none.status]).toEqual([201, 201, 201]);
      expect(b.headers.get('idempotent-replayed')).toBeNull();
      expect(await paymentCount(ref.url, account)).toBe(3);
      const order = { currency: 'EUR', items: [{ sku: 'a', quantity: 1, price: 10 }] };
      const o1 = await call(ref.url, 'POST', '/orders', { account, key, body: order });
      const o2 = await call(ref.url, 'POST', '/orders', { account, key, body: order });
      expect([o1.status, o2.status]).toEqual([201, 201]);
      expect(o1.json().payment).not.toBe(o2.json().payment);
      expect(await paymentCount(ref.url, account)).toBe(5);
      expect((await call(ref.url, 'GET', '/healthz')).json()).toMatchObject({ idempotency: false });
    } finally {
      await ref.close();
    }
  });

  it('limits bodies to 1 MiB by default: 413 just above it, a body of 1 MiB is read', async () => {
    const ref = await startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0 });
    try {
      const account = fresh('acct');
      const padded = (size: number): string => {
        const base = JSON.stringify({ ...PAY, description: '' });
        return JSON.stringify({ ...PAY, description: 'x'.repeat(size - base.length) });
      };
      const over = await raw(ref.url, '/payments', { authorization: `Bearer ${account}`, 'idempotency-key': fresh() }, padded(1024 * 1024 + 1));
      expectProblem(over, 413);
      // Exactly 1 MiB passes the limit (and then fails the schema's description length: 400, not 413).
      const at = await raw(ref.url, '/payments', { authorization: `Bearer ${account}`, 'idempotency-key': fresh() }, padded(1024 * 1024));
      expectProblem(at, 400);
      expect(await paymentCount(ref.url, account)).toBe(0);
    } finally {
      await ref.close();
    }
  });

  it('a completion the store lost until the lease ended: the retry re-runs the handler, which answers with the same payment', async () => {
    // The engine retries a failed completion until the lease deadline; here the store refuses every one of them.
    let loseCompletes = true;
    const base = memoryStore();
    const flaky: IdempotencyStore = Object.assign(Object.create(base) as IdempotencyStore, {
      complete: (...args: Parameters<IdempotencyStore['complete']>) =>
        loseCompletes ? Promise.reject(new Error('connection reset')) : base.complete(...args),
    });
    const ref = await startReference({ store: flaky, dataDir: tempDir(), port: 0, leaseMs: 1500 });
    try {
      const account = fresh('acct');
      const key = fresh();
      const first = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(first.status).toBe(201); // the effect happened; the caller still gets its answer
      loseCompletes = false;
      await new Promise((r) => setTimeout(r, 1600));
      const retry = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(retry.status).toBe(201);
      expect(retry.headers.get('idempotent-replayed')).toBeNull(); // re-executed (takeover)…
      expect(retry.json()).toEqual(first.json()); // …and found the payment already made
      expect(await paymentCount(ref.url, account)).toBe(1);
      const replay = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
    } finally {
      await ref.close();
    }
  });

  it('a completion that failed a few times is retried with the same token and lands: the next copy replays', async () => {
    let failCompletes = 3;
    const base = memoryStore();
    const flaky: IdempotencyStore = Object.assign(Object.create(base) as IdempotencyStore, {
      complete: (...args: Parameters<IdempotencyStore['complete']>) =>
        failCompletes-- > 0 ? Promise.reject(new Error('connection reset')) : base.complete(...args),
    });
    const ref = await startReference({ store: flaky, dataDir: tempDir(), port: 0, leaseMs: 5000 });
    try {
      const account = fresh('acct');
      const key = fresh();
      const first = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(first.status).toBe(201);
      const again = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(again.headers.get('idempotent-replayed')).toBe('true');
      expect(again.json()).toEqual(first.json());
      expect(await paymentCount(ref.url, account)).toBe(1);
    } finally {
      await ref.close();
    }
  });

  it('a lease lost while the payment provider is slow: the handler stops before charging (409), a retry charges once', async () => {
    let refuseRenewals = true;
    const base = memoryStore();
    const fenced: IdempotencyStore = Object.assign(Object.create(base) as IdempotencyStore, {
      renew: (...args: Parameters<IdempotencyStore['renew']>) =>
        refuseRenewals ? Promise.resolve(false) : base.renew(...args),
    });
    const ref = await startReference({ store: fenced, dataDir: tempDir(), port: 0, leaseMs: 300, paymentDelayMs: 600 });
    try {
      const account = fresh('acct');
      const key = fresh();
      const lost = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(expectProblem(lost, 409).type).toBe('https://oncely.dev/problems/lease-lost');
      expect(await paymentCount(ref.url, account)).toBe(0);
      refuseRenewals = false;
      await new Promise((r) => setTimeout(r, 350));
      const retry = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(retry.status, retry.text).toBe(201);
      expect(await paymentCount(ref.url, account)).toBe(1);
    } finally {
      await ref.close();
    }
  });

  it('after a record expires, the key runs again: the same request gets the same payment, another one 422', async () => {
    const store = memoryStore();
    const ref = await startReference({ store, dataDir: tempDir(), port: 0 });
    try {
      const account = fresh('acct');
      const key = fresh();
      const orderKey = fresh();
      const order = { currency: 'EUR', items: [{ sku: 'a', quantity: 2, price: 100 }] };
      const first = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      const firstOrder = await call(ref.url, 'POST', '/orders', { account, key: orderKey, body: order });
      const trade = { symbol: 'ACME', side: 'sell', quantity: 3, price: 9.5 };
      const tradeKey = fresh();
      const firstTrade = await call(ref.url, 'POST', '/execute-trade', { account, key: tradeKey, body: trade });
      // Retention over: the records are gone (as after their TTL), the rows remain.
      for (const k of [key, orderKey, tradeKey]) await store.delete(recordId(k, account));

      const other = await call(ref.url, 'POST', '/payments', { account, key, body: { ...PAY, amount: 1 } });
      expect(expectProblem(other, 422).detail).toContain(first.json().id as string);
      await store.delete(recordId(key, account)); // the 422 was stored; forget it too
      const same = await call(ref.url, 'POST', '/payments', { account, key, body: PAY });
      expect(same.status).toBe(201);
      expect(same.headers.get('idempotent-replayed')).toBeNull();
      expect(same.json()).toEqual(first.json());

      expectProblem(await call(ref.url, 'POST', '/orders', { account, key: orderKey, body: { ...order, currency: 'USD' } }), 422);
      await store.delete(recordId(orderKey, account));
      const sameOrder = await call(ref.url, 'POST', '/orders', { account, key: orderKey, body: order });
      expect(sameOrder.json()).toEqual(firstOrder.json());

      expectProblem(await call(ref.url, 'POST', '/execute-trade', { account, key: tradeKey, body: { ...trade, quantity: 4 } }), 422);
      await store.delete(recordId(tradeKey, account));
      expect((await call(ref.url, 'POST', '/execute-trade', { account, key: tradeKey, body: trade })).json()).toEqual(firstTrade.json());

      expect(await paymentCount(ref.url, account)).toBe(2); // the payment and the order's payment
    } finally {
      await ref.close();
    }
  });

  it('a store that is down answers 503 problem with Retry-After and runs nothing', async () => {
    const base = memoryStore();
    const down: IdempotencyStore = Object.assign(Object.create(base) as IdempotencyStore, {
      claim: () => Promise.reject(new Error('connection refused')),
    });
    const ref = await startReference({ store: down, dataDir: tempDir(), port: 0 });
    try {
      const account = fresh('acct');
      const res = await call(ref.url, 'POST', '/payments', { account, key: fresh(), body: PAY });
      const body = expectProblem(res, 503);
      expect(body.type).toBe('https://oncely.dev/problems/store-unavailable');
      expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
      expect(await paymentCount(ref.url, account)).toBe(0);
      // Reads and PUT do not need the store.
      expect((await call(ref.url, 'PUT', '/users/u1', { account, body: { name: 'A', email: 'a@b' } })).status).toBe(201);
    } finally {
      await ref.close();
    }
  });
});

describe('start-up failures', () => {
  it('a bad setting or a taken port rejects, leaving nothing open', async () => {
    await expect(startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0, leaseMs: -1 })).rejects.toThrow(/leaseMs/);
    const ref = await startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0 });
    try {
      const port = Number(new URL(ref.url).port);
      const dir = tempDir();
      await expect(startReference({ storeUrl: `sqlite:${join(dir, 'o.db')}`, dataDir: dir, port })).rejects.toThrow(/EADDRINUSE/);
      // The failed instance closed its files: another can open them at once.
      const again = await startReference({ storeUrl: `sqlite:${join(dir, 'o.db')}`, dataDir: dir, port: 0 });
      await again.close();
    } finally {
      await ref.close();
    }
  });
});

describe('referenceOptionsFromEnv', () => {
  it('has the documented defaults', () => {
    expect(referenceOptionsFromEnv({})).toEqual({
      storeUrl: 'sqlite:./data/oncely.db',
      dataDir: './data',
      databaseUrl: undefined,
      tablePrefix: undefined,
      transactional: 'auto',
      fault: undefined,
      baseUrl: undefined,
      host: '127.0.0.1',
      port: 3000,
      leaseMs: 30_000,
      idempotency: true,
      waitMs: undefined,
      paymentDelayMs: 0,
      paymentDelayAfterMs: 0,
      orderDelayMs: 0,
      bodyLimit: 1024 * 1024,
      logger: false,
      brokerUrl: undefined,
      encryptionKeys: undefined,
      headersTimeoutMs: 10_000,
      requestTimeoutMs: 30_000,
      idleTimeoutMs: 60_000,
      maxRequestsPerSocket: 1_000,
    });
  });

  it('reads every knob and refuses nonsense', () => {
    const options = referenceOptionsFromEnv({
      STORE_URL: 'memory:',
      DATA_DIR: '/tmp/x',
      HOST: '0.0.0.0',
      PORT: '0',
      LEASE_MS: '1000',
      IDEMPOTENCY: 'off',
      WAIT_MS: '500',
      PAYMENT_DELAY_MS: '3000',
      PAYMENT_DELAY_AFTER_MS: '10',
      ORDER_DELAY_MS: '20',
      BODY_LIMIT: '2048',
      BROKER_URL: 'nats://127.0.0.1:4222',
      DATABASE_URL: 'postgres://app@db.internal/shop',
      DATABASE_TABLE_PREFIX: 'test_',
      TRANSACTIONAL: 'off',
      FAULT: 'after-step:pay',
      PAYMENTS_URL: 'http://payments.internal:8080',
    });
    expect(options).toMatchObject({
      storeUrl: 'memory:',
      port: 0,
      leaseMs: 1000,
      idempotency: false,
      waitMs: 500,
      paymentDelayMs: 3000,
      paymentDelayAfterMs: 10,
      orderDelayMs: 20,
      bodyLimit: 2048,
      brokerUrl: 'nats://127.0.0.1:4222',
      databaseUrl: 'postgres://app@db.internal/shop',
      tablePrefix: 'test_',
      transactional: 'off',
      fault: 'after-step:pay',
      baseUrl: 'http://payments.internal:8080',
    });
    expect(() => referenceOptionsFromEnv({ PORT: 'abc' })).toThrow(/PORT/);
    expect(() => referenceOptionsFromEnv({ TRANSACTIONAL: 'always' })).toThrow(/TRANSACTIONAL/);
    expect(() => referenceOptionsFromEnv({ FAULT: 'somewhere' })).toThrow(/FAULT must be one of/);
    expect(() => referenceOptionsFromEnv({ LEASE_MS: '0' })).toThrow(/LEASE_MS/);
    expect(() => referenceOptionsFromEnv({ IDEMPOTENCY: 'maybe' })).toThrow(/IDEMPOTENCY/);
  });
});
