import { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { ClientRequestError, ConfigError, OncelyError } from '../errors/index.js';
import {
  type RetryState,
  OncelyResponse,
  backoffDelay,
  createClient,
  deriveKey,
  idempotentFetch,
  isNetworkError,
  parseRetryAfter,
} from './index.js';

// ---------------------------------------------------------------- test server

interface Seen {
  n: number;
  method: string;
  url: string;
  /** The Idempotency-Key received, if any. */
  key: string | undefined;
  /** How many Idempotency-Key fields were sent (must never exceed 1). */
  keyFields: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

type Handler = (seen: Seen, res: ServerResponse, req: IncomingMessage) => unknown;

interface TestServer {
  url: string;
  seen: Seen[];
  close(): Promise<void>;
}

const servers: TestServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

/** A real node:http server on 127.0.0.1 that records every request it receives. */
async function serve(handler: Handler): Promise<TestServer> {
  const seen: Seen[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const keyFields = req.rawHeaders.filter((h, i) => i % 2 === 0 && h.toLowerCase() === 'idempotency-key').length;
      const header = req.headers['idempotency-key'];
      const record: Seen = {
        n: seen.length,
        method: req.method ?? '',
        url: req.url ?? '',
        key: Array.isArray(header) ? header.join(',') : header,
        keyFields,
        headers: req.headers,
        body: Buffer.concat(chunks),
      };
      seen.push(record);
      Promise.resolve(handler(record, res, req)).catch(() => res.destroy());
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const s: TestServer = {
    url: `http://127.0.0.1:${port}`,
    seen,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
  servers.push(s);
  return s;
}

function send(res: ServerResponse, status: number, body = '', headers: Record<string, string> = {}): void {
  if (res.destroyed) return;
  res.writeHead(status, { 'content-type': 'text/plain', ...headers });
  res.end(body);
}

function problem(res: ServerResponse, status: number, slug: string, headers: Record<string, string> = {}): void {
  send(
    res,
    status,
    JSON.stringify({ type: `https://oncely.dev/problems/${slug}`, title: slug, status }),
    { 'content-type': 'application/problem+json', ...headers },
  );
}

/** Answers `first` to the first `times` requests, then 200 "ok". */
function failing(times: number, first: (res: ServerResponse, seen: Seen) => void): Handler {
  return (seen, res) => (seen.n < times ? first(res, seen) : send(res, 200, 'ok'));
}

const fast = { minDelayMs: 5, maxDelayMs: 20 };
const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const post = (body = '{"amount":100}'): RequestInit => ({
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body,
});

// ---------------------------------------------------------------- keys

describe('keys', () => {
  it('makes one UUID v4 key per operation and sends it on every attempt', async () => {
    const server = await serve(failing(2, (res) => send(res, 503)));
    const res = await createClient(fast).fetch(`${server.url}/payments`, post());
    expect(res.status).toBe(200);
    expect(res.attempts).toBe(3);
    expect(res.key).toMatch(UUID_V4);
    expect(server.seen.map((s) => s.key)).toEqual([res.key, res.key, res.key]);
    expect(server.seen.every((s) => s.keyFields === 1)).toBe(true);
  });

  it('makes a new key for each operation', async () => {
    const server = await serve((_s, res) => send(res, 201));
    const client = createClient(fast);
    const a = await client.fetch(server.url, post());
    const b = await client.fetch(server.url, post());
    expect(a.key).not.toBe(b.key);
    expect(server.seen.map((s) => s.key)).toEqual([a.key, b.key]);
  });

  it.each([
    ['a Headers object', () => new Headers({ 'IDEMPOTENCY-KEY': 'caller-key-1' })],
    ['an array of pairs', () => [['idempotency-key', 'caller-key-1']] as [string, string][]],
    ['a record', () => ({ 'Idempotency-Key': 'caller-key-1' })],
    ['a record, odd case', () => ({ 'iDeMpOtEnCy-KeY': 'caller-key-1' })],
  ])("keeps the caller's own key given as %s, on every attempt", async (_name, headers) => {
    const server = await serve(failing(1, (res) => send(res, 503)));
    const res = await createClient(fast).fetch(server.url, { method: 'POST', headers: headers(), body: 'x' });
    expect(res.key).toBe('caller-key-1');
    expect(server.seen.map((s) => [s.key, s.keyFields])).toEqual([
      ['caller-key-1', 1],
      ['caller-key-1', 1],
    ]);
  });

  it('takes the key from options.key, and the header over options.key', async () => {
    const server = await serve((_s, res) => send(res, 200));
    const client = createClient(fast);
    const a = await client.fetch(server.url, { method: 'POST', body: 'x' }, { key: 'from-options' });
    const b = await client.fetch(
      server.url,
      { method: 'POST', body: 'x', headers: { 'idempotency-key': 'from-header' } },
      { key: 'from-options' },
    );
    expect([a.key, b.key]).toEqual(['from-options', 'from-header']);
    expect(server.seen.map((s) => s.key)).toEqual(['from-options', 'from-header']);
  });

  it('uses generateKey when given', async () => {
    const server = await serve((_s, res) => send(res, 200));
    const res = await createClient({ ...fast, generateKey: () => 'custom-key' }).fetch(server.url, post());
    expect(server.seen[0]?.key).toBe('custom-key');
    expect(res.key).toBe('custom-key');
  });

  it.each(['GET', 'PUT', 'DELETE'])('sends %s without a key and still retries it (idempotent by nature)', async (method) => {
    const server = await serve(failing(1, (res) => send(res, 503)));
    const res = await createClient(fast).fetch(server.url, { method });
    expect(res.status).toBe(200);
    expect(res.attempts).toBe(2);
    expect(res.key).toBeUndefined();
    expect(server.seen.map((s) => s.key)).toEqual([undefined, undefined]);
  });

  it('gives PATCH a key by default, and the methods named in keyMethods', async () => {
    const server = await serve((_s, res) => send(res, 200));
    const patch = await createClient(fast).fetch(server.url, { method: 'PATCH', body: '{}' });
    const put = await createClient({ ...fast, keyMethods: ['put'] }).fetch(server.url, { method: 'PUT', body: '{}' });
    expect(patch.key).toMatch(UUID_V4);
    expect(put.key).toMatch(UUID_V4);
    expect(server.seen.map((s) => s.key)).toEqual([patch.key, put.key]);
  });

  it('never retries a non-idempotent method sent without a key', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const res = await createClient({ ...fast, keyMethods: [] }).fetch(server.url, post());
    expect(res.status).toBe(503);
    expect(res.attempts).toBe(1);
    expect(server.seen).toHaveLength(1);
  });
});

// ---------------------------------------------------------------- retry table

describe('the retry table', () => {
  it.each([408, 425, 429, 500, 502, 503, 504])('retries %i with the same key', async (status) => {
    const server = await serve(failing(1, (res) => send(res, status)));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(200);
    expect(res.attempts).toBe(2);
    expect(server.seen).toHaveLength(2);
    expect(server.seen[1]?.key).toBe(server.seen[0]?.key);
  });

  it.each([400, 401, 403, 404, 422])('never retries %i: it is returned, not thrown', async (status) => {
    const server = await serve((_s, res) => send(res, status, 'nope'));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(status);
    expect(await res.text()).toBe('nope');
    expect(res.attempts).toBe(1);
    expect(server.seen).toHaveLength(1);
  });

  it('retries the in-flight 409 (oncely problem type) and gets the answer', async () => {
    const server = await serve(failing(2, (res) => problem(res, 409, 'in-flight')));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(200);
    expect(res.attempts).toBe(3);
    expect(new Set(server.seen.map((s) => s.key)).size).toBe(1);
  });

  it.each(['key-reused', 'already-processed'])('never retries a 409 of type %s, even with Retry-After', async (slug) => {
    const server = await serve((_s, res) => problem(res, 409, slug, { 'retry-after': '0' }));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(409);
    expect(res.attempts).toBe(1);
    // The body is still readable after the client inspected it.
    expect(((await res.json()) as { type: string }).type).toBe(`https://oncely.dev/problems/${slug}`);
    expect(server.seen).toHaveLength(1);
  });

  it('retries a 409 without a problem type when it carries Retry-After (another server saying "later")', async () => {
    const server = await serve(failing(1, (res) => send(res, 409, 'busy', { 'retry-after': '0' })));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(200);
    expect(res.attempts).toBe(2);
  });

  it('does not retry a plain 409 (a business conflict)', async () => {
    const server = await serve((_s, res) => send(res, 409, '{"error":"duplicate sku"}', { 'content-type': 'application/json' }));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(409);
    expect(res.attempts).toBe(1);
  });

  it('returns the last answer when the retries run out', async () => {
    const server = await serve((_s, res) => send(res, 503, 'still down'));
    const res = await createClient({ ...fast, retries: 2 }).fetch(server.url, post());
    expect(res.status).toBe(503);
    expect(await res.text()).toBe('still down');
    expect(res.attempts).toBe(3);
    expect(server.seen).toHaveLength(3);
  });

  it('makes a single attempt with retries: 0', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const res = await createClient({ ...fast, retries: 0 }).fetch(server.url, post());
    expect(res.attempts).toBe(1);
    expect(server.seen).toHaveLength(1);
  });
});

// ---------------------------------------------------------------- network errors and timeouts

describe('network errors and timeouts', () => {
  it('retries when the server drops the connection, with the same key', async () => {
    const server = await serve(failing(2, (res) => res.socket?.destroy()));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(200);
    expect(res.attempts).toBe(3);
    expect(new Set(server.seen.map((s) => s.key)).size).toBe(1);
  });

  it('throws ClientRequestError with key, attempts and cause when every attempt fails on the network', async () => {
    const server = await serve((_s, res) => res.socket?.destroy());
    const error = await createClient({ ...fast, retries: 2 })
      .fetch(server.url, post())
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error).toBeInstanceOf(OncelyError);
    const e = error as ClientRequestError;
    expect(e.code).toBe('ONCELY_CLIENT_REQUEST_FAILED');
    expect(e.reason).toBe('network');
    expect(e.attempts).toBe(3);
    expect(e.key).toMatch(UUID_V4);
    expect(e.key).toBe(server.seen[0]?.key);
    expect(isNetworkError(e.cause)).toBe(true);
    expect(server.seen).toHaveLength(3);
  });

  it('retries a refused connection and reports lastStatus of an earlier answer', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const url = server.url;
    let closed = false;
    const error = await createClient({
      ...fast,
      retries: 2,
      onRetry: async () => {
        if (!closed) {
          closed = true;
          await server.close(); // the next attempts are refused
        }
      },
    })
      .fetch(url, post())
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ClientRequestError);
    expect((error as ClientRequestError).reason).toBe('network');
    expect((error as ClientRequestError).lastStatus).toBe(503);
    expect((error as ClientRequestError).attempts).toBe(3);
  });

  it('retries an attempt that outlives attemptTimeoutMs', async () => {
    const server = await serve((seen, res) => {
      if (seen.n === 0) setTimeout(() => send(res, 200, 'late'), 1500);
      else send(res, 200, 'ok');
    });
    const states: RetryState[] = [];
    const started = performance.now();
    const res = await createClient({ ...fast, attemptTimeoutMs: 100, onRetry: (s) => void states.push(s) }).fetch(
      server.url,
      post(),
    );
    expect(await res.text()).toBe('ok');
    expect(res.attempts).toBe(2);
    expect(performance.now() - started).toBeLessThan(1000);
    expect(states.map((s) => s.reason)).toEqual(['timeout']);
    expect(server.seen[1]?.key).toBe(server.seen[0]?.key);
  });

  it('throws reason "timeout" (status 504) when every attempt times out', async () => {
    const server = await serve((_s, res) => setTimeout(() => send(res, 200), 500));
    const error = (await createClient({ ...fast, retries: 1, attemptTimeoutMs: 50 })
      .fetch(server.url, post())
      .catch((e: unknown) => e)) as ClientRequestError;
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error.reason).toBe('timeout');
    expect(error.status).toBe(504);
    expect(error.attempts).toBe(2);
  });

  it('does not retry a programming error (invalid URL) and wraps it', async () => {
    const error = (await createClient(fast)
      .fetch('http://exa mple.com:99999/', post())
      .catch((e: unknown) => e)) as ClientRequestError;
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error.reason).toBe('unexpected');
    expect(error.attempts).toBe(1);
  });
});

