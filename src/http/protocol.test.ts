/**
 * The HTTP core without a framework: every answer of begin() (pass, problem,
 * replay, run), what finish() stores or releases by the outcome policy, the
 * marker of an answer that went out, the constraint strategy, headers kept
 * and dropped, and the transactional replacement. Records are read back from
 * a real memory store.
 */
import { describe, expect, it } from 'vitest';
import { Engine } from '../engine/engine.js';
import { fingerprintOf, fingerprintV1, recordId } from '../engine/fingerprint.js';
import type { IdempotencyStore, StoreTransactions } from '../engine/store.js';
import { ConfigError, InFlightError } from '../errors/index.js';
import { memoryStore } from '../stores/memory.js';
import { HttpIdempotency, type HttpIdempotencyOptions, type HttpRequestView, type HttpRun, KEY_HEADER, REPLAYED_HEADER } from './core.js';
import { decodeOutcome, encodeOutcome } from './outcome.js';

interface Raw {
  account?: string;
  tenant?: string;
}

function request(key: string | undefined, options: Partial<HttpRequestView<Raw>> & { headers?: Record<string, string[]> } = {}): HttpRequestView<Raw> {
  const headers: Record<string, string[]> = { ...(key === undefined ? {} : { 'idempotency-key': [key] }), ...options.headers };
  return {
    raw: options.raw ?? { account: 'acct' },
    method: options.method ?? 'POST',
    path: options.path ?? '/payments',
    query: options.query ?? '',
    header: (name) => headers[name],
    body: 'body' in options ? options.body : { json: { amount: 1 } },
  };
}

function core(options: Partial<HttpIdempotencyOptions<Raw>> = {}) {
  const store = memoryStore();
  const warnings: string[] = [];
  const http = new HttpIdempotency<Raw>({ store, scope: (raw) => raw.account, logger: { warn: (m) => warnings.push(m) }, ...options });
  return { http, store, warnings };
}

async function running(http: HttpIdempotency<Raw>, view = request('k')): Promise<HttpRun> {
  const begun = await http.begin(view);
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  return begun.run;
}

const body = (response: { body: Uint8Array | string }) => JSON.parse(String(response.body)) as Record<string, unknown>;

describe('settings', () => {
  it('POST and PATCH by default; methods given in any case', () => {
    const { http } = core();
    expect(['POST', 'PATCH', 'PUT', 'DELETE', 'GET'].map((m) => http.applies(m))).toEqual([true, true, false, false, false]);
    const custom = core({ methods: ['put', 'Delete'] }).http;
    expect(['POST', 'PUT', 'DELETE'].map((m) => custom.applies(m))).toEqual([false, true, true]);
  });

  it('1 MiB body limits by default; each must be a positive size', () => {
    const { http } = core();
    expect([http.maxStoredBytes, http.maxBodyBytes]).toEqual([1_048_576, 1_048_576]);
    expect(core({ maxStoredBytes: 10, maxBodyBytes: 20 }).http.maxStoredBytes).toBe(10);
    expect(() => core({ maxStoredBytes: 0 })).toThrow('maxStoredBytes must be');
    expect(() => core({ maxBodyBytes: -1 })).toThrow('maxBodyBytes must be');
  });

  it('an engine together with engine options is refused, naming oncely', () => {
    const engine = new Engine({ store: memoryStore() });
    expect(() => new HttpIdempotency({ engine, scope: false, leaseMs: 1_000 })).toThrow(
      'oncely was given an `engine` and also `leaseMs`: set those on the engine instead.',
    );
  });

  it('keyFromFingerprint needs a fingerprint and a window', () => {
    expect(() => core({ keyFromFingerprint: { windowMs: 1_000 }, fingerprint: false })).toThrow('keyFromFingerprint needs a fingerprint.');
    expect(() => core({ keyFromFingerprint: { windowMs: 0 } })).toThrow('keyFromFingerprint.windowMs must be');
    expect(() => core({ keyFromFingerprint: false, fingerprint: false })).not.toThrow();
  });

  it('warns once per engine when no scope is configured, and never with scope: false', () => {
    const warnings: string[] = [];
    const logger = { warn: (m: string) => warnings.push(m) };
    const engine = new Engine({ store: memoryStore() });
    new HttpIdempotency({ engine, logger });
    new HttpIdempotency({ engine, logger });
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/^oncely: no `scope` configured, so Idempotency-Keys are global across all callers\. Pass `scope: \(req\) => accountId`/);
    new HttpIdempotency({ store: memoryStore(), scope: false, logger });
    new HttpIdempotency({ store: memoryStore(), scope: () => 'a', logger });
    expect(warnings).toHaveLength(1);
  });

  it('the header names', () => {
    expect([KEY_HEADER, REPLAYED_HEADER]).toEqual(['idempotency-key', 'idempotent-replayed']);
  });
});

