/**
 * oncely/lambda: the handler wrapper and the Middy middleware (real
 * @middy/core 6), on recorded event shapes (fixtures/lambda/: a REST API
 * payload 1.0 with multi-value headers and a Cognito authorizer, a binary
 * one with a Lambda authorizer, an HTTP API payload 2.0 with a base64 body
 * and a JWT authorizer, and Function URL events, JSON and binary). No AWS:
 * the handler is called as Lambda calls it, and its answer read as API
 * Gateway reads it. The front-door behaviours run for every payload through
 * both forms; test/http/apps.ts puts both behind a local HTTP adapter for
 * the shared front-door suite.
 */
import { readFileSync } from 'node:fs';
import middy from '@middy/core';
import type {
  APIGatewayProxyEvent,
  APIGatewayProxyEventV2,
  APIGatewayProxyEventV2WithJWTAuthorizer,
  APIGatewayProxyHandler,
  APIGatewayProxyHandlerV2,
  Context,
  LambdaFunctionURLEvent,
} from 'aws-lambda';
import type { IdempotencyStore } from 'oncely';
import { idempotency, idempotencyOf, type LambdaHttpEvent, type LambdaHttpResult, withIdempotency } from 'oncely/lambda';
import { memoryStore } from 'oncely/stores/memory';
import { describe, expect, it } from 'vitest';

const fixture = <T>(name: string): T => JSON.parse(readFileSync(new URL(`./fixtures/lambda/${name}.json`, import.meta.url), 'utf8')) as T;
const REST = fixture<APIGatewayProxyEvent>('rest-v1');
const REST_BINARY = fixture<APIGatewayProxyEvent>('rest-v1-binary');
const HTTP_API = fixture<APIGatewayProxyEventV2WithJWTAuthorizer>('http-api-v2');
const URL_EVENT = fixture<LambdaFunctionURLEvent>('function-url');
const URL_BINARY = fixture<LambdaFunctionURLEvent>('function-url-binary');

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
let n = 0;
const newKey = () => `lambda-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;
const clone = <T>(value: T): T => structuredClone(value);
const quiet = { warn: () => {} };

/** A Lambda context whose invocation ends `remainingMs` from now. */
function lambdaContext(remainingMs = 30_000): Context {
  const deadline = Date.now() + remainingMs;
  return {
    callbackWaitsForEmptyEventLoop: true,
    functionName: 'payments',
    functionVersion: '$LATEST',
    invokedFunctionArn: 'arn:aws:lambda:eu-west-1:123456789012:function:payments',
    memoryLimitInMB: '512',
    awsRequestId: `req-${++n}`,
    logGroupName: '/aws/lambda/payments',
    logStreamName: '2025/01/12/[$LATEST]0123456789abcdef',
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
    done: () => {},
    fail: () => {},
    succeed: () => {},
  };
}

// ------------------------------------------------------------- events

type Payload = 'rest' | 'http-api' | 'function-url';
const PAYLOADS: Payload[] = ['rest', 'http-api', 'function-url'];

interface Request {
  key?: string | string[];
  body?: unknown;
  headers?: Record<string, string>;
  method?: string;
}

/** A recorded event with this request's key, body and headers, and a fresh request id. */
function eventFor(payload: Payload, request: Request = {}): LambdaHttpEvent {
  const { key, body = { amount: 100, currency: 'EUR' }, headers = {}, method = 'POST' } = request;
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  if (payload === 'rest') {
    const event = clone(REST);
    delete event.headers['Idempotency-Key'];
    delete event.multiValueHeaders['Idempotency-Key'];
    const keys = key === undefined ? [] : Array.isArray(key) ? key : [key];
    if (keys.length > 0) {
      event.headers['Idempotency-Key'] = keys.at(-1);
      event.multiValueHeaders['Idempotency-Key'] = keys;
    }
    for (const [name, value] of Object.entries(headers)) {
      event.headers[name] = value;
      event.multiValueHeaders[name] = [value];
    }
    event.httpMethod = method;
    event.requestContext.httpMethod = method;
    event.requestContext.requestId = `rid-${++n}`;
    event.body = text;
    return event;
  }
  const event = clone(payload === 'http-api' ? HTTP_API : URL_EVENT) as APIGatewayProxyEventV2;
  delete event.headers['idempotency-key'];
  // Payload 2.0 joins repeated fields with commas.
  if (key !== undefined) event.headers['idempotency-key'] = Array.isArray(key) ? key.join(',') : key;
  for (const [name, value] of Object.entries(headers)) event.headers[name.toLowerCase()] = value;
  event.requestContext.http.method = method;
  event.requestContext.requestId = `rid-${++n}`;
  // The HTTP API fixture carries its body base64-encoded, the Function URL one as text.
  event.body = event.isBase64Encoded ? Buffer.from(text).toString('base64') : text;
  return event;
}

/** A request header of an event, as the test handler reads it. */
function headerOf(event: LambdaHttpEvent, name: string): string | undefined {
  for (const [field, value] of Object.entries(event.headers ?? {})) if (field.toLowerCase() === name) return value;
  return undefined;
}

/** What the client sees of a handler's result, as API Gateway makes it. */
interface Seen {
  status: number;
  headers: Record<string, string>;
  body: string;
  raw: unknown;
}

function seen(result: unknown, payload: Payload): Seen {
  const object = result as Partial<LambdaHttpResult> | null;
  if (object === null || typeof object !== 'object' || typeof object.statusCode !== 'number') {
    if (payload === 'rest') return { status: 502, headers: {}, body: '{"message": "Internal server error"}', raw: result };
    return { status: 200, headers: { 'content-type': 'application/json' }, body: JSON.stringify(result), raw: result };
  }
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(object.headers ?? {})) headers[name.toLowerCase()] = String(value);
  for (const [name, values] of Object.entries(object.multiValueHeaders ?? {})) headers[name.toLowerCase()] = values.join(', ');
  const body = object.isBase64Encoded ? Buffer.from(object.body ?? '', 'base64').toString('latin1') : (object.body ?? '');
  return { status: object.statusCode, headers, body, raw: result };
}

function expectProblem(answer: Seen, status: number, slug: string) {
  expect(answer.status).toBe(status);
  expect(answer.headers['content-type']).toMatch(/^application\/problem\+json/);
  const problem = JSON.parse(answer.body) as { type: string; status: number; title: string; detail: string };
  expect(problem.type).toBe(`https://oncely.dev/problems/${slug}`);
  expect(problem.status).toBe(status);
  return problem;
}