// ---------------------------------------------------------------- deadline and abort

describe('deadline and abort', () => {
  it('stops an attempt when the overall deadline passes, and throws reason "deadline"', async () => {
    const server = await serve((_s, res) => setTimeout(() => send(res, 200), 2000));
    const started = performance.now();
    const error = (await createClient({ ...fast, deadlineMs: 150 })
      .fetch(server.url, post())
      .catch((e: unknown) => e)) as ClientRequestError;
    const elapsed = performance.now() - started;
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error.reason).toBe('deadline');
    expect(error.attempts).toBe(1);
    expect(elapsed).toBeGreaterThanOrEqual(140);
    expect(elapsed).toBeLessThan(1500);
  });

  it('accepts the deadline as a Date', async () => {
    const server = await serve((_s, res) => setTimeout(() => send(res, 200), 2000));
    const error = (await createClient(fast)
      .fetch(server.url, post(), { deadline: new Date(Date.now() + 100) })
      .catch((e: unknown) => e)) as ClientRequestError;
    expect(error.reason).toBe('deadline');
  });

  it('returns the last answer when the next backoff would end past the deadline', async () => {
    const server = await serve((_s, res) => send(res, 503, 'down'));
    const started = performance.now();
    const res = await createClient({ minDelayMs: 1000, maxDelayMs: 1000, deadlineMs: 500 }).fetch(server.url, post());
    expect(res.status).toBe(503);
    expect(res.attempts).toBe(1);
    // No 1 s wait was started.
    expect(performance.now() - started).toBeLessThan(900);
  });

  it('keeps retrying until the deadline, then gives up', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const outcome = await createClient({ minDelayMs: 40, maxDelayMs: 40, retries: 100, deadlineMs: 300 })
      .fetch(server.url, post())
      .catch((e: unknown) => e);
    // Either no wait fitted before the deadline (the last 503 is returned), or
    // the deadline cut an attempt short (thrown, remembering the 503).
    let attempts: number;
    if (outcome instanceof ClientRequestError) {
      expect(outcome.reason).toBe('deadline');
      expect(outcome.lastStatus).toBe(503);
      attempts = outcome.attempts;
    } else {
      expect((outcome as OncelyResponse).status).toBe(503);
      attempts = (outcome as OncelyResponse).attempts;
    }
    // The deadline stopped it, not the 100 retries.
    expect(attempts).toBeGreaterThanOrEqual(2);
    expect(attempts).toBeLessThan(10);
    // (an attempt cut short may not have reached the server)
    expect(server.seen.length).toBeGreaterThanOrEqual(attempts - 1);
    expect(server.seen.length).toBeLessThanOrEqual(attempts);
  });

  it("rejects with the caller's abort reason mid-backoff, at once, without another attempt", async () => {
    const server = await serve((_s, res) => send(res, 503));
    const controller = new AbortController();
    const reason = new Error('the user closed the page');
    const started = performance.now();
    const outcome = createClient({ minDelayMs: 2000, maxDelayMs: 2000 }).fetch(
      server.url,
      { ...post(), signal: controller.signal },
      { onRetry: () => void setTimeout(() => controller.abort(reason), 30) },
    );
    await expect(outcome).rejects.toBe(reason);
    expect(performance.now() - started).toBeLessThan(1500);
    await new Promise((r) => setTimeout(r, 50));
    expect(server.seen).toHaveLength(1);
  });

  it("rejects with the caller's abort reason during an attempt", async () => {
    const server = await serve((_s, res) => setTimeout(() => send(res, 200), 2000));
    const signal = AbortSignal.timeout(100);
    const error = await createClient(fast)
      .fetch(server.url, { ...post(), signal })
      .catch((e: unknown) => e);
    expect((error as DOMException).name).toBe('TimeoutError');
    expect(error).toBe(signal.reason);
    expect(server.seen).toHaveLength(1);
  });

  it("keeps the caller's signal linked to the returned body, as fetch does", async () => {
    const server = await serve((_s, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('partial'); // and never ends
    });
    const controller = new AbortController();
    const res = await createClient({ ...fast, attemptTimeoutMs: 50 }).fetch(server.url, { signal: controller.signal });
    expect(res.status).toBe(200);
    // The attempt timeout bounded the wait for headers only: the body is still readable later.
    await new Promise((r) => setTimeout(r, 100));
    const reading = res.text();
    controller.abort(new Error('enough'));
    await expect(reading).rejects.toThrow('enough');
  });

  it('throws reason "deadline" when a network failure leaves no time for a retry', async () => {
    const server = await serve((_s, res) => res.socket?.destroy());
    const error = (await createClient({ minDelayMs: 500, maxDelayMs: 500, deadlineMs: 300 })
      .fetch(server.url, post())
      .catch((e: unknown) => e)) as ClientRequestError;
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error.reason).toBe('deadline');
    expect(error.attempts).toBe(1);
    expect(isNetworkError(error.cause)).toBe(true);
  });

  it('makes no attempt when the signal is already aborted', async () => {
    const server = await serve((_s, res) => send(res, 200));
    const controller = new AbortController();
    controller.abort();
    await expect(createClient(fast).fetch(server.url, { ...post(), signal: controller.signal })).rejects.toMatchObject({
      name: 'AbortError',
    });
    expect(server.seen).toHaveLength(0);
  });
});