describe('begin', () => {
  it('no key: 400 key-missing, or passed through with required: false', async () => {
    const refused = await core().http.begin(request(undefined));
    expect(refused.kind === 'respond' && refused.response.status).toBe(400);
    expect(refused.kind === 'respond' && body(refused.response)).toMatchObject({ title: 'Idempotency-Key is missing' });
    expect(await core({ required: false }).http.begin(request(undefined))).toEqual({ kind: 'pass' });
    expect((await core({ required: true }).http.begin(request(undefined))).kind).toBe('respond');
  });

  it('a malformed key or one off the pattern: 400 key-malformed, nothing claimed', async () => {
    const { http, store } = core({ keyPattern: /^[a-z]+$/ });
    for (const key of ['a b', '123']) {
      const begun = await http.begin(request(key));
      expect(begun.kind === 'respond' && body(begun.response)).toMatchObject({ status: 400, type: 'https://oncely.dev/problems/key-malformed' });
    }
    expect(store.size).toBe(0);
  });

  it('the record id is the key in the scope and namespace; the context shows key and id', async () => {
    const { http } = core({ namespace: 'api' });
    const run = await running(http, request('k-1', { raw: { account: 'acct_9' } }));
    expect(run.context.key).toBe('k-1');
    expect(run.context.id).toBe(recordId('k-1', 'acct_9', 'api'));
    expect(run.context.takeover).toBe(false);
    expect(run.context.signal.aborted).toBe(false);
    expect(run.context).toBe(run);
  });

  it('a scope of undefined or the empty string: 400 scope-missing; scope: false is the empty scope', async () => {
    for (const account of [undefined, '']) {
      const begun = await core().http.begin(request('k', { raw: { account } }));
      expect(begun.kind === 'respond' && body(begun.response)).toMatchObject({ status: 400, type: 'https://oncely.dev/problems/scope-missing' });
    }
    const run = await running(core({ scope: false }).http);
    expect(run.context.id).toBe(recordId('k', '', undefined));
  });

  it('an error of the scope function that is not an oncely error is thrown, not answered', async () => {
    const broken = new Error('no session');
    const { http } = core({
      scope: () => {
        throw broken;
      },
    });
    await expect(http.begin(request('k'))).rejects.toBe(broken);
  });

  it('fingerprint v1 over method, path, sorted query, chosen headers (lower-cased) and body', async () => {
    const { http, store } = core({ fingerprintHeaders: ['X-Tenant', 'x-region'] });
    const view = request('k', { query: '?b=2&a=1', headers: { 'x-tenant': ['t1', 't2'] } });
    const run = await running(http, view);
    const record = await store.get(run.context.id);
    expect(record?.fingerprint).toBe(
      fingerprintV1({ method: 'POST', path: '/payments', query: '?b=2&a=1', body: { json: { amount: 1 } }, headers: [['x-tenant', 't1, t2'], ['x-region', '']] }),
    );
  });

  it('a fingerprint function fingerprints what it picks; false stores none', async () => {
    const picked = core({ fingerprint: (raw) => ({ account: raw.account }) });
    const run = await running(picked.http);
    expect((await picked.store.get(run.context.id))?.fingerprint).toBe(fingerprintOf({ account: 'acct' }));
    const none = core({ fingerprint: false });
    const bare = await running(none.http);
    expect((await none.store.get(bare.context.id))?.fingerprint).toBeNull();
  });

  it('keyFromFingerprint: without a key, the key is fp:<fingerprint> kept for the window; a real key keeps the route retention', async () => {
    const { http, store } = core({ keyFromFingerprint: { windowMs: 60_000 } });
    const before = Date.now();
    const derived = await running(http, request(undefined));
    const fingerprint = fingerprintV1({ method: 'POST', path: '/payments', query: '', body: { json: { amount: 1 } }, headers: [] });
    expect(derived.context.key).toBe(`fp:${fingerprint}`);
    expect(derived.ttlMs).toBe(60_000);
    await http.finish(derived, { kind: 'response', response: { status: 201, headers: [], body: 'ok' } });
    const record = await store.get(derived.context.id);
    expect(record?.expiresAt).toBeGreaterThanOrEqual(before + 60_000);
    expect(record?.expiresAt).toBeLessThanOrEqual(Date.now() + 60_000);
    const keyed = await running(http, request('real-key'));
    expect(keyed.ttlMs).toBeUndefined();
    const routed = await http.begin(request('routed'), { ttlMs: 5_000 });
    expect(routed.kind === 'run' && routed.run.ttlMs).toBe(5_000);
  });

  it('route overrides reach the claim: lease and wait', async () => {
    const store = memoryStore();
    const leases: number[] = [];
    const spy = {
      ...store,
      claim: (id, input) => {
        leases.push(input.leaseMs);
        return store.claim(id, input);
      },
    } as IdempotencyStore;
    const http = new HttpIdempotency<Raw>({ store: spy, scope: false });
    await http.begin(request('a'), { leaseMs: 4_321 });
    const started = Date.now();
    const waited = await http.begin(request('a'), { wait: { timeoutMs: 120, pollMs: 20 } });
    expect(waited.kind === 'respond' && waited.response.status).toBe(409);
    expect(Date.now() - started).toBeGreaterThanOrEqual(100);
    expect(leases[0]).toBe(4_321);
  });

  it('in flight: 409 with Retry-After; another body: 422; store down: 503', async () => {
    const { http } = core();
    await running(http);
    const busy = await http.begin(request('k'));
    expect(busy.kind === 'respond' && busy.response).toMatchObject({ status: 409, headers: expect.arrayContaining([['retry-after', '1']]) });
    const other = await http.begin(request('k', { body: { json: { amount: 2 } } }));
    expect(other.kind === 'respond' && other.response.status).toBe(422);
    const down = new HttpIdempotency<Raw>({
      store: { ...memoryStore(), claim: () => Promise.reject(new Error('ECONNREFUSED')) } as IdempotencyStore,
      scope: false,
    });
    const unavailable = await down.begin(request('k'));
    expect(unavailable.kind === 'respond' && unavailable.response.status).toBe(503);
  });
});