// ------------------------------------------------------------ handlers

/**
 * The payment handler, counting its executions. Request headers steer it:
 * `x-delay` (ms), `x-status`, `x-throw`.
 */
function payments<E extends LambdaHttpEvent = LambdaHttpEvent>() {
  let count = 0;
  const handler = async (event: E): Promise<LambdaHttpResult> => {
    const id = `pay_${++count}`;
    const delay = Number(headerOf(event, 'x-delay') ?? 0);
    if (delay > 0) await sleep(delay);
    if (headerOf(event, 'x-throw')) throw new Error('handler failed');
    return {
      statusCode: Number(headerOf(event, 'x-status') ?? 201),
      headers: { 'Content-Type': 'application/json', Location: `/payments/${id}`, 'X-Request-Id': `req-${count}` },
      body: JSON.stringify({ id }),
      isBase64Encoded: false,
    };
  };
  return { handler, executions: () => count };
}

type Form = 'wrapper' | 'middy';

/** The handler behind one form, called as Lambda calls it; answers what the client sees, or the error Lambda reports. */
function deploy(form: Form, options: Parameters<typeof withIdempotency>[1]) {
  const app = payments();
  const wrapped = form === 'wrapper' ? withIdempotency(app.handler, options) : middy(app.handler).use(idempotency(options));
  const invoke = async (payload: Payload, request: Request = {}, context: Context = lambdaContext()): Promise<Seen | { error: unknown }> => {
    try {
      return seen(await wrapped(eventFor(payload, request), context), payload);
    } catch (error) {
      return { error };
    }
  };
  const answer = async (payload: Payload, request: Request = {}): Promise<Seen> => {
    const got = await invoke(payload, request);
    if ('error' in got) throw got.error;
    return got;
  };
  return { invoke, answer, executions: app.executions };
}

// ------------------------------------------------------------- tests

