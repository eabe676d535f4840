import { describe, expect, it } from 'vitest';
import { ConfigError, NotReplayableError } from '../errors/index.js';
import { HttpIdempotency } from '../http/core.js';
import { memoryStore } from '../stores/memory.js';
import { type Claim, Engine } from './engine.js';
import { idempotent } from './idempotent.js';
import type { IdempotencyStore } from './store.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let seq = 0;
const id = () => `claim-${Date.now()}-${++seq}`;

type Op = 'claim' | 'renew' | 'complete' | 'release';

/**
 * A real memory store seen through a link whose operations can be made to
 * fail (`fail`) or hang (`hang`) one by one, counting every call.
 */
function faulty(store: IdempotencyStore = memoryStore()) {
  const calls: Record<Op, number> = { claim: 0, renew: 0, complete: 0, release: 0 };
  const faults = { fail: new Set<Op>(), hang: new Set<Op>(), failTimes: { complete: 0 } };
  const wrap =
    <A extends unknown[], R>(op: Op, fn: (...args: A) => Promise<R>) =>
    (...args: A): Promise<R> => {
      calls[op]++;
      if (faults.hang.has(op)) return new Promise(() => {});
      if (faults.fail.has(op)) return Promise.reject(new Error(`ECONNRESET on ${op}`));
      if (op === 'complete' && faults.failTimes.complete > 0) {
        faults.failTimes.complete--;
        return Promise.reject(new Error('ECONNRESET on complete'));
      }
      return fn(...args);
    };
  const view: IdempotencyStore = {
    name: 'faulty',
    capabilities: { ...store.capabilities, synchronous: false },
    claim: wrap('claim', store.claim.bind(store)),
    renew: wrap('renew', store.renew.bind(store)),
    complete: wrap('complete', store.complete.bind(store)),
    release: wrap('release', store.release.bind(store)),
    get: store.get.bind(store),
    delete: store.delete.bind(store),
    purgeExpired: store.purgeExpired.bind(store),
    close: store.close.bind(store),
  };
  return { view, store, calls, faults };
}

async function won(engine: Engine, key: string, fingerprint: string | null = null): Promise<Claim> {
  const begun = await engine.begin({ id: key, fingerprint });
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  return begun.claim;
}

describe('Engine.begin answers results, not exceptions', () => {
  it('in flight, mismatch and unavailable each come back with their error', async () => {
    const { view, faults } = faulty();
    const engine = new Engine({ store: view, storeTimeoutMs: 50 });
    const key = id();
    await won(engine, key, 'f1');
    expect(await engine.begin({ id: key, fingerprint: 'f1' })).toMatchObject({ kind: 'in_flight', error: { code: 'ONCELY_IN_FLIGHT', status: 409 } });
    expect(await engine.begin({ id: key, fingerprint: 'f2' })).toMatchObject({ kind: 'mismatch', error: { code: 'ONCELY_FINGERPRINT_MISMATCH' } });
    faults.fail.add('claim');
    expect(await engine.begin({ id: id(), fingerprint: null })).toMatchObject({ kind: 'unavailable', error: { code: 'ONCELY_STORE_UNAVAILABLE' } });
  });

  it('the in-flight answer says to retry in a second and when the lease ends', async () => {
    const engine = new Engine({ store: memoryStore(), leaseMs: 10_000 });
    const key = id();
    const before = Date.now();
    await won(engine, key);
    const begun = await engine.begin({ id: key, fingerprint: null });
    expect(begun.kind === 'in_flight' && begun.error.retryAfter).toBe(1);
    expect(begun.kind === 'in_flight' && begun.error.leaseUntil).toBeGreaterThanOrEqual(before + 10_000);
  });

  it('beginMany claims in one go, answers per id, and refuses repeated ids', async () => {
    const store = memoryStore();
    const engine = new Engine({ store });
    const [a, b, c] = [id(), id(), id()];
    const done = await won(engine, a);
    await done.complete('A');
    await won(engine, b);
    const begun = await engine.beginMany([a, b, c]);
    expect(begun.map((x) => x.kind)).toEqual(['replay', 'in_flight', 'run']);
    await expect(engine.beginMany([c, c])).rejects.toBeInstanceOf(ConfigError);
  });
});