describe('replays', () => {
  it('the stored response with Idempotent-Replayed: true appended, body byte for byte', async () => {
    const { http } = core();
    const run = await running(http);
    const bytes = new Uint8Array([0xff, 0x00, 0x41]);
    await http.finish(run, { kind: 'response', response: { status: 201, headers: [['Content-Type', 'application/octet-stream']], body: bytes } });
    const replay = await http.begin(request('k'));
    expect(replay).toEqual({
      kind: 'respond',
      response: { status: 201, headers: [['content-type', 'application/octet-stream'], ['idempotent-replayed', 'true']], body: bytes },
    });
  });

  it('a marker: 303 to its Location, or 409 without; the constraint strategy: 409 already-processed', async () => {
    const { http } = core();
    const located = await running(http, request('a'));
    await http.finish(located, { kind: 'unstorable', status: 201, headers: [['Location', '/payments/7']] });
    const redirected = await http.begin(request('a'));
    expect(redirected.kind === 'respond' && redirected.response).toMatchObject({ status: 303, headers: expect.arrayContaining([['location', '/payments/7']]) });
    const plain = await running(http, request('b'));
    await http.finish(plain, { kind: 'unstorable', status: 200, headers: [] });
    const conflict = await http.begin(request('b'));
    expect(conflict.kind === 'respond' && body(conflict.response)).toMatchObject({ status: 409, type: 'https://oncely.dev/problems/completed-not-replayable', originalStatus: 200 });

    const constraint = core({ strategy: 'constraint' }).http;
    const done = await running(constraint);
    await constraint.finish(done, { kind: 'response', response: { status: 201, headers: [], body: 'created' } });
    const again = await constraint.begin(request('k'));
    expect(again.kind === 'respond' && body(again.response)).toMatchObject({ status: 409, type: 'https://oncely.dev/problems/already-processed' });
  });
});

