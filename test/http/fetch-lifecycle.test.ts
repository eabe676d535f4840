/**
 * oncely/fetch: how a run settles when the handler's Response fails, when
 * the handler throws or answers something else, and when the client leaves;
 * through a plain fetch handler and through Hono, both on @hono/node-server.
 */
import { request as httpRequest, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createAdaptorServer } from '@hono/node-server';
import { Hono } from 'hono';
import { withIdempotency } from 'oncely/fetch';
import { memoryStore } from 'oncely/stores/memory';
import { afterEach, describe, expect, it } from 'vitest';

const LEASE = 300;
const MAX_STORED = 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const newKey = () => `fe-${Date.now()}-${Math.random().toString(36).slice(2)}`;
const bytes = (n: number) => new TextEncoder().encode('x'.repeat(n));

/** A body that sends `head` bytes, then fails. */
function failingBody(head: number): ReadableStream<Uint8Array> {
  let sent = false;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (!sent && head > 0) {
        sent = true;
        controller.enqueue(bytes(head));
        return;
      }
      await sleep(10);
      controller.error(new Error('upstream dropped'));
    },
  });
}

/** Runs of the handler: in all, and per key. */
class Runs {
  total = 0;
  readonly #perKey = new Map<string, number>();
  /** Count a run of `key`; answers true for its first. */
  first(key: string | null): boolean {
    this.total++;
    const n = (this.#perKey.get(key ?? '') ?? 0) + 1;
    this.#perKey.set(key ?? '', n);
    return n === 1;
  }
}

/**
 * What the handler answers, steered by `x-mode`. Every mode but `ok` acts
 * on the first run of a key only, so a retry that runs again answers 201.
 */
async function answer(runs: Runs, headers: { get(name: string): string | null | undefined }): Promise<Response> {
  const mode = headers.get('x-mode');
  const first = runs.first(headers.get('idempotency-key') ?? null);
  const run = runs.total;
  if (!first || !mode || mode === 'ok') return Response.json({ id: `pay_${run}` }, { status: 201 });
  switch (mode) {
    case 'body-error':
      return new Response(failingBody(100), { status: 201, headers: { 'content-type': 'text/plain' } });
    case 'body-error-at-once':
      return new Response(failingBody(0), { status: 201 });
    case 'big-then-error':
      return new Response(failingBody(MAX_STORED * 4), { status: 201, headers: { location: '/exports/e_1' } });
    case 'throw':
      throw new Error('card network down');
    case 'not-a-response':
      return { status: 201 } as unknown as Response;
    case 'late':
      await sleep(200);
      return Response.json({ id: `pay_${run}` }, { status: 201 });
    case 'never':
      return new Promise<Response>(() => {});
    default:
      throw new Error(`unknown mode ${mode}`);
  }
}

interface TestApp {
  url: string;
  runs(): number;
  close(): Promise<void>;
}

async function start(door: 'plain' | 'hono'): Promise<TestApp> {
  const runs = new Runs();
  const options = { store: memoryStore(), scope: false as const, leaseMs: LEASE, maxStoredBytes: MAX_STORED };
  let fetch: (request: Request) => Promise<Response>;
  if (door === 'plain') {
    fetch = withIdempotency(async (request: Request) => answer(runs, request.headers), options);
  } else {
    const app = new Hono();
    app.post('/payments', (c) => answer(runs, c.req.raw.headers));
    app.onError((_error, c) => c.json({ error: 'boom' }, 500));
    fetch = withIdempotency(app.fetch, options);
  }
  const server = createAdaptorServer({ fetch }) as Server;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url,
    runs: () => runs.total,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  error?: string;
}

/** POST with a key; `leaveAfter` closes the connection after that many ms. */
function post(app: TestApp, key: string, mode?: string, leaveAfter?: number) {
  return new Promise<Answer>((resolve) => {
    const target = new URL('/payments', app.url);
    let got: Answer = { status: 0, headers: {}, body: '' };
    const req = httpRequest(
      {
        host: target.hostname,
        port: target.port,
        path: target.pathname,
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key, ...(mode ? { 'x-mode': mode } : {}) },
      },
      (res) => {
        got = { status: res.statusCode ?? 0, headers: res.headers, body: '' };
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          got.body += chunk;
        });
        res.on('end', () => resolve(got));
        res.on('error', (e) => resolve({ ...got, error: e.message }));
        res.on('close', () => resolve({ ...got, error: got.error ?? 'closed' }));
      },
    );
    req.on('error', (e) => resolve({ ...got, error: e.message }));
    req.end(JSON.stringify({ amount: 100 }));
    if (leaveAfter !== undefined) setTimeout(() => req.destroy(), leaveAfter);
  });
}

