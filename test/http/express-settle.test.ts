/**
 * Every idempotent Express request ends its claim: stored, released, completed
 * with a marker, or left to its lease when the client is gone. Never renewed
 * forever. Short leases (300 ms), so "after the lease" is quick to reach.
 */
import type { AddressInfo } from 'node:net';
import { createServer, request as httpRequest, type Server } from 'node:http';
import express from 'express';
import express4 from 'express4';
import { type IdempotencyStore, recordId } from 'oncely';
import { HttpIdempotency } from '../../src/http/core.js';
import { idempotency } from 'oncely/express';
import { memoryStore } from 'oncely/stores/memory';
import { afterEach, describe, expect, it, vi } from 'vitest';

type Express = typeof express;
const VERSIONS: Record<string, Express> = { express5: express, express4: express4 as unknown as Express };

const LEASE_MS = 300;
const SCOPE = 'acct';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let n = 0;
const newKey = () => `settle-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;

interface App {
  url: string;
  store: IdempotencyStore;
  runs: () => number;
}

const servers: Server[] = [];
afterEach(async () => {
  vi.restoreAllMocks();
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

/**
 * An app with oncely (lease 300 ms, 1 KiB stored at most) in front of one
 * POST handler, given the number of its run (1, 2, …).
 */
async function start(
  factory: Express,
  handler: (run: number, req: express.Request, res: express.Response, next: express.NextFunction) => unknown,
  options: Record<string, unknown> = {},
): Promise<App> {
  let runs = 0;
  const store = (options.store as IdempotencyStore | undefined) ?? memoryStore();
  const app = factory();
  app.use(idempotency({ store, scope: () => SCOPE, leaseMs: LEASE_MS, maxStoredBytes: 1024, ...options }));
  app.post('/payments', (req, res, next) => handler(++runs, req, res, next));
  const server = createServer(app);
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, store, runs: () => runs };
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/**
 * POST with a key through node:http, which tolerates a reset connection:
 * answers the response, or `undefined` when the connection broke. With
 * `abortAfterMs` the client hangs up after that long.
 */
function post(url: string, key: string, abortAfterMs?: number): Promise<Answer | undefined> {
  return new Promise((resolve) => {
    const target = new URL(`${url}/payments`);
    const req = httpRequest(
      {
        host: target.hostname,
        port: target.port,
        path: target.pathname,
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        res.on('error', () => resolve(undefined));
        res.on('aborted', () => resolve(undefined));
      },
    );
    req.on('error', () => resolve(undefined));
    req.on('close', () => resolve(undefined));
    if (abortAfterMs !== undefined) setTimeout(() => req.destroy(), abortAfterMs);
    req.end('{"amount":1}');
  });
}

async function record(app: App, key: string) {
  return app.store.get(recordId(key, SCOPE));
}

/** Retry the key until it is no longer in flight (or the time runs out). */
async function retryUntilSettled(app: App, key: string, withinMs: number): Promise<Answer> {
  const until = Date.now() + withinMs;
  for (;;) {
    const answer = await post(app.url, key);
    if (answer === undefined) throw new Error('the retry got no answer');
    const inFlight = answer.status === 409 && answer.body.includes('/in-flight');
    if (!inFlight || Date.now() > until) return answer;
    await sleep(50);
  }
}

const problemType = (answer: Answer) => (JSON.parse(answer.body) as { type: string }).type;

for (const [version, factory] of Object.entries(VERSIONS)) {
  describe(`${version}: every claim ends`, () => {
    it('a response streamed past maxStoredBytes that then fails through next(err) completes with the marker, never runs again', async () => {
      const app = await start(factory, (_run, _req, res, next) => {
        res.status(201).setHeader('content-type', 'text/plain');
        res.write('x'.repeat(2048));
        setTimeout(() => next(new Error('failed mid-stream')), 20);
      });
      const key = newKey();
      await post(app.url, key);
      await sleep(LEASE_MS + 300);
      expect((await record(app, key))?.state).toBe('completed');
      const retry = await post(app.url, key);
      expect(retry?.status).toBe(409);
      expect(problemType(retry!)).toBe('https://oncely.dev/problems/completed-not-replayable');
      expect(app.runs()).toBe(1);
    });

    it('a handler that never answers, whose client hangs up: the lease lapses and the key runs again', async () => {
      const app = await start(factory, (run, _req, res) => {
        if (run > 1) res.status(201).json({ run });
        // The first run never answers.
      });
      const key = newKey();
      expect(await post(app.url, key, 200)).toBeUndefined();
      // Not released: the handler may still answer; its lease decides.
      expect((await record(app, key))?.state).toBe('in_progress');
      const retry = await retryUntilSettled(app, key, LEASE_MS + 700);
      expect(retry.status).toBe(201);
      expect(JSON.parse(retry.body)).toEqual({ run: 2 });
      expect(app.runs()).toBe(2);
    });

    it('a client that hangs up before the claim is won, to a handler that never answers: the key runs again after the lease', async () => {
      const inner = memoryStore();
      const slowClaim: IdempotencyStore['claim'] = async (id, input) => {
        await sleep(150);
        return inner.claim(id, input);
      };
      const store = new Proxy(inner, {
        get: (target, name, receiver) => {
          if (name === 'claim') return slowClaim;
          const value = Reflect.get(target, name, receiver);
          return typeof value === 'function' ? value.bind(target) : value;
        },
      });
      const app = await start(
        factory,
        (run, _req, res) => {
          if (run > 1) res.status(201).json({ run });
        },
        { store },
      );
      const key = newKey();
      expect(await post(app.url, key, 50)).toBeUndefined();
      const retry = await retryUntilSettled(app, key, 150 + LEASE_MS + 700);
      expect(retry.status).toBe(201);
      expect(app.runs()).toBe(2);
    });

    it('a client that hangs up while a slow handler runs: the late 201 is stored and replayed, the handler ran once', async () => {
      const app = await start(factory, (run, _req, res) => {
        setTimeout(() => res.status(201).json({ run }), 150);
      });
      const key = newKey();
      expect(await post(app.url, key, 50)).toBeUndefined();
      await sleep(300);
      expect((await record(app, key))?.state).toBe('completed');
      const retry = await post(app.url, key);
      expect(retry?.status).toBe(201);
      expect(retry?.headers['idempotent-replayed']).toBe('true');
      expect(JSON.parse(retry!.body)).toEqual({ run: 1 });
      expect(app.runs()).toBe(1);
    });

    it('res.writeHead and res.end written directly are stored and replayed', async () => {
      const app = await start(factory, (run, _req, res) => {
        res.writeHead(201, { 'content-type': 'text/plain', location: `/payments/${run}` });
        res.end(`paid ${run}`);
      });
      const key = newKey();
      expect((await post(app.url, key))?.status).toBe(201);
      const retry = await post(app.url, key);
      expect(retry).toMatchObject({ status: 201, body: 'paid 1' });
      expect(retry?.headers.location).toBe('/payments/1');
      expect(retry?.headers['idempotent-replayed']).toBe('true');
      expect(app.runs()).toBe(1);
    });

    it('res.flushHeaders() then a later res.end: the response is stored and replayed', async () => {
      const app = await start(factory, (run, _req, res) => {
        res.status(201).setHeader('content-type', 'text/plain');
        res.flushHeaders();
        setTimeout(() => res.end(`paid ${run}`), 50);
      });
      const key = newKey();
      expect((await post(app.url, key))?.body).toBe('paid 1');
      const retry = await post(app.url, key);
      expect(retry).toMatchObject({ status: 201, body: 'paid 1' });
      expect(retry?.headers['idempotent-replayed']).toBe('true');
      expect(app.runs()).toBe(1);
    });

    it('res.destroy() by the handler: the claim is released, a retry runs again', async () => {
      const app = await start(factory, (run, _req, res) => {
        if (run === 1) res.destroy();
        else res.status(201).json({ run });
      });
      const key = newKey();
      expect(await post(app.url, key)).toBeUndefined();
      const retry = await retryUntilSettled(app, key, LEASE_MS + 700);
      expect(retry.status).toBe(201);
      expect(app.runs()).toBe(2);
    });

    it('res.destroy() after streaming started: completed with the marker, never runs again', async () => {
      const app = await start(factory, (_run, _req, res) => {
        res.status(201);
        res.write('x'.repeat(2048));
        setTimeout(() => res.destroy(), 20);
      });
      const key = newKey();
      await post(app.url, key);
      await sleep(LEASE_MS + 300);
      expect((await record(app, key))?.state).toBe('completed');
      const retry = await post(app.url, key);
      expect(retry?.status).toBe(409);
      expect(problemType(retry!)).toBe('https://oncely.dev/problems/completed-not-replayable');
      expect(app.runs()).toBe(1);
    });

    it('a handler that never answers while its client stays connected keeps its claim (it may still be running)', async () => {
      const app = await start(factory, () => {});
      const key = newKey();
      const first = post(app.url, key, LEASE_MS * 3);
      await sleep(LEASE_MS * 2);
      expect((await record(app, key))?.state).toBe('in_progress');
      const during = await post(app.url, key);
      expect(during?.status).toBe(409);
      expect(problemType(during!)).toBe('https://oncely.dev/problems/in-flight');
      await first;
      expect(app.runs()).toBe(1);
    });

    it('an outcome policy that throws: the response is still sent and the claim released', async () => {
      const app = await start(
        factory,
        (run, _req, res) => {
          res.status(201).json({ run });
        },
        {
          outcome: () => {
            throw new Error('broken policy');
          },
          logger: { warn: () => {} },
        },
      );
      const key = newKey();
      const first = await post(app.url, key);
      expect(first).toMatchObject({ status: 201, body: '{"run":1}' });
      expect(await record(app, key)).toBeNull();
      expect((await post(app.url, key))?.body).toBe('{"run":2}');
    });

    it('a finish that rejects (against its contract): the response is still sent, no unhandled rejection', async () => {
      const warnings: string[] = [];
      const app = await start(
        factory,
        (run, _req, res) => {
          res.status(201).json({ run });
        },
        { logger: { warn: (message: string) => warnings.push(message) } },
      );
      vi.spyOn(HttpIdempotency.prototype, 'finish').mockRejectedValueOnce(new Error('unexpected'));
      const key = newKey();
      const first = await post(app.url, key);
      expect(first).toMatchObject({ status: 201, body: '{"run":1}' });
      expect(warnings.some((w) => w.includes('unexpected'))).toBe(true);
      // Nothing was stored: the claim was released, so the key runs again.
      expect((await post(app.url, key))?.body).toBe('{"run":2}');
    });
  });
}

describe('express4: an async handler that rejects (Express 4 never catches it)', () => {
  it('never answers; once the client hangs up, the lease lapses and the key runs again', async () => {
    const app = await start(express4 as unknown as Express, (run, _req, res) => {
      const work = (async () => {
        await sleep(10);
        if (run === 1) throw new Error('rejected');
        res.status(201).json({ run });
      })();
      // Express 4 ignores the promise: the rejection reaches nobody. Handled
      // here only so that the test runner does not report it.
      work.catch(() => {});
      return work;
    });
    const key = newKey();
    expect(await post(app.url, key, 200)).toBeUndefined();
    const retry = await retryUntilSettled(app, key, LEASE_MS + 700);
    expect(retry.status).toBe(201);
    expect(JSON.parse(retry.body)).toEqual({ run: 2 });
    expect(app.runs()).toBe(2);
  });
});