describe('a claim settles exactly once', () => {
  it('the first settlement wins; a later one answers the same and writes nothing', async () => {
    const store = memoryStore();
    const engine = new Engine({ store });
    const key = id();
    const claim = await won(engine, key);
    const first = claim.settle({ kind: 'complete', outcome: 'one' });
    const second = claim.settle({ kind: 'release', reason: 'late' });
    expect(await first).toBe('stored');
    expect(await second).toBe('stored');
    expect(await claim.release()).toBe(false);
    expect(await store.get(key)).toMatchObject({ state: 'completed', outcome: 'one' });
  });

  it('perform settles on every path: a result as told, a throw released, a throwing settle released', async () => {
    const store = memoryStore();
    const engine = new Engine({ store });
    const [a, b, c] = [id(), id(), id()];
    const ok = await (await won(engine, a)).perform({ run: () => 7, settle: (v) => ({ kind: 'complete', outcome: String(v) }) });
    expect(ok).toEqual({ ok: true, value: 7, settled: 'stored' });
    const threw = await (await won(engine, b)).perform({
      run: () => {
        throw new Error('boom');
      },
      settle: () => ({ kind: 'complete', outcome: 'never' }),
    });
    expect(threw).toMatchObject({ ok: false, settled: 'released' });
    const badSettle = await (await won(engine, c)).perform({
      run: () => 1,
      settle: () => {
        throw new Error('cannot encode');
      },
    });
    expect(badSettle).toMatchObject({ ok: false, settled: 'released' });
    expect(await store.get(b)).toBeNull();
    expect(await store.get(c)).toBeNull();
  });

  it('a failure after an answer went out completes with the marker: never run again', async () => {
    const store = memoryStore();
    const engine = new Engine({ store });
    const key = id();
    const claim = await won(engine, key);
    claim.answered('marker');
    expect(await claim.fail('stream broke')).toBe('stored');
    expect(await store.get(key)).toMatchObject({ state: 'completed', outcome: 'marker' });
  });

  it('a completion that cannot reach the store is retried with the same token until it lands', async () => {
    const { view, store, calls, faults } = faulty();
    const engine = new Engine({ store: view, leaseMs: 2_000, storeTimeoutMs: 100 });
    const key = id();
    const claim = await won(engine, key);
    faults.failTimes.complete = 5; // more than the three quick tries of old
    expect(await claim.complete('late but stored')).toBe(true);
    expect(calls.complete).toBe(6);
    expect(await store.get(key)).toMatchObject({ state: 'completed', outcome: 'late but stored' });
  });

  it('a completion gives up at the lease deadline, not before and not never', async () => {
    const { view, faults } = faulty();
    const events: string[] = [];
    const engine = new Engine({ store: view, leaseMs: 400, storeTimeoutMs: 50, hooks: { unsettled: () => events.push('unsettled') } });
    const claim = await won(engine, id());
    faults.fail.add('complete');
    faults.fail.add('renew');
    const started = Date.now();
    expect(await claim.settle({ kind: 'complete', outcome: 'x' })).toBe('unsettled');
    const took = Date.now() - started;
    expect(took).toBeGreaterThan(150);
    expect(took).toBeLessThan(1_500);
    expect(events).toEqual(['unsettled']);
  });
});

describe('the lease deadline is tracked locally', () => {
  it('the signal fires at the deadline while a renewal hangs, not a store timeout later', async () => {
    const { view, faults } = faulty();
    // A renewal hangs for up to 5 s; the lease is 300 ms. Before, the signal fired only when
    // the renewal failed: about 100 + 5,000 ms after the claim.
    const engine = new Engine({ store: view, leaseMs: 300, storeTimeoutMs: 5_000 });
    faults.hang.add('renew');
    const started = Date.now();
    const claim = await won(engine, id());
    await new Promise((resolve) => claim.signal.addEventListener('abort', resolve));
    const firedAfter = Date.now() - started;
    expect(firedAfter).toBeGreaterThanOrEqual(290);
    expect(firedAfter).toBeLessThan(1_500);
    expect(claim.lost).toBe(true);
    expect(claim.signal.reason).toMatchObject({ code: 'ONCELY_LEASE_LOST' });
  });

  it('a renewal that succeeds moves the deadline: the signal stays quiet for a long run', async () => {
    const engine = new Engine({ store: memoryStore(), leaseMs: 150 });
    const claim = await won(engine, id());
    await sleep(600);
    expect(claim.signal.aborted).toBe(false);
    expect(claim.leaseUntil).toBeGreaterThan(Date.now());
    expect(await claim.complete('done')).toBe(true);
  });

  it('the deadline counts from when the claim was sent, so it never outlives the store lease', async () => {
    const engine = new Engine({ store: memoryStore(), leaseMs: 1_000 });
    const before = Date.now();
    const claim = await won(engine, id());
    expect(claim.leaseUntil).toBeLessThanOrEqual(Date.now() + 1_000);
    expect(claim.leaseUntil).toBeGreaterThanOrEqual(before + 1_000);
    await claim.release();
  });
});