describe.each(PAYLOADS)('%s payload', (payload) => {
  describe.each<Form>(['wrapper', 'middy'])('through the %s', (form) => {
    const app = deploy(form, { store: memoryStore(), scope: false, leaseMs: 5_000 });

    it('refuses a missing key with 400 in the event shape, running nothing', async () => {
      const before = app.executions();
      const problem = expectProblem(await app.answer(payload), 400, 'key-missing');
      expect(problem.title).toBe('Idempotency-Key is missing');
      expect(app.executions()).toBe(before);
    });

    it('refuses malformed keys with 400 (several fields, a list, spaces, too long), running nothing', async () => {
      const before = app.executions();
      for (const bad of [['one', 'two'], 'a,b', 'has space', 'k'.repeat(256), '']) expectProblem(await app.answer(payload, { key: bad }), 400, 'key-malformed');
      expect(app.executions()).toBe(before);
    });

    it('replays a completed request: the same status and body, replayed headers only, Idempotent-Replayed', async () => {
      const key = newKey();
      const first = await app.answer(payload, { key, body: { amount: 42, currency: 'EUR' } });
      expect(first.status).toBe(201);
      expect(first.headers['idempotent-replayed']).toBeUndefined();
      const before = app.executions();
      // The same JSON in another order: the same request.
      const second = await app.answer(payload, { key, body: { currency: 'EUR', amount: 42 } });
      expect(app.executions()).toBe(before);
      expect(second).toMatchObject({ status: 201, body: first.body });
      expect(second.headers).toEqual({ 'content-type': 'application/json', location: first.headers.location, 'idempotent-replayed': 'true' });
    });

    it('answers 422 to the same key with another body, and changes nothing', async () => {
      const key = newKey();
      const first = await app.answer(payload, { key, body: { amount: 1 } });
      const before = app.executions();
      expectProblem(await app.answer(payload, { key, body: { amount: 2 } }), 422, 'key-reused');
      expect(app.executions()).toBe(before);
      expect((await app.answer(payload, { key, body: { amount: 1 } })).body).toBe(first.body);
    });

    it('answers 409 with Retry-After while the first runs, then replays', async () => {
      const key = newKey();
      const first = app.answer(payload, { key, headers: { 'x-delay': '300' } });
      await sleep(80);
      const during = await app.answer(payload, { key });
      expectProblem(during, 409, 'in-flight');
      expect(during.headers['retry-after']).toBe('1');
      const done = await first;
      const after = await app.answer(payload, { key });
      expect(after.body).toBe(done.body);
      expect(after.headers['idempotent-replayed']).toBe('true');
    });

    it('releases a 5xx and a thrown error (rethrown to Lambda), so that a retry runs again', async () => {
      const key = newKey();
      const before = app.executions();
      expect((await app.answer(payload, { key, headers: { 'x-status': '503' } })).status).toBe(503);
      const thrown = await app.invoke(payload, { key, headers: { 'x-throw': '1' } });
      expect((thrown as { error: Error }).error.message).toBe('handler failed');
      expect((await app.answer(payload, { key })).status).toBe(201);
      expect(app.executions() - before).toBe(3);
      expect((await app.answer(payload, { key })).headers['idempotent-replayed']).toBe('true');
    });

    it('runs the handler once among 100 concurrent invocations with one new key; the others get 409 or the replay', async () => {
      const key = newKey();
      const before = app.executions();
      const answers = await Promise.all(Array.from({ length: 100 }, () => app.answer(payload, { key, headers: { 'x-delay': '300' } })));
      expect(app.executions() - before).toBe(1);
      expect(answers.filter((a) => a.status !== 201 && a.status !== 409)).toEqual([]);
      expect(answers.filter((a) => a.status === 201 && a.headers['idempotent-replayed'] === undefined).length).toBe(1);
      expect(answers.filter((a) => a.status === 409).length).toBeGreaterThan(0);
    });

    it('passes other methods through untouched', async () => {
      const before = app.executions();
      const got = await app.answer(payload, { method: 'GET' });
      expect(got.status).toBe(201);
      expect(app.executions()).toBe(before + 1);
    });
  });
});