const problemType = (a: Answer) => (JSON.parse(a.body) as { type: string }).type.replace('https://oncely.dev/problems/', '');

let app: TestApp | undefined;
afterEach(async () => {
  await app?.close();
  app = undefined;
});

for (const door of ['plain', 'hono'] as const) {
  describe(`oncely/fetch (${door}): failures and clients that leave`, () => {
    it('a Response body that fails while it is read for storage: 500, released, the retry runs again', async () => {
      app = await start(door);
      for (const mode of ['body-error', 'body-error-at-once']) {
        const key = newKey();
        const before = app.runs();
        const first = await post(app, key, mode);
        expect(first.status).toBe(500);
        const retry = await post(app, key);
        expect(retry.status).toBe(201);
        expect(retry.headers['idempotent-replayed']).toBeUndefined();
        expect(app.runs() - before).toBe(2);
      }
    });

    it('an oversized body that fails after the marker was stored: the marker stands, never run again', async () => {
      app = await start(door);
      const key = newKey();
      const first = await post(app, key, 'big-then-error');
      expect(first.status).toBe(201);
      expect(first.error).toBeDefined();
      await sleep(LEASE + 100);
      const retry = await post(app, key);
      expect(retry.status).toBe(303);
      expect(retry.headers.location).toBe('/exports/e_1');
      expect(problemType(retry)).toBe('completed-not-replayable');
      expect(app.runs()).toBe(1);
    });

    it('a handler that throws is released: the retry runs again', async () => {
      app = await start(door);
      const key = newKey();
      expect((await post(app, key, 'throw')).status).toBe(500);
      expect((await post(app, key)).status).toBe(201);
      expect(app.runs()).toBe(2);
    });

    it('a client that leaves while the handler runs: the handler still finishes and its answer is stored', async () => {
      app = await start(door);
      const key = newKey();
      await post(app, key, 'late', 50);
      await sleep(LEASE + 300);
      const retry = await post(app, key);
      expect(retry.status).toBe(201);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(JSON.parse(retry.body)).toEqual({ id: 'pay_1' });
      expect(app.runs()).toBe(1);
    });

    it('a client that leaves while the handler never answers: not in flight after the lease', async () => {
      app = await start(door);
      const key = newKey();
      await post(app, key, 'never', 50);
      await sleep(LEASE + 300);
      const retry = await post(app, key);
      expect(retry.status).toBe(201);
      expect(app.runs()).toBe(2);
    });
  });
}

describe('oncely/fetch called directly', () => {
  const request = (key: string, mode: string) =>
    new Request('http://x/payments', {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': key, 'x-mode': mode },
      body: '{"amount":1}',
    });

  it('rethrows what failed (the body error, or a TypeError for a non-Response) after releasing the key', async () => {
    const runs = new Runs();
    const released: string[] = [];
    const fetch = withIdempotency((req: Request) => answer(runs, req.headers), {
      store: memoryStore(),
      scope: false,
      hooks: { released: (e) => released.push(e.reason) },
    });
    await expect(fetch(request('k1', 'body-error'))).rejects.toThrow('upstream dropped');
    await expect(fetch(request('k2', 'not-a-response'))).rejects.toThrow(TypeError);
    expect(released).toHaveLength(2);
    // Released: the same keys run again.
    expect((await fetch(request('k1', 'ok'))).status).toBe(201);
    expect((await fetch(request('k2', 'ok'))).status).toBe(201);
    expect(runs.total).toBe(4);
  });

  it('a handler that answers something else than a Response is released: the retry runs again (plain, on a server)', async () => {
    app = await start('plain');
    const key = newKey();
    expect((await post(app, key, 'not-a-response')).status).toBe(500);
    expect((await post(app, key)).status).toBe(201);
    expect(app.runs()).toBe(2);
  });
});
