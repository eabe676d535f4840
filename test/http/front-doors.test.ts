/**
 * DESIGN 4, row by row, through every front door (Express 5 and 4, Fastify,
 * fetch with a plain handler and with Hono, Koa, NestJS on its Express and
 * Fastify platforms) on the memory and SQLite stores.
 */
import { request as httpRequest } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { IdempotencyStore } from 'oncely';
import { memoryStore } from 'oncely/stores/memory';
import { sqliteStore } from 'oncely/stores/sqlite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DOORS, type Door, startApp, type TestApp } from './apps.js';

const dir = mkdtempSync(join(tmpdir(), 'oncely-doors-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const STORES: Record<string, () => IdempotencyStore> = {
  memory: () => memoryStore(),
  sqlite: () => sqliteStore({ database: new Database(join(dir, `${Math.random().toString(36).slice(2)}.db`)) }),
};

let n = 0;
const newKey = () => `key-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;

async function post(
  app: TestApp,
  key: string | undefined,
  body: unknown = { amount: 100, currency: 'EUR' },
  headers: Record<string, string> = {},
) {
  const res = await fetch(`${app.url}/payments`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }), ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text, json: () => JSON.parse(text) };
}

/** A raw request, for what fetch refuses to send (several fields, non-ASCII bytes). */
function rawPost(app: TestApp, keyHeader: string | string[]) {
  return new Promise<{ status: number; body: string; type: string | undefined }>((resolve, reject) => {
    const url = new URL(`${app.url}/payments`);
    const req = httpRequest(
      { host: url.hostname, port: url.port, path: url.pathname, method: 'POST', headers: { 'content-type': 'application/json' } },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, type: res.headers['content-type'] }));
      },
    );
    req.setHeader('idempotency-key', keyHeader);
    req.on('error', reject);
    req.end(JSON.stringify({ amount: 1 }));
  });
}

function expectProblem(r: { status: number; headers: Headers; json: () => unknown }, status: number, slug: string) {
  expect(r.status).toBe(status);
  expect(r.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const problem = r.json() as { type: string; title: string; status: number; detail: string };
  expect(problem.type).toBe(`https://oncely.dev/problems/${slug}`);
  expect(problem.status).toBe(status);
  expect(problem.title.length).toBeGreaterThan(0);
  expect(problem.detail.length).toBeGreaterThan(0);
  return problem;
}

/** A store that answers nothing, or fails: the engine must answer 503 and run nothing. */
function brokenStore(mode: 'hang' | 'fail'): IdempotencyStore {
  const never = () => (mode === 'hang' ? new Promise<never>(() => {}) : Promise.reject(new Error('ECONNREFUSED')));
  return {
    name: `broken-${mode}`,
    capabilities: { nativeTtl: false, serverClock: false, shared: true },
    claim: never,
    renew: never,
    complete: never,
    release: never,
    get: never,
    delete: never,
    purgeExpired: never,
    close: async () => {},
  };
}