describe('REST API payload 1.0 (recorded event)', () => {
  it('reads the key whatever its case, answers in multiValueHeaders, and scopes by the Cognito claim', async () => {
    const app = payments<APIGatewayProxyEvent>();
    const handler = withIdempotency(app.handler, {
      store: memoryStore(),
      scope: (event) => event.requestContext.authorizer?.claims?.['custom:account'] as string | undefined,
    });
    const first = await handler(clone(REST), lambdaContext());
    expect(first).toMatchObject({ statusCode: 201, body: '{"id":"pay_1"}' });
    // A retry through API Gateway: new request id and trace, the same key and body (compacted).
    const retry = clone(REST);
    retry.requestContext.requestId = 'another-request';
    retry.headers['X-Amzn-Trace-Id'] = 'Root=1-65a1b2c3-ffffffffffffffffffffffff';
    retry.body = '{"currency":"EUR","amount":2500}';
    const replay = await handler(retry, lambdaContext());
    expect(replay).toEqual({
      statusCode: 201,
      multiValueHeaders: { 'content-type': ['application/json'], location: ['/payments/pay_1'], 'idempotent-replayed': ['true'] },
      body: '{"id":"pay_1"}',
      isBase64Encoded: false,
    });
    expect(app.executions()).toBe(1);
    // The same key from another account is another operation.
    const other = clone(REST);
    other.requestContext.authorizer!.claims['custom:account'] = 'acct_other';
    expect(await handler(other, lambdaContext())).toMatchObject({ statusCode: 201, body: '{"id":"pay_2"}' });
    // No claim, no scope: refused.
    const anonymous = clone(REST);
    anonymous.requestContext.authorizer = null;
    expectProblem(seen(await handler(anonymous, lambdaContext()), 'rest'), 400, 'scope-missing');
  });

  it('fingerprints the multi-value query: another order is the same request, another value is not', async () => {
    const handler = withIdempotency(payments().handler, { store: memoryStore(), scope: false });
    await handler(clone(REST), lambdaContext());
    const reordered = clone(REST);
    reordered.multiValueQueryStringParameters = { tag: ['b', 'a'], notify: ['email'] };
    expect(seen(await handler(reordered, lambdaContext()), 'rest').headers['idempotent-replayed']).toBe('true');
    const changed = clone(REST);
    changed.multiValueQueryStringParameters = { tag: ['a', 'c'], notify: ['email'] };
    expectProblem(seen(await handler(changed, lambdaContext()), 'rest'), 422, 'key-reused');
  });

  it('sees every field of a repeated Idempotency-Key in multiValueHeaders (headers keeps only the last)', async () => {
    const handler = withIdempotency(payments().handler, { store: memoryStore(), scope: false });
    const event = clone(REST);
    event.multiValueHeaders['Idempotency-Key'] = ['first', event.headers['Idempotency-Key']!];
    expectProblem(seen(await handler(event, lambdaContext()), 'rest'), 400, 'key-malformed');
  });

  it('answers in headers when the event has no multiValueHeaders', async () => {
    const handler = withIdempotency(payments().handler, { store: memoryStore(), scope: false });
    const event = clone(REST) as Partial<APIGatewayProxyEvent>;
    delete event.multiValueHeaders;
    const problem = await handler(event as APIGatewayProxyEvent, lambdaContext());
    await handler(clone(event) as APIGatewayProxyEvent, lambdaContext());
    const replay = (await handler(clone(event) as APIGatewayProxyEvent, lambdaContext())) as LambdaHttpResult;
    expect(problem).toMatchObject({ statusCode: 201 });
    expect(replay.multiValueHeaders).toBeUndefined();
    expect(replay.headers).toMatchObject({ 'idempotent-replayed': 'true', location: '/payments/pay_1' });
  });

  it('fingerprints a base64 body by its bytes, scoped by a Lambda authorizer, and replays a binary answer as base64', async () => {
    let count = 0;
    const png = Buffer.from(REST_BINARY.body!, 'base64');
    const handler = withIdempotency(
      async (event: APIGatewayProxyEvent) => ({
        statusCode: 201,
        headers: { 'content-type': 'image/png', etag: `"r${++count}"` },
        body: Buffer.from(event.body!, 'base64').toString('base64'),
        isBase64Encoded: true,
      }),
      { store: memoryStore(), scope: (event) => event.requestContext.authorizer?.principalId as string | undefined },
    );
    const first = await handler(clone(REST_BINARY), lambdaContext());
    const replay = (await handler(clone(REST_BINARY), lambdaContext())) as LambdaHttpResult;
    expect(count).toBe(1);
    expect(replay).toEqual({
      statusCode: 201,
      multiValueHeaders: { 'content-type': ['image/png'], etag: ['"r1"'], 'idempotent-replayed': ['true'] },
      body: first.body,
      isBase64Encoded: true,
    });
    expect(Buffer.from(replay.body, 'base64').equals(png)).toBe(true);
    const flipped = clone(REST_BINARY);
    const bytes = Buffer.from(png);
    bytes[bytes.length - 1]! ^= 1;
    flipped.body = bytes.toString('base64');
    expectProblem(seen(await handler(flipped, lambdaContext()), 'rest'), 422, 'key-reused');
    expect(count).toBe(1);
  });

  it('releases a result API Gateway cannot read (no statusCode: its 502), with one warning', async () => {
    const warnings: string[] = [];
    let count = 0;
    const handler = withIdempotency(async (_event: APIGatewayProxyEvent) => ({ ok: ++count }), { store: memoryStore(), scope: false, logger: { warn: (m) => warnings.push(m) } });
    expect(await handler(clone(REST), lambdaContext())).toEqual({ ok: 1 });
    expect(await handler(clone(REST), lambdaContext())).toEqual({ ok: 2 });
    expect(warnings.filter((w) => w.includes('no proxy result'))).toHaveLength(1);
  });
});

