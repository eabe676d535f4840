import { describe, expect, it } from 'vitest';
import { memoryStore } from '../stores/memory.js';
import { HttpIdempotency } from './core.js';
import { DEFAULT_REPLAY_HEADERS, NEVER_REPLAYED } from './policy.js';

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