for (const door of DOORS) {
  for (const [storeName, makeStore] of Object.entries(STORES)) {
    describe(`${door} on ${storeName}`, () => {
      let app: TestApp;
      let waiting: TestApp;
      beforeAll(async () => {
        app = await startApp(door, { store: makeStore(), leaseMs: 5_000 });
        waiting = await startApp(door, { store: makeStore(), wait: { timeoutMs: 10_000, pollMs: 20 } });
      });
      afterAll(async () => {
        await app.close();
        await waiting.close();
      });

      it('runs the handler exactly once among 100 concurrent requests with one new key; the rest get 409 or the replay', async () => {
        const key = newKey();
        const before = app.executions();
        const results = await Promise.all(Array.from({ length: 100 }, () => post(app, key, { amount: 7 }, { 'x-delay': '300' })));
        expect(app.executions() - before).toBe(1);
        const statuses = results.map((r) => r.status);
        expect(statuses.filter((s) => s !== 201 && s !== 409)).toEqual([]);
        const fresh = results.filter((r) => r.status === 201 && r.headers.get('idempotent-replayed') === null);
        expect(fresh.length).toBe(1);
        // Duplicates that arrive after the first finished get its replay; the others a conflict.
        for (const r of results.filter((x) => x.status === 201)) expect(r.text).toBe(fresh[0]!.text);
        expect(statuses.filter((s) => s === 409).length).toBeGreaterThan(0);
        for (const r of results.filter((x) => x.status === 409)) {
          expectProblem(r, 409, 'in-flight');
          expect(Number(r.headers.get('retry-after'))).toBeGreaterThan(0);
        }
      });

      it('with the wait option, all 100 concurrent duplicates get the one answer', async () => {
        const key = newKey();
        const before = waiting.executions();
        const results = await Promise.all(
          Array.from({ length: 100 }, () => post(waiting, key, { amount: 7 }, { 'x-delay': '200' })),
        );
        expect(waiting.executions() - before).toBe(1);
        expect(results.map((r) => r.status)).toEqual(Array(100).fill(201));
        expect(new Set(results.map((r) => r.text)).size).toBe(1);
        expect(results.filter((r) => r.headers.get('idempotent-replayed') === 'true').length).toBe(99);
      });

      it('refuses a missing key with 400 and does not run the handler', async () => {
        const before = app.executions();
        const r = await post(app, undefined);
        const problem = expectProblem(r, 400, 'key-missing');
        expect(problem.title).toBe('Idempotency-Key is missing');
        expect(app.executions()).toBe(before);
      });

      it('refuses malformed keys with 400 saying why, running nothing', async () => {
        const before = app.executions();
        for (const bad of ['', 'k'.repeat(256), 'a,b', '"unterminated', 'has space']) {
          const r = await post(app, bad);
          expectProblem(r, 400, 'key-malformed');
        }
        const several = await rawPost(app, ['one', 'two']);
        expect(several.status).toBe(400);
        expect(several.type).toMatch(/problem\+json/);
        const nonAscii = await rawPost(app, 'caf\u00e9');
        expect(nonAscii.status).toBe(400);
        expect(JSON.parse(nonAscii.body).detail).toMatch(/ASCII/);
        expect(app.executions()).toBe(before);
        // A 255-character key and the quoted form are fine.
        expect((await post(app, 'k'.repeat(255))).status).toBe(201);
        expect((await post(app, `"${newKey()}"`)).status).toBe(201);
      });

      it('replays a completed request: status, allowlisted headers and body, with Idempotent-Replayed', async () => {
        const key = newKey();
        const first = await post(app, key, { amount: 42, currency: 'EUR' });
        expect(first.status).toBe(201);
        expect(first.headers.get('idempotent-replayed')).toBeNull();
        const before = app.executions();
        const second = await post(app, key, { currency: 'EUR', amount: 42 });
        expect(app.executions()).toBe(before);
        expect(second.status).toBe(201);
        expect(second.text).toBe(first.text);
        expect(second.headers.get('idempotent-replayed')).toBe('true');
        expect(second.headers.get('location')).toBe(first.headers.get('location'));
        expect(second.headers.get('content-type')).toBe(first.headers.get('content-type'));
        expect(second.headers.get('set-cookie')).toBeNull();
        expect(second.headers.get('x-request-id')).toBeNull();
        expect(second.headers.get('x-payment-batch')).toBeNull();
        expect(Number(second.headers.get('content-length'))).toBe(Buffer.byteLength(second.text));
      });

      it('answers 422 when the key is reused with a different body, and changes nothing', async () => {
        const key = newKey();
        const first = await post(app, key, { amount: 1 });
        const before = app.executions();
        const other = await post(app, key, { amount: 2 });
        expectProblem(other, 422, 'key-reused');
        expect(app.executions()).toBe(before);
        const again = await post(app, key, { amount: 1 });
        expect(again.text).toBe(first.text);
      });

      it('answers 409 with Retry-After while the first request runs, then replays', async () => {
        const key = newKey();
        const first = post(app, key, { amount: 3 }, { 'x-delay': '300' });
        await new Promise((r) => setTimeout(r, 80));
        const during = await post(app, key, { amount: 3 });
        expectProblem(during, 409, 'in-flight');
        expect(during.headers.get('retry-after')).toBe('1');
        const done = await first;
        const after = await post(app, key, { amount: 3 });
        expect(after.text).toBe(done.text);
        expect(after.headers.get('idempotent-replayed')).toBe('true');
      });

      it('releases on 5xx and on a thrown error, so that a retry runs again', async () => {
        const key = newKey();
        const before = app.executions();
        const failed = await post(app, key, { amount: 5 }, { 'x-status': '503' });
        expect(failed.status).toBe(503);
        const thrown = await post(app, key, { amount: 5 }, { 'x-throw': '1' });
        expect(thrown.status).toBe(500);
        const ok = await post(app, key, { amount: 5 });
        expect(ok.status).toBe(201);
        expect(app.executions() - before).toBe(3);
        const replay = await post(app, key, { amount: 5 });
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
      });

      it('stores 4xx answers except the retryable ones (429 is released)', async () => {
        const key = newKey();
        const before = app.executions();
        expect((await post(app, key, { amount: 9 }, { 'x-status': '429' })).status).toBe(429);
        expect((await post(app, key, { amount: 9 }, { 'x-status': '400' })).status).toBe(400);
        const replay = await post(app, key, { amount: 9 });
        expect(replay.status).toBe(400);
        expect(replay.headers.get('idempotent-replayed')).toBe('true');
        expect(app.executions() - before).toBe(2);
      });

      it('never re-runs a response too large to store: the retry is sent to the Location', async () => {
        const key = newKey();
        const first = await post(app, key, { amount: 1 }, { 'x-big': String(2 * 1024 * 1024) });
        expect(first.status).toBe(201);
        expect(first.text.length).toBeGreaterThan(2 * 1024 * 1024);
        const before = app.executions();
        const retry = await fetch(`${app.url}/payments`, {
          method: 'POST',
          redirect: 'manual',
          headers: { 'content-type': 'application/json', 'idempotency-key': key },
          body: JSON.stringify({ amount: 1 }),
        });
        expect(app.executions()).toBe(before);
        expect(retry.status).toBe(303);
        expect(retry.headers.get('location')).toBe(first.headers.get('location'));
      });

      it('passes other methods through untouched', async () => {
        const r = await fetch(`${app.url}/payments`);
        expect(r.status).toBe(200);
      });

      it('scopes keys: one key in two scopes is two operations', async () => {
        const scoped = await startApp(door, {
          store: makeStore(),
          scope: ((req: unknown) => headerOf(req, 'x-account')) as never,
        });
        try {
          const key = newKey();
          const a = await post(scoped, key, { amount: 1 }, { 'x-account': 'a' });
          const b = await post(scoped, key, { amount: 1 }, { 'x-account': 'b' });
          expect(a.status).toBe(201);
          expect(b.status).toBe(201);
          expect(b.headers.get('idempotent-replayed')).toBeNull();
          expect(scoped.executions()).toBe(2);
          const missing = await post(scoped, newKey(), { amount: 1 });
          expectProblem(missing, 400, 'scope-missing');
        } finally {
          await scoped.close();
        }
      });
    });
  }

  describe(`${door}: store outage and strategies`, () => {
    for (const mode of ['hang', 'fail'] as const) {
      it(`answers 503 with Retry-After when the store ${mode === 'hang' ? 'is too slow' : 'is down'}, running nothing`, async () => {
        const app = await startApp(door, { store: brokenStore(mode), storeTimeoutMs: 200 });
        try {
          const started = Date.now();
          const r = await post(app, newKey());
          expect(Date.now() - started).toBeLessThan(2_000);
          expectProblem(r, 503, 'store-unavailable');
          expect(r.headers.get('retry-after')).toBe('1');
          expect(app.executions()).toBe(0);
        } finally {
          await app.close();
        }
      });
    }

    it('fails open only when asked to', async () => {
      const app = await startApp(door, { store: brokenStore('fail'), failOpen: true });
      try {
        expect((await post(app, newKey())).status).toBe(201);
        expect(app.executions()).toBe(1);
      } finally {
        await app.close();
      }
    });

    it('replays a header named in replayHeaders, but never a per-request one even when named', async () => {
      const app = await startApp(door, { store: memoryStore(), replayHeaders: ['X-Payment-Batch', 'X-Request-Id'] });
      try {
        const key = newKey();
        const first = await post(app, key);
        expect(first.headers.get('x-payment-batch')).toMatch(/^batch-/);
        const second = await post(app, key);
        expect(second.headers.get('idempotent-replayed')).toBe('true');
        expect(second.headers.get('x-payment-batch')).toBe(first.headers.get('x-payment-batch'));
        expect(second.headers.get('x-request-id')).toBeNull();
        expect(second.headers.get('set-cookie')).toBeNull();
        expect(app.executions()).toBe(1);
      } finally {
        await app.close();
      }
    });

    it('database-constraint strategy: a duplicate is told it was already processed', async () => {
      const app = await startApp(door, { store: memoryStore(), strategy: 'constraint' });
      try {
        const key = newKey();
        expect((await post(app, key)).status).toBe(201);
        const dup = await post(app, key);
        expectProblem(dup, 409, 'already-processed');
        expect(app.executions()).toBe(1);
      } finally {
        await app.close();
      }
    });

    it('hash-based keys: without a header, identical requests within the window are one operation', async () => {
      const app = await startApp(door, { store: memoryStore(), keyFromFingerprint: { windowMs: 300 } });
      try {
        const first = await post(app, undefined, { amount: 11 });
        const second = await post(app, undefined, { amount: 11 });
        expect(first.status).toBe(201);
        expect(second.headers.get('idempotent-replayed')).toBe('true');
        expect((await post(app, undefined, { amount: 12 })).headers.get('idempotent-replayed')).toBeNull();
        expect(app.executions()).toBe(2);
        await new Promise((r) => setTimeout(r, 400));
        expect((await post(app, undefined, { amount: 11 })).headers.get('idempotent-replayed')).toBeNull();
        expect(app.executions()).toBe(3);
      } finally {
        await app.close();
      }
    });
  });
}

function headerOf(req: unknown, name: string): string | undefined {
  if (req instanceof Request) return req.headers.get(name) ?? undefined;
  const headers = (req as { headers: Record<string, string | undefined> }).headers;
  return headers[name];
}

export type { Door };