describe('HTTP API payload 2.0 (recorded event)', () => {
  it('decodes a base64 JSON body, reads the quoted key form, scopes by the JWT sub, and answers in headers', async () => {
    const app = payments<APIGatewayProxyEventV2WithJWTAuthorizer>();
    const handler = withIdempotency(app.handler, {
      store: memoryStore(),
      scope: (event) => event.requestContext.authorizer.jwt.claims.sub as string,
      fingerprintHeaders: ['cookie'],
    });
    const first = await handler(clone(HTTP_API), lambdaContext());
    expect(first).toMatchObject({ statusCode: 201 });
    // The same JSON as text, keys in another order: the same request.
    const retry = clone(HTTP_API);
    retry.body = '{"amount": 2500, "currency": "EUR"}';
    retry.isBase64Encoded = false;
    const replay = await handler(retry, lambdaContext());
    expect(replay).toEqual({
      statusCode: 201,
      headers: { 'content-type': 'application/json', location: '/payments/pay_1', 'idempotent-replayed': 'true' },
      body: '{"id":"pay_1"}',
      isBase64Encoded: false,
    });
    // The cookies (fingerprinted here) are part of the request.
    const otherCookies = clone(HTTP_API);
    otherCookies.cookies = ['session=other'];
    expectProblem(seen(await handler(otherCookies, lambdaContext()), 'http-api'), 422, 'key-reused');
    const otherAmount = clone(HTTP_API);
    otherAmount.body = Buffer.from('{"currency":"EUR","amount":2600}').toString('base64');
    const refused = await handler(otherAmount, lambdaContext());
    expect(refused).toMatchObject({ statusCode: 422, headers: { 'content-type': 'application/problem+json' }, isBase64Encoded: false });
    expect(refused).not.toHaveProperty('multiValueHeaders');
    expect(app.executions()).toBe(1);
  });

  it('answers a plain value as API Gateway does (200, JSON) and replays it so', async () => {
    let count = 0;
    const handler = withIdempotency(async (_event: APIGatewayProxyEventV2) => (++count === 1 ? { id: 'pay_1', amount: 2500 } : 'unexpected'), {
      store: memoryStore(),
      scope: false,
    });
    expect(await handler(clone(HTTP_API), lambdaContext())).toEqual({ id: 'pay_1', amount: 2500 });
    expect(await handler(clone(HTTP_API), lambdaContext())).toEqual({
      statusCode: 200,
      headers: { 'content-type': 'application/json', 'idempotent-replayed': 'true' },
      body: '{"id":"pay_1","amount":2500}',
      isBase64Encoded: false,
    });
    const strings = withIdempotency(async (_event: APIGatewayProxyEventV2) => 'done', { store: memoryStore(), scope: false });
    await strings(clone(HTTP_API), lambdaContext());
    expect(await strings(clone(HTTP_API), lambdaContext())).toMatchObject({ statusCode: 200, body: '"done"' });
    expect(count).toBe(1);
  });
});