// ---------------------------------------------------------------- Retry-After

describe('Retry-After', () => {
  it('waits exactly the delta-seconds, without jitter', async () => {
    const server = await serve(failing(1, (res) => send(res, 503, '', { 'retry-after': '1' })));
    const delays: number[] = [];
    const started = performance.now();
    const res = await createClient({ ...fast, onRetry: (s) => void delays.push(s.delayMs) }).fetch(server.url, post());
    expect(res.status).toBe(200);
    expect(delays).toEqual([1000]);
    expect(performance.now() - started).toBeGreaterThanOrEqual(990);
  });

  it('waits until an HTTP-date', async () => {
    // HTTP-dates have a resolution of one second: aim two seconds ahead, expect 1–2 s.
    const server = await serve(
      failing(1, (res) => send(res, 429, '', { 'retry-after': new Date(Date.now() + 2000).toUTCString() })),
    );
    const delays: number[] = [];
    const res = await createClient({ ...fast, onRetry: (s) => void delays.push(s.delayMs) }).fetch(server.url, post());
    expect(res.status).toBe(200);
    expect(delays).toHaveLength(1);
    expect(delays[0]).toBeGreaterThan(900);
    expect(delays[0]).toBeLessThanOrEqual(2000);
  });

  it('gives up and returns the answer when Retry-After exceeds maxRetryAfterMs', async () => {
    const server = await serve((_s, res) => send(res, 503, 'come back in a minute', { 'retry-after': '60' }));
    const started = performance.now();
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.status).toBe(503);
    expect(res.attempts).toBe(1);
    expect(await res.text()).toBe('come back in a minute');
    expect(performance.now() - started).toBeLessThan(2000);
  });

  it('honours a smaller maxRetryAfterMs', async () => {
    const server = await serve((_s, res) => send(res, 429, '', { 'retry-after': '1' }));
    const res = await createClient({ ...fast, maxRetryAfterMs: 500 }).fetch(server.url, post());
    expect(res.status).toBe(429);
    expect(res.attempts).toBe(1);
  });

  it('gives up when Retry-After ends past the deadline', async () => {
    const server = await serve((_s, res) => send(res, 503, '', { 'retry-after': '1' }));
    const started = performance.now();
    const res = await createClient({ ...fast, deadlineMs: 500 }).fetch(server.url, post());
    expect(res.status).toBe(503);
    expect(res.attempts).toBe(1);
    expect(performance.now() - started).toBeLessThan(900);
  });

  it('falls back to backoff when Retry-After is not understood', async () => {
    const server = await serve(failing(1, (res) => send(res, 503, '', { 'retry-after': 'soon' })));
    const delays: number[] = [];
    await createClient({ ...fast, onRetry: (s) => void delays.push(s.delayMs) }).fetch(server.url, post());
    expect(delays[0]).toBeGreaterThanOrEqual(5);
    expect(delays[0]).toBeLessThanOrEqual(20);
  });
});