describe('finish', () => {
  it('stores by the default policy: 2xx-4xx kept, 5xx and the retryable 4xx released with their status as reason', async () => {
    const { http, store } = core();
    const reasons: string[] = [];
    http.engine.on('released', (e) => reasons.push(e.reason));
    const results: Array<[number, string | undefined]> = [];
    for (const status of [201, 302, 400, 404, 409, 500]) {
      const run = await running(http, request(`k-${status}`));
      results.push([status, await http.finish(run, { kind: 'response', response: { status, headers: [], body: '' } })]);
      expect(store.size).toBe(results.filter(([, s]) => s === 'stored').length);
    }
    expect(results).toEqual([
      [201, 'stored'],
      [302, 'stored'],
      [400, 'stored'],
      [404, 'released'],
      [409, 'released'],
      [500, 'released'],
    ]);
    expect(reasons).toEqual(['status 404', 'status 409', 'status 500']);
  });

  it('the handler decision wins over the policy, both ways; a custom policy replaces the default', async () => {
    const { http } = core();
    const kept = await running(http, request('a'));
    kept.context.decide('store');
    expect(await http.finish(kept, { kind: 'response', response: { status: 503, headers: [], body: '' } })).toBe('stored');
    const dropped = await running(http, request('b'));
    const { decide } = dropped.context;
    decide('release');
    expect(await http.finish(dropped, { kind: 'response', response: { status: 201, headers: [], body: '' } })).toBe('released');
    const custom = core({ outcome: (status) => (status === 201 ? 'release' : 'store') }).http;
    const run = await running(custom);
    expect(await custom.finish(run, { kind: 'response', response: { status: 201, headers: [], body: '' } })).toBe('released');
  });

  it('keeps only replayable headers, names lower-cased, never the ones never replayed', async () => {
    const { http, store } = core({ replayHeaders: ['X-Payment-Id', 'Set-Cookie'] });
    const run = await running(http);
    await http.finish(run, {
      kind: 'response',
      response: {
        status: 201,
        headers: [
          ['Content-Type', 'application/json'],
          ['X-Payment-Id', 'p1'],
          ['Set-Cookie', 'session=1'],
          ['X-Request-Id', 'r1'],
          ['ETag', '"v1"'],
        ],
        body: '{}',
      },
    });
    const record = await store.get(run.context.id);
    const outcome = decodeOutcome(record?.state === 'completed' ? record.outcome : '');
    expect(outcome.kind === 'response' && outcome.response.headers).toEqual([
      ['content-type', 'application/json'],
      ['x-payment-id', 'p1'],
      ['etag', '"v1"'],
    ]);
  });

  it('an unstorable answer stores a marker with its Location (any case); the constraint strategy stores processed', async () => {
    const { http, store } = core();
    const run = await running(http);
    await http.finish(run, { kind: 'unstorable', status: 202, headers: [['content-type', 'x'], ['LOCATION', '/jobs/1']] });
    const record = await store.get(run.context.id);
    expect(record?.state === 'completed' && record.outcome).toBe(encodeOutcome({ kind: 'marker', status: 202, location: '/jobs/1' }));
    for (const finished of [
      { kind: 'unstorable' as const, status: 202, headers: [] },
      { kind: 'response' as const, response: { status: 201, headers: [], body: 'x' } },
    ]) {
      const c = core({ strategy: 'constraint' });
      const r = await running(c.http);
      await c.http.finish(r, finished);
      const rec = await c.store.get(r.context.id);
      const status = finished.kind === 'response' ? 201 : 202;
      expect(rec?.state === 'completed' && rec.outcome).toBe(encodeOutcome({ kind: 'processed', status }));
    }
  });

  it('keeps the retention of the run', async () => {
    const { http, store } = core({ ttlMs: 3_600_000 });
    const run = await http.begin(request('k'), { ttlMs: 10_000 });
    if (run.kind !== 'run') throw new Error('expected run');
    const before = Date.now();
    await http.finish(run.run, { kind: 'response', response: { status: 201, headers: [], body: '' } });
    expect((await store.get(run.run.context.id))?.expiresAt).toBeLessThanOrEqual(Date.now() + 10_000);
    expect((await store.get(run.run.context.id))?.expiresAt).toBeGreaterThanOrEqual(before + 10_000);
  });
});