describe('Function URL (recorded events)', () => {
  it('makes a JSON request idempotent and passes non-HTTP events and GETs through', async () => {
    const app = payments();
    const handler = withIdempotency(app.handler, { store: memoryStore(), scope: false });
    await handler(clone(URL_EVENT), lambdaContext());
    expect(seen(await handler(clone(URL_EVENT), lambdaContext()), 'function-url').headers['idempotent-replayed']).toBe('true');
    const get = clone(URL_EVENT);
    get.requestContext.http.method = 'GET';
    await handler(get, lambdaContext());
    // A queue message through the same function is not an HTTP request: not judged.
    const sqs = { Records: [{ messageId: 'm-1', body: '{}' }] } as unknown as LambdaHttpEvent;
    await handler(sqs, lambdaContext());
    expect(app.executions()).toBe(3);
  });

  it('fingerprints a binary upload by its bytes and replays a non-UTF-8 answer base64-encoded', async () => {
    let count = 0;
    const handler = withIdempotency(
      async (event: LambdaFunctionURLEvent) => ({
        statusCode: 200,
        headers: { 'content-type': 'application/octet-stream', 'x-count': String(++count) },
        body: Buffer.from(event.body!, 'base64').reverse().toString('base64'),
        isBase64Encoded: true,
      }),
      { store: memoryStore(), scope: (event) => (event.requestContext as { authorizer?: { iam?: { userArn?: string } } }).authorizer?.iam?.userArn },
    );
    const first = (await handler(clone(URL_BINARY), lambdaContext())) as LambdaHttpResult;
    const replay = (await handler(clone(URL_BINARY), lambdaContext())) as LambdaHttpResult;
    expect(replay).toEqual({
      statusCode: 200,
      headers: { 'content-type': 'application/octet-stream', 'idempotent-replayed': 'true' },
      body: first.body,
      isBase64Encoded: true,
    });
    const other = clone(URL_BINARY);
    other.body = Buffer.from([0, 1, 0xff, 0x80, 0x7f, 0x10, 0x20, 0xff]).toString('base64');
    expectProblem(seen(await handler(other, lambdaContext()), 'function-url'), 422, 'key-reused');
    expect(count).toBe(1);
  });

  it('answers a body over maxBodyBytes with 413 and one that is not JSON with 400, before any claim', async () => {
    const app = payments();
    const handler = withIdempotency(app.handler, { store: memoryStore(), scope: false, maxBodyBytes: 16 });
    expectProblem(seen(await handler(clone(URL_EVENT), lambdaContext()), 'function-url'), 413, 'body-too-large');
    const broken = clone(URL_EVENT);
    broken.body = '{"amount":';
    expectProblem(seen(await handler(broken, lambdaContext()), 'function-url'), 400, 'body-invalid');
    expect(app.executions()).toBe(0);
  });
});

/**
 * The memory store, recording the lease of each claim; from `stop()` on,
 * renewals fail as they do for an invocation Lambda stopped.
 */
function stoppable(): { store: IdempotencyStore; leases: number[]; stop(): void } {
  const base = memoryStore();
  const leases: number[] = [];
  let stopped = false;
  const store: IdempotencyStore = {
    name: 'stoppable',
    capabilities: base.capabilities,
    claim: (id, input) => {
      leases.push(input.leaseMs);
      return base.claim(id, input);
    },
    renew: (id, token, leaseMs) => (stopped ? Promise.reject(new Error('the invocation was stopped')) : base.renew(id, token, leaseMs)),
    complete: (id, token, outcome, ttlMs) => base.complete(id, token, outcome, ttlMs),
    release: (id, token) => base.release(id, token),
    get: (id) => base.get(id),
    delete: (id) => base.delete(id),
    purgeExpired: (limit) => base.purgeExpired(limit),
    close: () => base.close(),
  };
  return {
    store,
    leases,
    stop: () => {
      stopped = true;
    },
  };
}

