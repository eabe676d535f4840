/**
 * Issue 4, "what must be shown": orders placed through `oncely/client` while
 * answers are dropped and the payment endpoint answers 503 intermittently.
 * Afterwards every order has exactly one payment and the total charged equals
 * the sum of the orders.
 *
 * Topology (all on loopback, reference system on a temp SQLite store):
 *
 * ```
 * client ──▶ front proxy ──▶ POST /orders ──(order handler's client)──▶ inner proxy ──▶ POST /payments
 *            drops answers                                              503s, drops answers
 * ```
 *
 * The reference's `baseUrl` option is where the order handler sends its
 * payment calls; it is a string, so the inner proxy's port is chosen
 * before the reference starts (see `startSystem`).
 *
 * A second case runs the same faults with `idempotency: false` and expects
 * duplicates: the faults are real, and it is oncely that absorbs them.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createClient } from 'oncely/client';
import { type Fault, type FaultProxy, type FaultRequest, startFaultProxy } from 'oncely/testing';
import { afterEach, describe, expect, it } from 'vitest';
import { mulberry32 as prng } from '../../src/testing/random.js';
import { type RunningReference, startReference } from '../../reference/app.js';

const ACCOUNT = 'acct_e2e';
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

interface Order {
  id: string;
  total: number;
  payment: string;
  items: Array<{ sku: string; quantity: number; price: number }>;
}
interface Payment {
  id: string;
  amount: number;
}

/** A fault plan that breaks only POSTs to `path`, with the given probabilities. */
function plan(path: string, seed: number, probabilities: Array<[Fault, number]>): (request: FaultRequest) => Fault {
  const random = prng(seed);
  return (request) => {
    if (request.method !== 'POST' || !request.url.startsWith(path)) return 'none';
    let draw = random();
    for (const [fault, p] of probabilities) {
      if (draw < p) return fault;
      draw -= p;
    }
    return 'none';
  };
}

/** A port free at the time of asking (the inner proxy takes it right after). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

interface System {
  ref: RunningReference;
  inner: FaultProxy;
  front: FaultProxy;
}

/**
 * Starts the reference system with its payment calls routed through the
 * inner proxy, and the front proxy for the client. The inner proxy's port is
 * reserved first (the reference wants the payments base URL as a string);
 * should another process take it in between, start again.
 */
async function startSystem(idempotency: boolean, seed: number): Promise<System> {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-e2e-orders-'));
  cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const ref = await startReference({
      storeUrl: `sqlite:${join(dir, `oncely-${attempt}.db`)}`,
      dataDir: join(dir, `data-${attempt}`),
      port: 0,
      idempotency,
      baseUrl: `http://127.0.0.1:${port}`,
    });
    let inner: FaultProxy;
    try {
      inner = await startFaultProxy({
        target: ref.url,
        port,
        // The payment service: 503 before processing (Retry-After: 1), or an answer lost after it committed.
        faults: plan('/payments', seed, [
          ['fail-503', 0.3],
          ['drop-response', 0.15],
        ]),
        retryAfter: 1,
      });
    } catch (error) {
      await ref.close();
      if ((error as NodeJS.ErrnoException).code === 'EADDRINUSE' && attempt < 3) continue;
      throw error;
    }
    // The client's own path: order answers lost after the order committed.
    const front = await startFaultProxy({ target: ref.url, faults: plan('/orders', seed + 1, [['drop-response', 0.25]]) });
    cleanups.push(() => ref.close(), () => inner.close(), () => front.close());
    return { ref, inner, front };
  }
}