describe('an answer that went out', () => {
  it('marks the claim: a failure then completes with the marker (with its Location)', async () => {
    const { http, store } = core();
    const run = await running(http);
    http.answered(run, 201, [['location', '/p/1']]);
    expect(run.claim?.marker).toBe(encodeOutcome({ kind: 'marker', status: 201, location: '/p/1' }));
    expect(await http.fail(run, 'stream broke')).toBe('stored');
    expect((await store.get(run.context.id))?.state).toBe('completed');
  });

  it('not for a status the policy releases, or that the handler released: a failure then releases', async () => {
    const { http, store } = core();
    const failed = await running(http, request('a'));
    http.answered(failed, 503, []);
    expect(failed.claim?.marker).toBeUndefined();
    expect(await http.fail(failed, 'stream broke')).toBe('released');
    const decided = await running(http, request('b'));
    decided.context.decide('release');
    http.answered(decided, 200, []);
    expect(decided.claim?.marker).toBeUndefined();
    expect(store.size).toBe(1);
  });

  it('under the constraint strategy the marker is processed', async () => {
    const { http } = core({ strategy: 'constraint' });
    const run = await running(http);
    http.answered(run, 200, [['location', '/x']]);
    expect(run.claim?.marker).toBe(encodeOutcome({ kind: 'processed', status: 200 }));
  });

  it('gone: the claim stops renewing (abandoned), or completes with its marker when an answer went out', async () => {
    const { http, store } = core();
    const quiet = await running(http, request('a'));
    http.gone(quiet);
    expect(quiet.claim?.settling).toBe(false);
    const answered = await running(http, request('b'));
    http.answered(answered, 201, []);
    http.gone(answered);
    expect(answered.claim?.settling).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 10));
    expect((await store.get(answered.context.id))?.state).toBe('completed');
  });
});