// ---------------------------------------------------------------- bodies

describe('bodies', () => {
  const twoAttempts = () => serve(failing(1, (res) => send(res, 503)));

  it.each([
    ['a string', () => 'hello'],
    ['a Uint8Array', () => new TextEncoder().encode('hello')],
    ['an ArrayBuffer', () => new TextEncoder().encode('hello').buffer],
    ['a Blob', () => new Blob(['hello'])],
    ['URLSearchParams', () => new URLSearchParams({ a: '1', b: 'two' })],
  ])('replays %s identically on every attempt', async (_name, make) => {
    const server = await twoAttempts();
    const res = await createClient(fast).fetch(server.url, { method: 'POST', body: make() });
    expect(res.attempts).toBe(2);
    expect(server.seen[0]?.body.length).toBeGreaterThan(0);
    expect(server.seen[1]?.body.equals(server.seen[0]!.body)).toBe(true);
  });

  it('sends FormData with the same bytes and boundary on every attempt', async () => {
    const server = await twoAttempts();
    const form = new FormData();
    form.set('amount', '100');
    form.set('receipt', new Blob(['%PDF'], { type: 'application/pdf' }), 'r.pdf');
    await createClient(fast).fetch(server.url, { method: 'POST', body: form });
    const [a, b] = server.seen;
    expect(a?.headers['content-type']).toMatch(/^multipart\/form-data; boundary=/);
    expect(b?.headers['content-type']).toBe(a?.headers['content-type']);
    expect(b?.body.equals(a!.body)).toBe(true);
    expect(a?.body.toString()).toContain('%PDF');
  });

  it('snapshots a buffer: mutating it after the call does not change the retry', async () => {
    const server = await serve(failing(1, (res) => setTimeout(() => send(res, 503), 20)));
    const bytes = new TextEncoder().encode('hello');
    const pending = createClient(fast).fetch(server.url, { method: 'POST', body: bytes });
    await new Promise((r) => setTimeout(r, 5));
    bytes.fill(0);
    await pending;
    expect(server.seen.map((s) => s.body.toString())).toEqual(['hello', 'hello']);
  });

  it('never retries a ReadableStream body', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new TextEncoder().encode('streamed'));
        c.close();
      },
    });
    const res = await createClient(fast).fetch(server.url, { method: 'POST', body: stream });
    expect(res.status).toBe(503);
    expect(res.attempts).toBe(1);
    expect(res.key).toMatch(UUID_V4);
    expect(server.seen.map((s) => s.body.toString())).toEqual(['streamed']);
  });

  it('never retries a Node Readable body, and throws after one network failure', async () => {
    const server = await serve((_s, res) => res.socket?.destroy());
    const error = (await createClient(fast)
      .fetch(server.url, { method: 'POST', body: Readable.from([Buffer.from('a'), Buffer.from('b')]) })
      .catch((e: unknown) => e)) as ClientRequestError;
    expect(error).toBeInstanceOf(ClientRequestError);
    expect(error.attempts).toBe(1);
    expect(error.message).toMatch(/stream body/);
    expect(server.seen).toHaveLength(1);
    expect(server.seen[0]?.body.toString()).toBe('ab');
  });

  it('replays the body of a Request input', async () => {
    const server = await twoAttempts();
    const request = new Request(`${server.url}/orders`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-trace': 't1' },
      body: '{"sku":"A"}',
    });
    const res = await createClient(fast).fetch(request);
    expect(res.attempts).toBe(2);
    expect(server.seen.map((s) => [s.method, s.url, s.body.toString(), s.headers['x-trace']])).toEqual([
      ['POST', '/orders', '{"sku":"A"}', 't1'],
      ['POST', '/orders', '{"sku":"A"}', 't1'],
    ]);
    expect(server.seen[1]?.key).toBe(res.key);
  });
});

