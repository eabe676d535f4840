import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { createClient } from '../client/index.js';
import { ClientRequestError, ConfigError } from '../errors/index.js';
import { type FaultProxy, type FaultRequest, startFaultProxy } from './fault-proxy.js';

/**
 * A tiny idempotent upstream: the first request with a key runs (one
 * "charge"), later ones replay its answer with `Idempotent-Replayed: true`.
 */
interface Upstream {
  url: string;
  /** Every request received: method, path, key, body. */
  received: { method: string; url: string; key: string | undefined; body: string }[];
  /** Effects applied (charges made). */
  charges: number;
  close(): Promise<void>;
}

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function startUpstream(): Promise<Upstream> {
  const answers = new Map<string, string>();
  const upstream: Upstream = { url: '', received: [], charges: 0, close: async () => {} };
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const key = req.headers['idempotency-key'] as string | undefined;
      const body = Buffer.concat(chunks).toString();
      upstream.received.push({ method: req.method ?? '', url: req.url ?? '', key, body });
      const stored = key === undefined ? undefined : answers.get(key);
      if (stored !== undefined) {
        res.writeHead(201, { 'content-type': 'application/json', 'idempotent-replayed': 'true', 'x-upstream': 'yes' });
        res.end(stored);
        return;
      }
      upstream.charges++;
      const answer = JSON.stringify({ charge: upstream.charges, body });
      if (key !== undefined) answers.set(key, answer);
      res.writeHead(201, { 'content-type': 'application/json', 'x-upstream': 'yes' });
      res.end(answer);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  upstream.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  upstream.close = () =>
    new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    });
  cleanups.push(upstream.close);
  return upstream;
}

async function proxyTo(upstream: Upstream, options: Omit<Parameters<typeof startFaultProxy>[0], 'target'>): Promise<FaultProxy> {
  const proxy = await startFaultProxy({ target: upstream.url, ...options });
  cleanups.push(proxy.close);
  return proxy;
}

const pay = { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"amount":100}' };
const fast = { minDelayMs: 5, maxDelayMs: 20 };

describe('startFaultProxy', () => {
  it('listens on loopback and forwards untouched requests (method, path, query, headers, body)', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: [] });
    expect(proxy.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    const res = await fetch(`${proxy.url}/payments?x=1`, { ...pay, headers: { ...pay.headers, 'idempotency-key': 'k1' } });
    expect(res.status).toBe(201);
    expect(res.headers.get('x-upstream')).toBe('yes');
    expect(await res.json()).toEqual({ charge: 1, body: '{"amount":100}' });
    expect(upstream.received).toEqual([{ method: 'POST', url: '/payments?x=1', key: 'k1', body: '{"amount":100}' }]);
    expect(proxy.stats).toMatchObject({ requests: 1, forwarded: 1, none: 1 });
  });

  it('drop-response: the upstream commits, the client gets no answer', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: ['drop-response'] });
    await expect(fetch(proxy.url, pay)).rejects.toThrow(TypeError);
    expect(upstream.charges).toBe(1);
    expect(proxy.stats['drop-response']).toBe(1);
  });

  it('delay: the answer arrives late', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: [{ fault: 'delay', ms: 300 }] });
    const started = performance.now();
    const res = await fetch(proxy.url, pay);
    expect(res.status).toBe(201);
    expect(performance.now() - started).toBeGreaterThanOrEqual(290);
    expect(proxy.stats.delay).toBe(1);
  });

  it('fail-503: answered before forwarding, with Retry-After; the upstream never sees it', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: [{ fault: 'fail-503', retryAfter: 7 }, 'fail-503'], retryAfter: 2 });
    const a = await fetch(proxy.url, pay);
    const b = await fetch(proxy.url, pay);
    expect([a.status, a.headers.get('retry-after')]).toEqual([503, '7']);
    expect([b.status, b.headers.get('retry-after')]).toEqual([503, '2']);
    expect(upstream.received).toHaveLength(0);
    expect(proxy.stats).toMatchObject({ requests: 2, forwarded: 0, 'fail-503': 2 });
  });

  it('retry-upstream: sends the request upstream twice and returns the second answer', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: ['retry-upstream', 'retry-upstream'] });
    const keyed = await fetch(proxy.url, { ...pay, headers: { ...pay.headers, 'idempotency-key': 'k2' } });
    expect(keyed.headers.get('idempotent-replayed')).toBe('true');
    expect(await keyed.json()).toEqual({ charge: 1, body: '{"amount":100}' });
    // Without a key the upstream cannot tell: the effect happens twice.
    const unkeyed = await fetch(proxy.url, pay);
    expect(await unkeyed.json()).toEqual({ charge: 3, body: '{"amount":100}' });
    expect(upstream.received).toHaveLength(4);
    expect(proxy.stats).toMatchObject({ forwarded: 4, 'retry-upstream': 2 });
  });

  it('passes the request and its index to a plan function', async () => {
    const upstream = await startUpstream();
    const calls: [string, string, string, number][] = [];
    const proxy = await proxyTo(upstream, {
      faults: (request: FaultRequest, n: number) => {
        calls.push([request.method, request.url, request.body.toString(), n]);
        return request.url === '/down' ? { fault: 'fail-503', retryAfter: 0 } : undefined;
      },
    });
    expect((await fetch(`${proxy.url}/up`, pay)).status).toBe(201);
    expect((await fetch(`${proxy.url}/down`, pay)).status).toBe(503);
    expect(calls).toEqual([
      ['POST', '/up', '{"amount":100}', 0],
      ['POST', '/down', '{"amount":100}', 1],
    ]);
  });

  it('draws faults reproducibly from a seed', async () => {
    const upstream = await startUpstream();
    const plan = { probabilities: { 'fail-503': 0.5 }, seed: 42 };
    const run = async (seed: number) => {
      const proxy = await proxyTo(upstream, { faults: { ...plan, seed } });
      const statuses: number[] = [];
      for (let i = 0; i < 20; i++) statuses.push((await fetch(proxy.url, pay)).status);
      return statuses;
    };
    const a = await run(42);
    const b = await run(42);
    const c = await run(7);
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    expect(a.filter((s) => s === 503).length).toBeGreaterThan(3);
    expect(a.filter((s) => s === 201).length).toBeGreaterThan(3);
  });

  it('rejects impossible probabilities, and answers 500 for an unknown fault', async () => {
    const upstream = await startUpstream();
    await expect(startFaultProxy({ target: upstream.url, faults: { probabilities: { delay: 0.7, 'fail-503': 0.7 } } })).rejects.toThrow(
      ConfigError,
    );
    const proxy = await proxyTo(upstream, { faults: ['explode' as 'delay'] });
    const res = await fetch(proxy.url, pay);
    expect(res.status).toBe(500);
    expect(await res.text()).toMatch(/unknown fault/);
    expect(upstream.received).toHaveLength(0);
  });

  it('answers 502 when the upstream is unreachable', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: [] });
    await upstream.close();
    expect((await fetch(proxy.url, pay)).status).toBe(502);
  });

  it('closes cleanly, even with a delayed answer pending', async () => {
    const upstream = await startUpstream();
    const proxy = await startFaultProxy({ target: upstream.url, faults: [{ fault: 'delay', ms: 10_000 }] });
    const pending = fetch(proxy.url, pay).catch((e: unknown) => e);
    while (upstream.charges === 0) await new Promise((r) => setTimeout(r, 5));
    const started = performance.now();
    await proxy.close();
    expect(performance.now() - started).toBeLessThan(2000);
    expect(await pending).toBeInstanceOf(TypeError);
    await expect(fetch(proxy.url, pay)).rejects.toThrow(TypeError);
  });
});