describe('the lease and the invocation deadline', () => {
  it('bounds the lease by the remaining time plus a second: a timed-out invocation frees its key a lease after its deadline, not after leaseMs', async () => {
    for (const bounded of [true, false]) {
      const { store, stop } = stoppable();
      let takeover: boolean | undefined;
      const handler = withIdempotency(
        async (event: LambdaFunctionURLEvent) => {
          takeover = idempotencyOf(event)?.takeover;
          if (event.headers['x-hang']) {
            // Lambda stops the invocation at its deadline (600 ms): no renewal after it, no settlement.
            setTimeout(stop, 600);
            return new Promise<never>(() => {});
          }
          return { statusCode: 201, body: '{}' };
        },
        { store, scope: false, leaseMs: 30_000, logger: quiet },
      );
      const hanging = clone(URL_EVENT);
      hanging.headers['x-hang'] = '1';
      // Bounded: a 1.6 s lease, renewed once (at 533 ms) before the deadline, so held until about 2.1 s.
      void handler(hanging, bounded ? lambdaContext(600) : ({} as Context));
      await sleep(2_400);
      const retry = seen(await handler(clone(URL_EVENT), lambdaContext()), 'function-url');
      if (bounded) {
        expect(retry.status).toBe(201);
        expect(takeover).toBe(true);
      } else {
        expectProblem(retry, 409, 'in-flight');
      }
    }
  });

  it('claims with min(leaseMs, remaining time + 1 s), and leaseMs without a deadline', async () => {
    const { store, leases } = stoppable();
    const handler = withIdempotency(async (_event: LambdaFunctionURLEvent) => ({ statusCode: 201, body: '{}' }), { store, scope: false, leaseMs: 4_000 });
    for (const context of [lambdaContext(60_000), lambdaContext(2_000), {} as Context]) {
      const event = clone(URL_EVENT);
      event.headers['idempotency-key'] = newKey();
      await handler(event, context);
    }
    expect(leases[0]).toBe(4_000);
    expect(leases[1]).toBeGreaterThan(2_900);
    expect(leases[1]).toBeLessThanOrEqual(3_000);
    expect(leases[2]).toBe(4_000);
  });

  it('under Middy, a handler cut off by Middy before the deadline (TimeoutError) is released: the retry runs', async () => {
    const app = payments();
    const handler = middy(app.handler).use(idempotency({ store: memoryStore(), scope: false }));
    const key = newKey();
    await expect(handler(eventFor('function-url', { key, headers: { 'x-delay': '600' } }), lambdaContext(150))).rejects.toMatchObject({ name: 'TimeoutError' });
    const retry = seen(await handler(eventFor('function-url', { key }), lambdaContext()), 'function-url');
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBeUndefined();
    expect(app.executions()).toBe(2);
  });
});

describe('Middy', () => {
  it('returns a replay early: the handler and every after hook are skipped', async () => {
    const app = payments();
    const afters: string[] = [];
    const handler = middy(app.handler)
      .use({ after: async () => void afters.push('outer') })
      .use(idempotency({ store: memoryStore(), scope: false }));
    const key = newKey();
    await handler(eventFor('http-api', { key }), lambdaContext());
    const replay = seen(await handler(eventFor('http-api', { key }), lambdaContext()), 'http-api');
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expect(app.executions()).toBe(1);
    expect(afters).toEqual(['outer']);
  });

  it('fingerprints the body a parser used before it left (an object)', async () => {
    const app = payments<APIGatewayProxyEventV2>();
    const handler = middy(app.handler)
      .use({
        before: async (request: { event: APIGatewayProxyEventV2 }) => {
          const { event } = request;
          const text = event.isBase64Encoded ? Buffer.from(event.body!, 'base64').toString('utf8') : event.body!;
          (event as { body: unknown }).body = JSON.parse(text);
          event.isBase64Encoded = false;
        },
      })
      .use(idempotency({ store: memoryStore(), scope: false }));
    const key = newKey();
    const v2 = (request: Request) => eventFor('http-api', request) as APIGatewayProxyEventV2;
    await handler(v2({ key, body: '{"amount": 5, "currency": "EUR"}' }), lambdaContext());
    const replay = seen(await handler(v2({ key, body: '{"currency":"EUR","amount":5}' }), lambdaContext()), 'http-api');
    expect(replay.headers['idempotent-replayed']).toBe('true');
    expectProblem(seen(await handler(v2({ key, body: { amount: 6 } }), lambdaContext()), 'http-api'), 422, 'key-reused');
    expect(app.executions()).toBe(1);
  });

  it('stores an object body left for a response serializer as JSON', async () => {
    let count = 0;
    const handler = middy(async () => ({ statusCode: 201, body: { id: `pay_${++count}` } }))
      .use({
        after: async (request: { response: { body: unknown } | null }) => {
          if (request.response && typeof request.response.body !== 'string') request.response.body = JSON.stringify(request.response.body);
        },
      })
      .use(idempotency({ store: memoryStore(), scope: false }));
    const key = newKey();
    const first = seen(await handler(eventFor('function-url', { key }), lambdaContext()), 'function-url');
    const replay = seen(await handler(eventFor('function-url', { key }), lambdaContext()), 'function-url');
    expect(first.body).toBe('{"id":"pay_1"}');
    expect(replay).toMatchObject({ status: 201, body: first.body, headers: { 'content-type': 'application/json', 'idempotent-replayed': 'true' } });
  });

  it('settles when a middleware used after it answers early (an error handler returning its answer), and warns once', async () => {
    const warnings: string[] = [];
    const app = payments();
    const handler = middy(app.handler)
      .use(idempotency({ store: memoryStore(), scope: false, logger: { warn: (m) => warnings.push(m) } }))
      .use({
        onError: async (request: { error: unknown; response: unknown }) => {
          request.response = { statusCode: 400, headers: { 'content-type': 'text/plain' }, body: 'rejected by the error handler' };
          return request.response;
        },
      });
    const key = newKey();
    const first = seen(await handler(eventFor('rest', { key, headers: { 'x-throw': '1' } }), lambdaContext()), 'rest');
    expect(first.status).toBe(400);
    // The settlement could not be awaited by Middy: give it its turn.
    await sleep(20);
    const replay = seen(await handler(eventFor('rest', { key, headers: { 'x-throw': '1' } }), lambdaContext()), 'rest');
    expect(replay).toMatchObject({ status: 400, body: 'rejected by the error handler', headers: { 'idempotent-replayed': 'true' } });
    expect(app.executions()).toBe(1);
    expect(warnings.filter((w) => w.includes('last'))).toHaveLength(1);
  });

  it('lets an error handler used before it answer a thrown error, after releasing the claim', async () => {
    const app = payments();
    const handler = middy(app.handler)
      .use({
        onError: async (request: { response: unknown }) => {
          request.response = { statusCode: 500, body: 'sorry' };
        },
      })
      .use(idempotency({ store: memoryStore(), scope: false }));
    const key = newKey();
    expect(seen(await handler(eventFor('http-api', { key, headers: { 'x-throw': '1' } }), lambdaContext()), 'http-api').status).toBe(500);
    expect(seen(await handler(eventFor('http-api', { key }), lambdaContext()), 'http-api').status).toBe(201);
    expect(app.executions()).toBe(2);
  });
});