// ---------------------------------------------------------------- results and hooks

describe('results and hooks', () => {
  it('returns an OncelyResponse: a Response with key, attempts, replayed, url', async () => {
    const server = await serve((_s, res) =>
      send(res, 201, '{"id":"pay_1"}', { 'content-type': 'application/json', 'idempotent-replayed': 'true' }),
    );
    const res = await idempotentFetch(`${server.url}/payments?x=1`, post(), fast);
    expect(res).toBeInstanceOf(Response);
    expect(res).toBeInstanceOf(OncelyResponse);
    expect(res.status).toBe(201);
    expect(res.ok).toBe(true);
    expect(res.replayed).toBe(true);
    expect(res.attempts).toBe(1);
    expect(res.url).toBe(`${server.url}/payments?x=1`);
    expect(res.headers.get('content-type')).toBe('application/json');
    const copy = res.clone();
    expect(copy).toBeInstanceOf(OncelyResponse);
    expect([copy.key, copy.attempts, copy.replayed, copy.url]).toEqual([res.key, 1, true, res.url]);
    expect(await copy.json()).toEqual({ id: 'pay_1' });
    expect(await res.json()).toEqual({ id: 'pay_1' });
  });

  it('reports replayed: false without the header', async () => {
    const server = await serve((_s, res) => send(res, 201));
    const res = await createClient(fast).fetch(server.url, post());
    expect(res.replayed).toBe(false);
  });

  it('handles bodiless answers (204)', async () => {
    const server = await serve((_s, res) => {
      res.writeHead(204);
      res.end();
    });
    const res = await createClient(fast).fetch(server.url, { method: 'DELETE' });
    expect(res.status).toBe(204);
    expect(res.body).toBeNull();
  });

  it('calls onRetry with the state of each failed attempt', async () => {
    let n = 0;
    const server = await serve((_s, res) => {
      n++;
      if (n === 1) send(res, 503);
      else if (n === 2) res.socket?.destroy();
      else send(res, 200);
    });
    const states: RetryState[] = [];
    const res = await createClient({ ...fast, onRetry: (s) => void states.push(s) }).fetch(`${server.url}/p`, post());
    expect(res.attempts).toBe(3);
    expect(states).toHaveLength(2);
    const [first, second] = states as [RetryState, RetryState];
    expect(first).toMatchObject({ key: res.key, attempt: 1, reason: 'status', status: 503 });
    expect(first.error).toBeUndefined();
    expect(first.request.method).toBe('POST');
    expect(first.request.url).toBe(`${server.url}/p`);
    expect(first.request.headers.get('idempotency-key')).toBe(res.key);
    expect(first.delayMs).toBeGreaterThanOrEqual(5);
    expect(first.delayMs).toBeLessThanOrEqual(20);
    expect(second).toMatchObject({ key: res.key, attempt: 2, reason: 'network' });
    expect(second.status).toBeUndefined();
    expect(isNetworkError(second.error)).toBe(true);
  });

  it('stops with the error thrown by onRetry', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const boom = new Error('stop');
    await expect(
      createClient({
        ...fast,
        onRetry: () => {
          throw boom;
        },
      }).fetch(server.url, post()),
    ).rejects.toBe(boom);
    expect(server.seen).toHaveLength(1);
  });

  it('merges per-call options over the client options', async () => {
    const server = await serve((_s, res) => send(res, 503));
    const client = createClient({ ...fast, retries: 5 });
    const res = await client.fetch(server.url, post(), { retries: 1 });
    expect(res.attempts).toBe(2);
  });

  it('uses an injected fetch', async () => {
    const calls: string[] = [];
    const client = createClient({
      ...fast,
      fetch: async (input, init) => {
        calls.push(`${init.method} ${input} ${new Headers(init.headers).get('idempotency-key')}`);
        return new Response('injected', { status: calls.length === 1 ? 502 : 200 });
      },
    });
    const res = await client.fetch('http://127.0.0.1:1/x', post(), { key: 'k1' });
    expect(await res.text()).toBe('injected');
    expect(calls).toEqual(['POST http://127.0.0.1:1/x k1', 'POST http://127.0.0.1:1/x k1']);
  });

  it('rejects bad options at creation', () => {
    expect(() => createClient({ retries: -1 })).toThrow(ConfigError);
    expect(() => createClient({ factor: 0.5 })).toThrow(ConfigError);
    expect(() => createClient({ minDelayMs: Number.NaN })).toThrow(ConfigError);
  });

  it('rejects (not throws) bad per-call options', async () => {
    const pending = createClient().fetch('http://127.0.0.1:1/', {}, { attemptTimeoutMs: -5 });
    await expect(pending).rejects.toBeInstanceOf(ConfigError);
  });
});

