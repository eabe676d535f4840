/**
 * oncely/client against a real oncely server (the fetch front door on
 * node:http, memory store), with and without the fault proxy: the effect
 * happens once however the exchange breaks.
 */
import { type IncomingMessage, type ServerResponse, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createClient, deriveKey } from 'oncely/client';
import { withIdempotency } from 'oncely/fetch';
import { memoryStore } from 'oncely/stores/memory';
import { afterEach, describe, expect, it } from 'vitest';
import { startFaultProxy } from '../testing/fault-proxy.js';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

interface PaymentsServer {
  url: string;
  charges: { key: string | null; amount: number }[];
}

/** A payments service behind oncely's fetch front door; each charge takes `workMs`. */
async function startPayments(workMs = 0): Promise<PaymentsServer> {
  const charges: PaymentsServer['charges'] = [];
  const handler = withIdempotency(
    async (request: Request) => {
      const { amount } = (await request.json()) as { amount: number };
      await new Promise((r) => setTimeout(r, workMs));
      charges.push({ key: request.headers.get('idempotency-key'), amount });
      return Response.json({ id: `pay_${charges.length}`, amount }, { status: 201 });
    },
    { store: memoryStore(), scope: false },
  );
  const server = createServer((req, res) => void serveWith(handler, req, res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(
    () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  );
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, charges };
}

/** node:http → Request → handler → Response → node:http. */
async function serveWith(
  handler: (request: Request) => Promise<Response>,
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const headers = new Headers();
  for (const [name, value] of Object.entries(req.headers)) {
    if (typeof value === 'string') headers.set(name, value);
    else if (Array.isArray(value)) for (const v of value) headers.append(name, v);
  }
  const body = chunks.length === 0 ? null : Buffer.concat(chunks);
  const response = await handler(
    new Request(`http://${req.headers.host}${req.url}`, { method: req.method, headers, body }),
  );
  const out = Buffer.from(await response.arrayBuffer());
  if (res.destroyed) return;
  res.writeHead(response.status, Object.fromEntries(response.headers));
  res.end(out);
}

const pay = (amount: number) => ({
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify({ amount }),
});
const fast = { minDelayMs: 5, maxDelayMs: 20 };

describe('oncely/client against an oncely server', () => {
  it('a lost answer is retried and replayed: one charge', async () => {
    const payments = await startPayments();
    const proxy = await startFaultProxy({ target: payments.url, faults: ['drop-response'] });
    cleanups.push(proxy.close);
    const res = await createClient(fast).fetch(`${proxy.url}/payments`, pay(4200));
    expect(res.status).toBe(201);
    expect(res.attempts).toBe(2);
    expect(res.replayed).toBe(true);
    expect(await res.json()).toEqual({ id: 'pay_1', amount: 4200 });
    expect(payments.charges).toEqual([{ key: res.key, amount: 4200 }]);
  });

  it("retries through the server's in-flight 409 and gets the first run's answer", async () => {
    const payments = await startPayments(700);
    const reasons: (string | number | undefined)[] = [];
    const res = await createClient({
      ...fast,
      attemptTimeoutMs: 250,
      onRetry: (s) => void reasons.push(s.reason === 'status' ? s.status : s.reason),
    }).fetch(`${payments.url}/payments`, pay(100));
    expect(res.status).toBe(201);
    expect(res.replayed).toBe(true);
    // The first attempt timed out while the charge ran; a retry met the in-flight 409
    // (under load, more than one attempt may time out first).
    expect(reasons[0]).toBe('timeout');
    expect(reasons.at(-1)).toBe(409);
    expect(res.attempts).toBe(reasons.length + 1);
    expect(payments.charges).toHaveLength(1);
  });

  it('does not retry the 422 of a key reused for another request', async () => {
    const payments = await startPayments();
    const client = createClient(fast);
    await client.fetch(`${payments.url}/payments`, pay(1), { key: 'same-key' });
    const res = await client.fetch(`${payments.url}/payments`, pay(2), { key: 'same-key' });
    expect(res.status).toBe(422);
    expect(res.attempts).toBe(1);
    expect(payments.charges).toHaveLength(1);
  });

  it('a re-executed parent passing a derived key charges once', async () => {
    const payments = await startPayments();
    const client = createClient(fast);
    const orderKey = 'order-0001';
    // The order handler runs twice for one order (say its first run crashed
    // after paying): both runs pay with the same derived key.
    const first = await client.fetch(`${payments.url}/payments`, pay(990), { key: deriveKey(orderKey, 'payment') });
    const second = await client.fetch(`${payments.url}/payments`, pay(990), { key: deriveKey(orderKey, 'payment') });
    expect([first.replayed, second.replayed]).toEqual([false, true]);
    expect(await second.json()).toEqual(await first.json());
    expect(payments.charges).toHaveLength(1);
  });
});