/** A memory store in transactional mode whose commits fail. */
function failingCommits(): IdempotencyStore {
  const base = memoryStore();
  return {
    name: 'failing-commits',
    capabilities: base.capabilities,
    claim: (id, input) => base.claim(id, input),
    renew: (id, token, leaseMs) => base.renew(id, token, leaseMs),
    complete: (id, token, outcome, ttlMs) => base.complete(id, token, outcome, ttlMs),
    release: (id, token) => base.release(id, token),
    get: (id) => base.get(id),
    delete: (id) => base.delete(id),
    purgeExpired: (limit) => base.purgeExpired(limit),
    close: () => base.close(),
    transactions: {
      open: async () => ({
        client: 'tx',
        commit: async () => {
          throw new Error('commit lost');
        },
        rollback: async () => {},
      }),
    },
  };
}

describe('transactional mode', () => {
  it.each<Form>(['wrapper', 'middy'])('through the %s: an answer whose writes did not commit is replaced by a 503 in the event shape', async (form) => {
    const handler = async (event: LambdaHttpEvent) => {
      expect(await idempotencyOf(event)!.transaction<string>()).toBe('tx');
      return { statusCode: 201, body: '{"id":"pay_1"}' };
    };
    const options = { store: failingCommits(), scope: false as const };
    const wrapped = form === 'wrapper' ? withIdempotency(handler, options) : middy(handler).use(idempotency(options));
    const got = (await wrapped(eventFor('rest', { key: newKey() }), lambdaContext())) as LambdaHttpResult;
    expect(got.multiValueHeaders?.['retry-after']).toEqual(['1']);
    expectProblem(seen(got, 'rest'), 503, 'rolled-back');
  });
});

describe('types', () => {
  it('fits the handler types of @types/aws-lambda', () => {
    const store = memoryStore();
    const rest: APIGatewayProxyHandler = withIdempotency(async (event: APIGatewayProxyEvent) => ({ statusCode: 201, body: event.path }), {
      store,
      scope: (event) => event.requestContext.authorizer?.principalId,
    });
    const httpApi: APIGatewayProxyHandlerV2 = withIdempotency(async (event: APIGatewayProxyEventV2, _context: Context) => ({ statusCode: 201, body: event.rawPath }), {
      store,
      scope: (event) => event.headers['x-account'],
    });
    type Jwt = APIGatewayProxyEventV2WithJWTAuthorizer;
    const withMiddy = middy<Jwt>()
      .use(idempotency<Jwt>({ store, scope: (event) => event.requestContext.authorizer.jwt.claims.sub as string }))
      .handler(async (event) => ({ statusCode: 201, body: event.rawPath }));
    expect([rest, httpApi, withMiddy].every((f) => typeof f === 'function')).toBe(true);
  });
});
