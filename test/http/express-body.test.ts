/**
 * Express body parsing around oncely: whichever parser ran (body-parser 1 in
 * Express 4, body-parser 2 in Express 5) and wherever it is mounted, the
 * fingerprint covers the real body, the handler sees it, and oncely never
 * reads a stream a parser already consumed.
 */
import type { AddressInfo } from 'node:net';
import { createServer, type Server } from 'node:http';
import express from 'express';
import express4 from 'express4';
import { idempotency } from 'oncely/express';
import { memoryStore } from 'oncely/stores/memory';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

type Express = typeof express;
type ParserKind = 'json' | 'urlencoded' | 'text' | 'raw';
type Placement = 'before' | 'after' | 'route' | 'route-before';

/** An Express version and the body-parser its parsers come from. */
const FLAVOURS: Record<string, { app: Express; parsers: Express }> = {
  'express5 + body-parser 2': { app: express, parsers: express },
  'express4 + body-parser 1': { app: express4 as unknown as Express, parsers: express4 as unknown as Express },
  'express4 + body-parser 2': { app: express4 as unknown as Express, parsers: express },
};

/** Two bodies of each kind, and what a handler shows of the first one. */
const BODIES: Record<ParserKind, { type: string; one: string; other: string; seen: unknown }> = {
  json: { type: 'application/json', one: '{"amount":1}', other: '{"amount":2}', seen: { amount: 1 } },
  urlencoded: { type: 'application/x-www-form-urlencoded', one: 'amount=1', other: 'amount=2', seen: { amount: '1' } },
  text: { type: 'text/plain', one: 'pay one', other: 'pay two', seen: 'pay one' },
  raw: { type: 'application/octet-stream', one: 'bytes-1', other: 'bytes-2', seen: 'bytes-1' },
};

function parser(parsers: Express, kind: ParserKind) {
  // body-parser 1 warns when `extended` is left out.
  return kind === 'urlencoded' ? parsers.urlencoded({ extended: false }) : parsers[kind]();
}

// What the handler saw, as JSON: text and bytes as a string (oncely reads non-JSON, non-form bodies as a Buffer).
function shown(body: unknown): unknown {
  if (Buffer.isBuffer(body)) return body.toString('utf8');
  if (body !== null && typeof body === 'object') return { ...body };
  return body === undefined ? '(undefined)' : body;
}

interface App {
  url: string;
  runs: () => number;
  close: () => Promise<void>;
}

async function listen(app: (req: never, res: never) => void): Promise<{ url: string; server: Server }> {
  const server = createServer(app as never);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, server };
}

async function start(flavour: { app: Express; parsers: Express }, kind: ParserKind, placement: Placement): Promise<App> {
  let runs = 0;
  const app = flavour.app();
  const oncely = idempotency({ store: memoryStore(), scope: false, required: false });
  const handler = (req: express.Request, res: express.Response) => {
    runs++;
    res.status(201).json({ run: runs, body: shown(req.body) });
  };
  const body = parser(flavour.parsers, kind);
  switch (placement) {
    case 'before':
      app.use(body);
      app.use(oncely);
      app.post('/payments', handler);
      break;
    case 'after':
      app.use(oncely);
      app.use(body);
      app.post('/payments', handler);
      break;
    case 'route':
      app.use(oncely);
      app.post('/payments', body, handler);
      break;
    case 'route-before':
      app.post('/payments', body, oncely, handler);
      break;
  }
  const { url, server } = await listen(app as never);
  return {
    url,
    runs: () => runs,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

let n = 0;
const newKey = () => `body-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;

async function post(url: string, type: string, body: string, key?: string) {
  const res = await fetch(`${url}/payments`, {
    method: 'POST',
    headers: { 'content-type': type, ...(key === undefined ? {} : { 'idempotency-key': key }) },
    body,
  });
  const text = await res.text();
  return { status: res.status, replayed: res.headers.get('idempotent-replayed'), text, json: () => JSON.parse(text) };
}

for (const [flavourName, flavour] of Object.entries(FLAVOURS)) {
  for (const kind of Object.keys(BODIES) as ParserKind[]) {
    for (const placement of ['before', 'after', 'route', 'route-before'] as const) {
      describe(`${flavourName}: ${kind} parser mounted ${placement} oncely`, () => {
        const b = BODIES[kind];
        let app: App;
        beforeAll(async () => {
          app = await start(flavour, kind, placement);
        });
        afterAll(() => app.close());

        it('the handler sees the body; the same key and body replay without running again', async () => {
          const key = newKey();
          const first = await post(app.url, b.type, b.one, key);
          expect(first.status).toBe(201);
          expect(first.json().body).toEqual(b.seen);
          const runs = app.runs();
          const again = await post(app.url, b.type, b.one, key);
          expect(again.status).toBe(201);
          expect(again.replayed).toBe('true');
          expect(again.text).toBe(first.text);
          expect(app.runs()).toBe(runs);
        });

        it('the same key with another body is refused with 422', async () => {
          const key = newKey();
          expect((await post(app.url, b.type, b.one, key)).status).toBe(201);
          const runs = app.runs();
          const other = await post(app.url, b.type, b.other, key);
          expect(other.status).toBe(422);
          expect(other.json().type).toBe('https://oncely.dev/problems/key-reused');
          expect(app.runs()).toBe(runs);
        });

        it('a keyless POST (required: false) still has its body', async () => {
          const r = await post(app.url, b.type, b.one);
          expect(r.status).toBe(201);
          expect(r.replayed).toBeNull();
          expect(r.json().body).toEqual(b.seen);
        });
      });
    }
  }
}

describe('a parser mounted before oncely that skips the content type', () => {
  for (const [flavourName, flavour] of Object.entries(FLAVOURS)) {
    it(`${flavourName}: oncely still reads and fingerprints the body (a JSON parser, a text body)`, async () => {
      let seen: unknown;
      const app = flavour.app();
      // body-parser 1 leaves `req.body = {}` without reading; body-parser 2 leaves it undefined.
      app.use(flavour.parsers.json());
      app.use(idempotency({ store: memoryStore(), scope: false }));
      app.post('/payments', (req, res) => {
        seen = shown(req.body);
        res.status(201).send('ok');
      });
      const { url, server } = await listen(app as never);
      try {
        const key = newKey();
        expect((await post(url, 'text/plain', 'one', key)).status).toBe(201);
        expect(seen).toBe('one');
        expect((await post(url, 'text/plain', 'one', key)).replayed).toBe('true');
        expect((await post(url, 'text/plain', 'two', key)).status).toBe(422);
      } finally {
        server.closeAllConnections();
        server.close();
      }
    });
  }
});

describe('a req.body set before oncely without reading the stream', () => {
  it('is never overwritten; the fingerprint still covers the bytes sent', async () => {
    let seen: unknown;
    const app = express();
    app.use((req, _res, next) => {
      req.body = { preset: true };
      next();
    });
    app.use(idempotency({ store: memoryStore(), scope: false }));
    app.post('/payments', (req, res) => {
      seen = req.body;
      res.status(201).send('ok');
    });
    const { url, server } = await listen(app as never);
    try {
      const key = newKey();
      expect((await post(url, 'application/json', '{"a":1}', key)).status).toBe(201);
      expect(seen).toEqual({ preset: true });
      expect((await post(url, 'application/json', '{"a":2}', key)).status).toBe(422);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });
});