// ---------------------------------------------------------------- backoff

describe('backoff', () => {
  const opts = { minDelayMs: 100, maxDelayMs: 5000, factor: 2, jitter: 'full' as const };

  it('full jitter stays between minDelayMs and the exponential ceiling, capped', () => {
    expect(backoffDelay(1, 100, opts, () => 0)).toBe(100);
    expect(backoffDelay(1, 100, opts, () => 0.999999)).toBe(200);
    expect(backoffDelay(3, 100, opts, () => 0.999999)).toBe(800);
    expect(backoffDelay(20, 100, opts, () => 0.999999)).toBe(5000);
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(4, 100, opts);
      expect(d).toBeGreaterThanOrEqual(100);
      expect(d).toBeLessThanOrEqual(1600);
    }
  });

  it('spreads full-jitter delays', () => {
    const delays = new Set(Array.from({ length: 50 }, () => backoffDelay(5, 100, opts)));
    expect(delays.size).toBeGreaterThan(10);
  });

  it('decorrelated jitter grows from the previous delay, capped', () => {
    const d = { ...opts, jitter: 'decorrelated' as const, factor: 3 };
    expect(backoffDelay(1, 100, d, () => 0.999999)).toBe(300);
    expect(backoffDelay(2, 300, d, () => 0.999999)).toBe(900);
    expect(backoffDelay(2, 300, d, () => 0)).toBe(100);
    expect(backoffDelay(9, 4000, d, () => 0.999999)).toBe(5000);
  });

  it('parses Retry-After', () => {
    const now = Date.parse('2026-01-01T00:00:00Z');
    expect(parseRetryAfter('0', now)).toBe(0);
    expect(parseRetryAfter(' 3 ', now)).toBe(3000);
    expect(parseRetryAfter('Thu, 01 Jan 2026 00:00:05 GMT', now)).toBe(5000);
    expect(parseRetryAfter('Wed, 31 Dec 2025 23:59:00 GMT', now)).toBe(0);
    expect(parseRetryAfter('-1', now)).toBeUndefined();
    expect(parseRetryAfter('1.5', now)).toBeUndefined();
    expect(parseRetryAfter('soon', now)).toBeUndefined();
    expect(parseRetryAfter(null, now)).toBeUndefined();
  });

  it('recognises network errors, and not programming errors', () => {
    expect(isNetworkError(new TypeError('fetch failed', { cause: Object.assign(new Error('x'), { code: 'ECONNRESET' }) }))).toBe(
      true,
    );
    expect(isNetworkError(Object.assign(new Error('connect'), { code: 'ECONNREFUSED' }))).toBe(true);
    expect(isNetworkError(new Error('socket hang up'))).toBe(true);
    expect(isNetworkError(new TypeError('Failed to parse URL from x'))).toBe(false);
    expect(isNetworkError(new Error('boom'))).toBe(false);
  });
});