describe('without a claim (store down, failOpen)', () => {
  function bypassing() {
    const down = { ...memoryStore(), claim: () => Promise.reject(new Error('ECONNREFUSED')) } as IdempotencyStore;
    return new HttpIdempotency<Raw>({ store: down, scope: false, failOpen: true });
  }

  it('runs with a context that never aborts and is never a takeover; settling does nothing', async () => {
    const http = bypassing();
    const run = await running(http);
    expect(run.claim).toBeNull();
    expect(run.context.key).toBe('k');
    expect(run.context.takeover).toBe(false);
    expect(run.context.signal.aborted).toBe(false);
    expect(await http.finish(run, { kind: 'response', response: { status: 201, headers: [], body: '' } })).toBeUndefined();
    expect(await http.fail(run, 'x')).toBeUndefined();
    http.answered(run, 201, []);
    http.gone(run);
    expect(http.replacement(run, undefined, 201)).toBeUndefined();
  });

  it('a step runs with a key derived from the request key; there is no transaction', async () => {
    const run = await running(bypassing());
    expect(await run.context.step('pay', (s) => `${s.key} ${s.takeover} ${s.signal.aborted}`)).toBe('k:pay false false');
    await expect(run.context.transaction()).rejects.toThrow(ConfigError);
    await expect(run.context.transaction()).rejects.toThrow(/no transaction/);
  });
});

describe('transactional replacement', () => {
  function transactional(commit: () => Promise<boolean>) {
    const store = memoryStore();
    const transactions: StoreTransactions = { open: async () => ({ client: 'db', commit, rollback: async () => {} }) };
    return new HttpIdempotency<Raw>({ store: { ...store, transactions } as IdempotencyStore, scope: false });
  }

  it('an answer whose writes did not commit is replaced by a 503 problem; a stored one is not', async () => {
    const failing = transactional(() => Promise.reject(new Error('connection lost')));
    const run = await running(failing);
    expect(await run.context.transaction()).toBe('db');
    const settled = await failing.finish(run, { kind: 'response', response: { status: 201, headers: [], body: '' } });
    expect(settled).toBe('rolled_back');
    const replaced = failing.replacement(run, settled, 201);
    expect(replaced).toMatchObject({ status: 503 });
    expect(body(replaced!)).toMatchObject({
      detail: 'The operation did not commit (its transaction rolled back); nothing happened. Retry with the same key.',
    });
    const ok = transactional(async () => true);
    const good = await running(ok);
    await good.context.transaction();
    const stored = await ok.finish(good, { kind: 'response', response: { status: 201, headers: [], body: '' } });
    expect(ok.replacement(good, stored, 201)).toBeUndefined();
  });

  it('a released answer goes out as it is; so does any answer of a run that never opened a transaction', async () => {
    const failing = transactional(() => Promise.reject(new Error('connection lost')));
    const released = await running(failing, request('a'));
    await released.context.transaction();
    expect(failing.replacement(released, 'released', 500)).toBeUndefined();
    const decided = await running(failing, request('b'));
    await decided.context.transaction();
    decided.context.decide('release');
    expect(failing.replacement(decided, 'released', 201)).toBeUndefined();
    const plain = await running(failing, request('c'));
    expect(failing.replacement(plain, 'unsettled', 201)).toBeUndefined();
  });

  it('a step runs under the claim', async () => {
    const { http } = core();
    const run = await running(http);
    let runs = 0;
    expect(await run.context.step('reserve', () => ++runs)).toBe(1);
    expect(await run.context.step('reserve', () => ++runs)).toBe(1);
  });
});

describe('captureHeaders', () => {
  it('reads the replayed headers and Location by name, joins arrays, stringifies numbers, skips the missing', () => {
    const { http } = core({ replayHeaders: ['X-Count'] });
    const values: Record<string, number | string | string[] | null> = {
      'content-type': 'text/plain',
      link: ['<a>', '<b>'],
      'x-count': 3,
      etag: null,
      'set-cookie': 'x',
    };
    expect(http.captureHeaders((name) => values[name])).toEqual([
      ['content-type', 'text/plain'],
      ['link', '<a>, <b>'],
      ['x-count', '3'],
    ]);
  });
});

describe('problem', () => {
  it('is the problem response of an oncely error', () => {
    const response = core().http.problem(new InFlightError(0, 1));
    expect(response.status).toBe(409);
    expect(response.headers).toContainEqual(['content-type', 'application/problem+json']);
  });
});
