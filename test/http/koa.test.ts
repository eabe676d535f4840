/**
 * oncely/koa beyond the shared front-door suite (test/http/front-doors.test.ts
 * runs the same checks as every door on the `koa` row): bodies with and
 * without a parser, what Koa sends for each kind of body, streams settled by
 * their first byte, hijacked responses, throws, clients that leave, and the
 * handler's view of its run.
 */
import { createServer, request as httpRequest, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import Koa, { type Context, type Middleware } from 'koa';
import { type IdempotencyStore, REPLAYED_HEADER } from 'oncely';
import { type IdempotencyContext, idempotency, idempotencyOf, type KoaIdempotencyOptions } from 'oncely/koa';
import { memoryStore } from 'oncely/stores/memory';
import { afterEach, describe, expect, it } from 'vitest';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let n = 0;
const newKey = () => `koa-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;

interface Started {
  url: string;
  store: IdempotencyStore;
  runs: number;
  close(): Promise<void>;
}

const servers: Server[] = [];
afterEach(async () => {
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});

/** A Koa app: `before` runs ahead of oncely (a parser, an error handler), `handler` after it. */
async function start(
  handler: (ctx: Context, run: () => number) => unknown,
  options: Partial<KoaIdempotencyOptions> = {},
  before: Middleware[] = [],
): Promise<Started> {
  const app = new Koa();
  app.silent = true;
  const store = (options.store as IdempotencyStore | undefined) ?? memoryStore();
  const started = { url: '', store, runs: 0, close: async () => {} };
  for (const m of before) app.use(m);
  app.use(idempotency({ scope: false, leaseMs: 5_000, ...options, store } as KoaIdempotencyOptions));
  app.use(async (ctx) => {
    await handler(ctx, () => ++started.runs);
  });
  const server = createServer(app.callback());
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  started.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return started;
}

async function post(url: string, key: string | undefined, body: string | undefined = '{"amount":1}', headers: Record<string, string> = {}) {
  const res = await fetch(`${url}/payments`, {
    method: 'POST',
    redirect: 'manual',
    headers: { 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }), ...headers },
    body,
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

describe('oncely/koa: request bodies', () => {
  it('reads the body itself when no parser ran, and leaves it parsed in ctx.request.body', async () => {
    const seen: unknown[] = [];
    const app = await start((ctx, run) => {
      run();
      seen.push((ctx.request as { body?: unknown }).body);
      ctx.status = 201;
      ctx.body = { ok: true };
    });
    const key = newKey();
    expect((await post(app.url, key, '{"amount":5,"currency":"EUR"}')).status).toBe(201);
    // The same JSON in another key order and spacing is the same request.
    const again = await post(app.url, key, '{ "currency": "EUR", "amount": 5 }');
    expect(again.headers.get(REPLAYED_HEADER)).toBe('true');
    expect(seen).toEqual([{ amount: 5, currency: 'EUR' }]);
    // URL-encoded and other bodies.
    await post(app.url, newKey(), 'a=1&b=two', { 'content-type': 'application/x-www-form-urlencoded' });
    await post(app.url, newKey(), 'plain', { 'content-type': 'text/plain' });
    expect(seen[1]).toEqual({ a: '1', b: 'two' });
    expect(Buffer.isBuffer(seen[2]) && (seen[2] as Buffer).toString()).toBe('plain');
  });

  it('fingerprints what a parser before it left in ctx.request.body', async () => {
    const parser: Middleware = async (ctx, next) => {
      const chunks: Buffer[] = [];
      for await (const chunk of ctx.req) chunks.push(chunk as Buffer);
      (ctx.request as { body?: unknown }).body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
      await next();
    };
    const app = await start(
      (ctx, run) => {
        ctx.status = 201;
        ctx.body = { id: run(), got: (ctx.request as { body?: unknown }).body };
      },
      {},
      [parser],
    );
    const key = newKey();
    const first = await post(app.url, key, '{"amount":7}');
    expect(JSON.parse(first.text)).toEqual({ id: 1, got: { amount: 7 } });
    expect((await post(app.url, key, '{"amount":8}')).status).toBe(422);
    expect((await post(app.url, key, '{"amount":7}')).text).toBe(first.text);
    expect(app.runs).toBe(1);
  });

  it('answers 400 for invalid JSON and 413 beyond maxBodyBytes, before any claim', async () => {
    const app = await start((_ctx, run) => run(), { maxBodyBytes: 64 });
    const invalid = await post(app.url, newKey(), '{"amount":');
    expect(invalid.status).toBe(400);
    expect(JSON.parse(invalid.text).type).toBe('https://oncely.dev/problems/body-invalid');
    const large = await post(app.url, newKey(), JSON.stringify({ pad: 'x'.repeat(100) }));
    expect(large.status).toBe(413);
    expect(large.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(app.runs).toBe(0);
  });
});

describe('oncely/koa: what is stored is what Koa sends', () => {
  it('replays an object body byte for byte as Koa serialised it, with its status and content type', async () => {
    const app = await start((ctx, run) => {
      ctx.status = 201;
      ctx.set('Location', `/payments/${run()}`);
      ctx.body = { id: 'pay', nested: { list: [1, 'two', null] }, unicode: 'é' };
    });
    const key = newKey();
    const first = await post(app.url, key);
    const second = await post(app.url, key);
    expect(second.status).toBe(201);
    expect(second.text).toBe(first.text);
    expect(second.text).toBe(JSON.stringify({ id: 'pay', nested: { list: [1, 'two', null] }, unicode: 'é' }));
    expect(second.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(second.headers.get('location')).toBe('/payments/1');
    expect(second.headers.get(REPLAYED_HEADER)).toBe('true');
    expect(app.runs).toBe(1);
  });

  it('replays a Buffer body and a status without a body (Koa sends the status message)', async () => {
    const app = await start((ctx, run) => {
      run();
      if (ctx.get('x-kind') === 'buffer') {
        ctx.status = 200;
        ctx.body = Buffer.from([0xff, 0x00, 0x10]);
      } else {
        ctx.status = 202;
      }
    });
    const k1 = newKey();
    const bin = await fetch(`${app.url}/payments`, { method: 'POST', headers: { 'idempotency-key': k1, 'x-kind': 'buffer' } });
    const binBytes = Buffer.from(await bin.arrayBuffer());
    const binAgain = await fetch(`${app.url}/payments`, { method: 'POST', headers: { 'idempotency-key': k1, 'x-kind': 'buffer' } });
    expect(Buffer.from(await binAgain.arrayBuffer()).equals(binBytes)).toBe(true);
    expect(binAgain.headers.get('content-type')).toBe('application/octet-stream');
    const k2 = newKey();
    const accepted = await post(app.url, k2);
    const acceptedAgain = await post(app.url, k2);
    expect(accepted.text).toBe('Accepted');
    expect(acceptedAgain.status).toBe(202);
    expect(acceptedAgain.text).toBe('Accepted');
    expect(acceptedAgain.headers.get('content-type')).toBe('text/plain; charset=utf-8');
    expect(app.runs).toBe(2);
  });

  it('a 204 replays as a 204 without a body', async () => {
    const app = await start((ctx, run) => {
      run();
      ctx.status = 204;
    });
    const key = newKey();
    expect((await post(app.url, key)).status).toBe(204);
    const again = await post(app.url, key);
    expect(again.status).toBe(204);
    expect(again.text).toBe('');
    expect(again.headers.get(REPLAYED_HEADER)).toBe('true');
    expect(app.runs).toBe(1);
  });

  it('a body that cannot be serialised releases the run (Koa answers 500)', async () => {
    const app = await start((ctx, run) => {
      run();
      ctx.status = 201;
      ctx.body = { amount: 10n };
    });
    const key = newKey();
    expect((await post(app.url, key)).status).toBe(500);
    expect((await post(app.url, key)).status).toBe(500);
    expect(app.runs).toBe(2);
  });

  it('a body over maxStoredBytes is sent and completes with a marker: the retry goes to its Location', async () => {
    const app = await start(
      (ctx, run) => {
        ctx.status = 201;
        ctx.set('Location', `/payments/${run()}`);
        ctx.body = 'x'.repeat(2_000);
      },
      { maxStoredBytes: 1_000 },
    );
    const key = newKey();
    expect((await post(app.url, key)).text.length).toBe(2_000);
    const retry = await post(app.url, key);
    expect(retry.status).toBe(303);
    expect(retry.headers.get('location')).toBe('/payments/1');
    expect(app.runs).toBe(1);
  });
});

describe('oncely/koa: throws, streams, hijacked responses and clients that leave', () => {
  it('a throw from downstream releases the run and reaches the error handler before it', async () => {
    const errors: unknown[] = [];
    const handler: Middleware = async (ctx, next) => {
      try {
        await next();
      } catch (error) {
        errors.push(error);
        ctx.status = (error as { status?: number }).status ?? 500;
        ctx.body = { error: (error as Error).message };
      }
    };
    const app = await start(
      (ctx, run) => {
        run();
        if (ctx.get('x-fail') === 'throw') throw new Error('boom');
        if (ctx.get('x-fail') === 'http') ctx.throw(404, 'no such account');
        ctx.status = 201;
        ctx.body = { ok: true };
      },
      {},
      [handler],
    );
    const key = newKey();
    expect((await post(app.url, key, undefined, { 'x-fail': 'throw' })).status).toBe(500);
    // ctx.throw is a throw too: released, so a retry runs again.
    const missing = await post(app.url, key, undefined, { 'x-fail': 'http' });
    expect(missing.status).toBe(404);
    expect(JSON.parse(missing.text)).toEqual({ error: 'no such account' });
    expect((await post(app.url, key)).status).toBe(201);
    expect((await post(app.url, key)).headers.get(REPLAYED_HEADER)).toBe('true');
    expect(app.runs).toBe(3);
    expect(errors).toHaveLength(2);
  });

  it('without an error handler, Koa answers a throw with its own 500 and the run is released', async () => {
    const app = await start((ctx, run) => {
      run();
      if (ctx.get('x-fail')) throw new Error('boom');
      ctx.status = 201;
      ctx.body = 'ok';
    });
    const key = newKey();
    expect((await post(app.url, key, undefined, { 'x-fail': '1' })).status).toBe(500);
    expect((await post(app.url, key)).status).toBe(201);
    expect(app.runs).toBe(2);
  });

  it('a stream body settles at its first byte with a marker: never run again', async () => {
    const app = await start((ctx, run) => {
      ctx.status = 201;
      ctx.set('Location', `/exports/${run()}`);
      ctx.type = 'text/csv';
      ctx.body = Readable.from(['a,b\n', '1,2\n']);
    });
    const key = newKey();
    const first = await post(app.url, key);
    expect(first.text).toBe('a,b\n1,2\n');
    await sleep(50);
    const retry = await post(app.url, key);
    expect(retry.status).toBe(303);
    expect(retry.headers.get('location')).toBe('/exports/1');
    expect(app.runs).toBe(1);
  });

  it('a web ReadableStream body (Koa 3) settles the same way', async () => {
    const app = await start((ctx, run) => {
      run();
      ctx.status = 201;
      ctx.body = new ReadableStream({
        start(controller) {
          controller.enqueue(new TextEncoder().encode('chunk'));
          controller.close();
        },
      });
    });
    const key = newKey();
    expect((await post(app.url, key)).text).toBe('chunk');
    await sleep(50);
    const retry = await post(app.url, key);
    expect(retry.status).toBe(409);
    expect(JSON.parse(retry.text).type).toBe('https://oncely.dev/problems/completed-not-replayable');
    expect(app.runs).toBe(1);
  });

  it('a stream that fails before its first byte releases the run: a retry runs again', async () => {
    const app = await start((ctx, run) => {
      const count = run();
      ctx.status = 201;
      ctx.body =
        count === 1
          ? new Readable({
              read() {
                this.destroy(new Error('disk gone'));
              },
            })
          : 'second time';
    });
    const key = newKey();
    await post(app.url, key).catch(() => undefined);
    await sleep(50);
    const retry = await post(app.url, key);
    expect(retry.status).toBe(201);
    expect(retry.text).toBe('second time');
    expect(app.runs).toBe(2);
  });

  it('a hijacked response (ctx.respond = false) settles when its head goes out', async () => {
    const app = await start((ctx, run) => {
      run();
      ctx.respond = false;
      // Written after the middleware chain is done, around Koa.
      setTimeout(() => {
        ctx.res.writeHead(201, { location: '/raw/1', 'content-type': 'text/plain' });
        ctx.res.end('raw');
      }, 30);
    });
    const key = newKey();
    expect((await post(app.url, key)).text).toBe('raw');
    await sleep(50);
    const retry = await post(app.url, key);
    expect(retry.status).toBe(303);
    expect(retry.headers.get('location')).toBe('/raw/1');
    expect(app.runs).toBe(1);
  });

  it('a client that hangs up mid-handler: the answer that still comes is stored', async () => {
    let done!: () => void;
    let began!: () => void;
    const finished = new Promise<void>((r) => (done = r));
    const started = new Promise<void>((r) => (began = r));
    const app = await start(async (ctx, run) => {
      const count = run();
      began();
      await sleep(300);
      ctx.status = 201;
      ctx.body = { count };
      setTimeout(done, 50);
    });
    const key = newKey();
    const url = new URL(`${app.url}/payments`);
    const req = httpRequest({
      host: url.hostname,
      port: url.port,
      path: url.pathname,
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': key },
    });
    req.on('error', () => undefined);
    req.end('{"amount":1}');
    await started;
    req.destroy();
    await finished;
    const retry = await post(app.url, key);
    expect(retry.status).toBe(201);
    expect(retry.headers.get(REPLAYED_HEADER)).toBe('true');
    expect(JSON.parse(retry.text)).toEqual({ count: 1 });
    expect(app.runs).toBe(1);
  });
});

describe('oncely/koa: the handler, routes and settings', () => {
  it('gives the handler its run in ctx.state.idempotency and idempotencyOf(ctx), and lets it decide', async () => {
    const seen: Array<{ state: IdempotencyContext | undefined; helper: IdempotencyContext | undefined }> = [];
    const app = await start((ctx, run) => {
      run();
      seen.push({ state: ctx.state.idempotency, helper: idempotencyOf(ctx) });
      ctx.state.idempotency?.decide('release');
      ctx.status = 201;
      ctx.body = 'released on purpose';
    });
    const key = newKey();
    await post(app.url, key);
    await post(app.url, key);
    expect(app.runs).toBe(2);
    expect(seen[0]!.state).toBe(seen[0]!.helper);
    expect(seen[0]!.state).toMatchObject({ key, takeover: false });
    expect(seen[0]!.state!.id).toMatch(/^[0-9a-f]{64}$/);
  });

  it('with(): per-route settings, and one claim when mounted globally and on the route', async () => {
    const app = new Koa();
    app.silent = true;
    const oncely = idempotency({ store: memoryStore(), scope: false, wait: { timeoutMs: 5_000, pollMs: 20 } });
    let runs = 0;
    app.use(oncely);
    app.use(oncely.with({ ttlMs: 200 }));
    app.use(async (ctx) => {
      runs++;
      await sleep(100);
      ctx.status = 201;
      ctx.body = { runs };
    });
    const server = createServer(app.callback());
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const key = newKey();
    const both = await Promise.all([post(url, key), post(url, key)]);
    expect(both.map((r) => r.status)).toEqual([201, 201]);
    expect(runs).toBe(1);
    expect(() => oncely.with({ ttlMs: 0 })).toThrow(/ttlMs/);
    expect(() => oncely.with({ ttl: 5 } as never)).toThrow(/unknown settings/);
  });

  it('a route-level middleware uses its own TTL', async () => {
    const app = new Koa();
    app.silent = true;
    const oncely = idempotency({ store: memoryStore(), scope: false });
    let runs = 0;
    app.use(oncely.with({ ttlMs: 1_500 }));
    app.use((ctx) => {
      runs++;
      ctx.status = 201;
      ctx.body = 'ok';
    });
    const server = createServer(app.callback());
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const key = newKey();
    await post(url, key);
    expect((await post(url, key)).headers.get(REPLAYED_HEADER)).toBe('true');
    await sleep(2_000);
    expect((await post(url, key)).headers.get(REPLAYED_HEADER)).toBeNull();
    expect(runs).toBe(2);
  });
});