describe('oncely/client through the fault proxy', () => {
  it('a dropped response is retried with the same key and replayed: charged once', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: ['drop-response'] });
    const res = await createClient(fast).fetch(`${proxy.url}/payments`, pay);
    expect(res.status).toBe(201);
    expect(res.attempts).toBe(2);
    expect(res.replayed).toBe(true);
    expect(upstream.charges).toBe(1);
    expect(upstream.received.map((r) => r.key)).toEqual([res.key, res.key]);
  });

  it('an answer delayed past the attempt timeout is retried and replayed: charged once', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: [{ fault: 'delay', ms: 2500 }] });
    const started = performance.now();
    const res = await createClient({ ...fast, attemptTimeoutMs: 300 }).fetch(`${proxy.url}/payments`, pay);
    expect(performance.now() - started).toBeLessThan(2000);
    expect(res.attempts).toBe(2);
    expect(res.replayed).toBe(true);
    expect(upstream.charges).toBe(1);
    expect(proxy.stats.delay).toBe(1);
  });

  it('a 503 from the proxy is retried after its Retry-After; the upstream sees one request', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: ['fail-503', 'fail-503'], retryAfter: 0 });
    const res = await createClient(fast).fetch(`${proxy.url}/payments`, pay);
    expect(res.status).toBe(201);
    expect(res.attempts).toBe(3);
    expect(res.replayed).toBe(false);
    expect(upstream.received).toHaveLength(1);
    expect(upstream.received[0]?.key).toBe(res.key);
  });

  it('a load balancer retrying upstream costs nothing when the key is there', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: ['retry-upstream'] });
    const res = await createClient(fast).fetch(`${proxy.url}/payments`, pay);
    expect(res.attempts).toBe(1);
    expect(res.replayed).toBe(true);
    expect(upstream.charges).toBe(1);
  });

  it('gives up with ClientRequestError when every response is dropped, keeping the key to resume', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, { faults: () => 'drop-response' });
    const error = (await createClient({ ...fast, retries: 2 })
      .fetch(`${proxy.url}/payments`, pay)
      .catch((e: unknown) => e)) as ClientRequestError;
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error.attempts).toBe(3);
    expect(upstream.charges).toBe(1);
    // Resuming later with the same key learns the outcome without a second charge.
    const direct = await createClient(fast).fetch(`${upstream.url}/payments`, pay, { key: error.key! });
    expect(direct.replayed).toBe(true);
    expect(upstream.charges).toBe(1);
  });

  it('survives a seeded storm of faults: every payment charged exactly once', async () => {
    const upstream = await startUpstream();
    const proxy = await proxyTo(upstream, {
      faults: { probabilities: { 'drop-response': 0.2, 'fail-503': 0.2, 'retry-upstream': 0.1, delay: 0.1 }, seed: 2026 },
      delayMs: 1500,
      retryAfter: 0,
    });
    const client = createClient({ ...fast, retries: 10, attemptTimeoutMs: 500 });
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        client.fetch(`${proxy.url}/payments`, { ...pay, body: JSON.stringify({ amount: i }) }),
      ),
    );
    expect(results.every((r) => r.status === 201)).toBe(true);
    expect(upstream.charges).toBe(10);
    const faults = proxy.stats['drop-response'] + proxy.stats['fail-503'] + proxy.stats['retry-upstream'] + proxy.stats.delay;
    expect(faults).toBeGreaterThan(0);
  });
});