describe('abandon: the request is gone, the handler may still run', () => {
  it('stops renewing; the lease lapses and another worker takes over; the late completion is fenced', async () => {
    const { view, store, calls } = faulty();
    const engine = new Engine({ store: view, leaseMs: 150 });
    const key = id();
    const claim = await won(engine, key);
    claim.abandon();
    const renewsAtAbandon = calls.renew;
    await sleep(250);
    expect(calls.renew).toBe(renewsAtAbandon);
    expect(claim.signal.aborted).toBe(true);
    const other = new Engine({ store, leaseMs: 150 });
    const next = await won(other, key);
    expect(next.takeover).toBe(true);
    expect(await claim.complete('stale')).toBe(false);
    expect(await next.complete('fresh')).toBe(true);
    expect(await store.get(key)).toMatchObject({ outcome: 'fresh' });
  });

  it('a settlement that still comes before anyone takes over counts', async () => {
    const store = memoryStore();
    const engine = new Engine({ store, leaseMs: 5_000 });
    const key = id();
    const claim = await won(engine, key);
    claim.abandon();
    expect(await claim.complete('answered late')).toBe(true);
    expect(await store.get(key)).toMatchObject({ state: 'completed', outcome: 'answered late' });
  });

  it('with an answer already out, abandoning completes with its marker at once', async () => {
    const store = memoryStore();
    const engine = new Engine({ store });
    const key = id();
    const claim = await won(engine, key);
    claim.answered('sent-marker');
    claim.abandon();
    await sleep(10);
    expect(await store.get(key)).toMatchObject({ state: 'completed', outcome: 'sent-marker' });
  });
});

describe('idempotent(): every claim settles', () => {
  it('a result JSON cannot hold completes with a marker: the effect never runs again (item 5)', async () => {
    let runs = 0;
    const store = memoryStore();
    const fn = idempotent(
      async () => {
        runs++;
        return { amount: 10n };
      },
      { store, namespace: 'bigint', key: () => 'k', fingerprint: false },
    );
    expect(await fn()).toEqual({ amount: 10n });
    await expect(fn()).rejects.toBeInstanceOf(NotReplayableError);
    expect(runs).toBe(1);
    const circular: Record<string, unknown> = {};
    circular.self = circular;
    const cyclic = idempotent(async () => circular, { store, namespace: 'cycle', key: () => 'k', fingerprint: false });
    expect(await cyclic()).toBe(circular);
    await expect(cyclic()).rejects.toMatchObject({ code: 'ONCELY_NOT_REPLAYABLE' });
  });

  it('two inline functions cannot silently share keys (item 6)', async () => {
    const store = memoryStore();
    expect(() => idempotent(async () => 1, { store, key: () => 'k' })).toThrow(ConfigError);
    const refund = idempotent(async () => 'refund', { store, namespace: 'refund', key: () => 'order-1' });
    const ship = idempotent(async () => 'ship', { store, namespace: 'ship', key: () => 'order-1' });
    expect(await refund()).toBe('refund');
    expect(await ship()).toBe('ship');
  });
});

describe('one rule for engine settings; durations validated (items 10, 12)', () => {
  it('an engine together with engine options is refused, naming them', () => {
    const engine = new Engine({ store: memoryStore() });
    expect(() => new HttpIdempotency({ engine, ttlMs: 60_000, scope: false })).toThrow(/ttlMs/);
    expect(() => new HttpIdempotency({ engine, store: memoryStore(), scope: false })).toThrow(ConfigError);
    expect(() => idempotent(async function charge() {}, { engine, store: memoryStore(), key: () => 'k' })).toThrow(/store/);
    expect(() => new HttpIdempotency({ engine, scope: false })).not.toThrow();
  });

  it('a front door without an engine keeps its ttlMs on the records', async () => {
    const store = memoryStore();
    const core = new HttpIdempotency<null>({ store, ttlMs: 60_000, scope: false });
    const begun = await core.begin(view('POST', 'k-ttl'));
    if (begun.kind !== 'run') throw new Error('expected run');
    await core.finish(begun.run, { kind: 'response', response: { status: 201, headers: [], body: '{}' } });
    const record = await store.get(begun.run.context.id);
    expect(record?.expiresAt).toBeLessThanOrEqual(Date.now() + 60_000);
  });

  it('zero, negative, NaN and infinite durations are ConfigErrors, not a silent off switch', async () => {
    for (const bad of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
      expect(() => new HttpIdempotency({ store: memoryStore(), scope: false, keyFromFingerprint: { windowMs: bad } })).toThrow(
        ConfigError,
      );
      expect(() => new Engine({ store: memoryStore(), leaseMs: bad })).toThrow(ConfigError);
      expect(() => new Engine({ store: memoryStore(), wait: { timeoutMs: bad } })).toThrow(ConfigError);
    }
    // A route override of 0 is refused with a problem response, and nothing is claimed.
    const store = memoryStore();
    const core = new HttpIdempotency<null>({ store, scope: false });
    const begun = await core.begin(view('POST', 'k-zero'), { ttlMs: 0 });
    expect(begun).toMatchObject({ kind: 'respond', response: { status: 500 } });
    const again = await core.begin(view('POST', 'k-zero'));
    expect(again.kind).toBe('run');
  });
});

function view(method: string, key: string) {
  return {
    raw: null,
    method,
    path: '/payments',
    query: '',
    header: (name: string) => (name === 'idempotency-key' ? [key] : undefined),
    body: { json: { amount: 1 } },
  };
}