// ---------------------------------------------------------------- derived keys

describe('deriveKey', () => {
  it('is deterministic, and a valid Idempotency-Key', () => {
    const a = deriveKey('order-key-1', 'payment');
    expect(deriveKey('order-key-1', 'payment')).toBe(a);
    expect(a).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(a).toMatch(/^[\x21-\x7e]{1,255}$/);
  });

  it('is stable across versions (a changed scheme would repeat effects after a deploy)', () => {
    expect(deriveKey('order-key-1', 'payment')).toBe(KNOWN_CHILD_KEY);
  });

  it('differs per step and per parent, without ambiguity', () => {
    const keys = [
      deriveKey('order-key-1', 'payment'),
      deriveKey('order-key-1', 'refund'),
      deriveKey('order-key-2', 'payment'),
      deriveKey('a:b', 'c'),
      deriveKey('a', 'b:c'),
      deriveKey('a', 'b\nc'),
      deriveKey('a\nb', 'c'),
    ];
    expect(new Set(keys).size).toBe(keys.length);
  });

  it('accepts any parent and step text (the child key is always valid)', () => {
    expect(deriveKey('"quoted" key with spaces', 'étape ✓')).toMatch(/^[A-Za-z0-9_-]{43}$/);
  });

  it('rejects empty inputs', () => {
    expect(() => deriveKey('', 'payment')).toThrow(ConfigError);
    expect(() => deriveKey('k', '')).toThrow(ConfigError);
  });

  it('lets a re-executed parent reach the child with the same key', async () => {
    const server = await serve((_s, res) => send(res, 201));
    const client = createClient(fast);
    const parentKey = 'order-7f3a';
    for (let run = 0; run < 2; run++) {
      await client.fetch(server.url, { method: 'POST', body: '{}' }, { key: deriveKey(parentKey, 'payment') });
    }
    expect(server.seen[0]?.key).toBe(deriveKey(parentKey, 'payment'));
    expect(server.seen[1]?.key).toBe(server.seen[0]?.key);
  });
});

// SHA-256("oncely-derive-v1\n11:order-key-1\npayment") in base64url, computed with openssl.
const KNOWN_CHILD_KEY = 'i2eOYpjHiL0GZCpLIlpNLy4-VdBMzASRhv8JmHvIViQ';
