import { describe, expect, it } from 'vitest';
import { memoryStore } from '../stores/memory.js';
import { HttpIdempotency, type HttpRequestView } from './core.js';
import { DEFAULT_REPLAY_HEADERS, defaultOutcomePolicy, NEVER_REPLAYED, RELEASED_4XX } from './policy.js';

// Headers an audit saw replayed when named in `replayHeaders`, and their kin:
// tracing and request ids (per request), CSRF tokens and credentials (per
// session), auth challenges, timings, and connection-level policy.
const MUST_NEVER_REPLAY = [
  'traceparent',
  'tracestate',
  'x-trace-id',
  'x-amzn-trace-id',
  'x-b3-traceid',
  'b3',
  'x-cloud-trace-context',
  'x-amzn-requestid',
  'x-amz-cf-id',
  'cf-ray',
  'x-csrf-token',
  'x-xsrf-token',
  'csrf-token',
  'www-authenticate',
  'proxy-authenticate',
  'authorization',
  'cookie',
  'server-timing',
  'alt-svc',
  'strict-transport-security',
];

describe('NEVER_REPLAYED', () => {
  it.each(MUST_NEVER_REPLAY)('holds %s', (name) => {
    expect(NEVER_REPLAYED.has(name)).toBe(true);
  });

  it('holds only lower-case names, none of them replayed by default', () => {
    for (const name of NEVER_REPLAYED) expect(name).toBe(name.toLowerCase());
    expect(DEFAULT_REPLAY_HEADERS.filter((name) => NEVER_REPLAYED.has(name))).toEqual([]);
  });

  it('wins over replayHeaders, in any case: none is captured for the record', () => {
    const core = new HttpIdempotency({
      store: memoryStore(),
      scope: false,
      replayHeaders: [...MUST_NEVER_REPLAY.map((name) => name.toUpperCase()), 'x-payment-batch'],
    });
    const captured = core.captureHeaders((name) => `value of ${name}`).map(([name]) => name);
    expect(captured).toContain('x-payment-batch');
    expect(captured.filter((name) => MUST_NEVER_REPLAY.includes(name))).toEqual([]);
  });
});

describe('defaultOutcomePolicy', () => {
  it('releases 5xx and the 4xx a retry can change, 404 and 405 among them', () => {
    for (const status of [401, 403, 404, 405, 408, 409, 425, 429, 500, 502, 503, 504]) {
      expect([status, defaultOutcomePolicy(status)]).toEqual([status, 'release']);
    }
    expect([...RELEASED_4XX].sort((a, b) => a - b)).toEqual([401, 403, 404, 405, 408, 409, 425, 429]);
  });

  it('stores 2xx, 3xx and the other 4xx', () => {
    for (const status of [200, 201, 202, 204, 301, 303, 304, 400, 402, 406, 410, 412, 413, 415, 422]) {
      expect([status, defaultOutcomePolicy(status)]).toEqual([status, 'store']);
    }
  });

  it.each([404, 405])('lets a retry after a %i run again: the key is not used up', async (status) => {
    const core = new HttpIdempotency<null>({ store: memoryStore(), scope: false });
    const view: HttpRequestView<null> = {
      raw: null,
      method: 'POST',
      path: '/no-such-route',
      query: '',
      header: (name) => (name === 'idempotency-key' ? ['k-404'] : undefined),
      body: { json: { amount: 1 } },
    };
    const first = await core.begin(view);
    expect(first.kind).toBe('run');
    if (first.kind === 'run') await core.finish(first.run, { kind: 'response', response: { status, headers: [], body: 'no' } });
    expect((await core.begin(view)).kind).toBe('run');
  });
});