/** Places `count` orders through the front proxy, `parallel` at a time; resolves to what each answered. */
async function placeOrders(front: FaultProxy, count: number, parallel: number, seed: number) {
  const random = prng(seed);
  const client = createClient({ retries: 10, minDelayMs: 20, maxDelayMs: 400, attemptTimeoutMs: 15_000, deadlineMs: 45_000 });
  const wanted = Array.from({ length: count }, (_, n) => {
    const items = Array.from({ length: 1 + Math.floor(random() * 3) }, (_, i) => ({
      sku: `o${n}-i${i}`,
      quantity: 1 + Math.floor(random() * 4),
      price: 50 + Math.floor(random() * 5_000),
    }));
    return { n, items, total: items.reduce((sum, item) => sum + item.quantity * item.price, 0) };
  });
  const answers: Array<{ status: number; attempts: number; replayed: boolean; order: Order | undefined }> = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < wanted.length) {
        const { n, items } = wanted[next++]!;
        const res = await client.fetch(`${front.url}/orders`, {
          method: 'POST',
          headers: { authorization: `Bearer ${ACCOUNT}`, 'content-type': 'application/json' },
          body: JSON.stringify({ currency: 'EUR', items }),
        });
        const body = (await res.json()) as Order;
        answers[n] = { status: res.status, attempts: res.attempts, replayed: res.replayed, order: res.status === 201 ? body : undefined };
      }
    }),
  );
  return { wanted, answers };
}

async function list<T>(ref: RunningReference, path: string): Promise<T[]> {
  const res = await fetch(ref.url + path, { headers: { authorization: `Bearer ${ACCOUNT}` } });
  expect(res.status).toBe(200);
  return ((await res.json()) as { data: T[] }).data;
}

describe('orders under faults (issue 4)', () => {
  it('every order has exactly one payment, and the total charged is the sum of the orders', async () => {
    const { ref, inner, front } = await startSystem(true, 41);
    const { wanted, answers } = await placeOrders(front, 40, 8, 4242);

    // Every logical order was answered 201, through retries and replays.
    expect(answers.map((a) => a.status)).toEqual(wanted.map(() => 201));

    const orders = await list<Order>(ref, '/orders');
    const payments = await list<Payment>(ref, '/payments');

    // One order per logical order: the answers name exactly the orders that exist.
    expect(orders).toHaveLength(wanted.length);
    expect(new Set(orders.map((o) => o.id))).toEqual(new Set(answers.map((a) => a.order!.id)));
    for (const { n, total } of wanted) {
      const order = orders.find((o) => o.items[0]!.sku === `o${n}-i0`)!;
      expect(order.total).toBe(total);
      expect(answers[n]!.order!.id).toBe(order.id);
    }

    // Exactly one payment per order, and no payment without its order.
    expect(payments).toHaveLength(orders.length);
    const paymentById = new Map(payments.map((p) => [p.id, p]));
    expect(new Set(orders.map((o) => o.payment)).size).toBe(orders.length);
    for (const order of orders) expect(paymentById.get(order.payment)?.amount).toBe(order.total);

    // The total charged equals the sum of the orders, which is what was asked for.
    const charged = payments.reduce((sum, p) => sum + p.amount, 0);
    const ordered = orders.reduce((sum, o) => sum + o.total, 0);
    expect(charged).toBe(ordered);
    expect(charged).toBe(wanted.reduce((sum, w) => sum + w.total, 0));

    // The faults did happen, on both legs, and were absorbed by retries and replays.
    expect(inner.stats['fail-503']).toBeGreaterThan(3);
    expect(inner.stats['drop-response']).toBeGreaterThan(1);
    expect(front.stats['drop-response']).toBeGreaterThan(3);
    expect(answers.filter((a) => a.replayed).length).toBeGreaterThan(0);
    expect(answers.reduce((sum, a) => sum + a.attempts, 0)).toBeGreaterThan(wanted.length);
  }, 60_000);

  it('control: the same faults without the idempotency layer make duplicate orders and payments', async () => {
    const { ref, inner, front } = await startSystem(false, 41);
    const { wanted } = await placeOrders(front, 20, 8, 4242);
    const orders = await list<Order>(ref, '/orders');
    const payments = await list<Payment>(ref, '/payments');
    const ordered = wanted.reduce((sum, w) => sum + w.total, 0);
    const charged = payments.reduce((sum, p) => sum + p.amount, 0);
    expect(front.stats['drop-response'] + inner.stats['drop-response']).toBeGreaterThan(0);
    expect(orders.length + payments.length).toBeGreaterThan(2 * wanted.length);
    expect(charged).toBeGreaterThan(ordered);
  }, 60_000);
});
