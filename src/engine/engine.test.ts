import { describe, expect, it } from 'vitest';
import { memoryStore } from '../stores/memory.js';
import { Engine } from './engine.js';
import { currentRun, idempotent } from './idempotent.js';
import type { IdempotencyStore } from './store.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let seq = 0;
const id = () => `id-${Date.now()}-${++seq}`;

/**
 * The same real store seen through a link that can be cut: while `cut` is
 * set, every call from this side fails, as in a network partition between one
 * worker and the store. The other worker keeps its own healthy link.
 */
function partitioned(store: IdempotencyStore) {
  const link = { cut: false, renews: 0 };
  const guard =
    <A extends unknown[], R>(name: string, fn: (...args: A) => Promise<R>) =>
    (...args: A): Promise<R> => {
      if (name === 'renew') link.renews++;
      return link.cut ? Promise.reject(new Error('ECONNRESET')) : fn(...args);
    };
  const view: IdempotencyStore = {
    name: store.name,
    capabilities: store.capabilities,
    claim: guard('claim', store.claim.bind(store)),
    renew: guard('renew', store.renew.bind(store)),
    complete: guard('complete', store.complete.bind(store)),
    release: guard('release', store.release.bind(store)),
    get: guard('get', store.get.bind(store)),
    delete: guard('delete', store.delete.bind(store)),
    purgeExpired: guard('purge', store.purgeExpired.bind(store)),
    close: store.close.bind(store),
  };
  return { view, link };
}

describe('Engine', () => {
  it('renews the lease while the operation runs, keeping duplicates out past the first lease', async () => {
    const store = memoryStore();
    const engine = new Engine({ store, leaseMs: 150 });
    const key = id();
    const begun = await engine.begin({ id: key, fingerprint: 'f' });
    if (begun.kind !== 'run') throw new Error('expected run');
    await sleep(500);
    expect(await engine.begin({ id: key, fingerprint: 'f' })).toMatchObject({ error: { code: 'ONCELY_IN_FLIGHT' } });
    expect(begun.claim.signal.aborted).toBe(false);
    expect(await begun.claim.complete('done')).toBe(true);
    const replay = await engine.begin({ id: key, fingerprint: 'f' });
    expect(replay.kind).toBe('replay');
  });

  it('a worker cut off from the store loses its lease: its signal aborts, another takes over, and its late write is fenced', async () => {
    const store = memoryStore();
    const a = partitioned(store);
    const workerA = new Engine({ store: a.view, leaseMs: 150, storeTimeoutMs: 50 });
    const workerB = new Engine({ store, leaseMs: 150 });
    const events: string[] = [];
    workerA.on('fenced', (e) => events.push(`fenced:${e.operation}`));
    const key = id();

    const begunA = await workerA.begin({ id: key, fingerprint: 'f' });
    if (begunA.kind !== 'run') throw new Error('expected run');
    a.link.cut = true;
    const lost = new Promise<unknown>((resolve) => begunA.claim.signal.addEventListener('abort', () => resolve(begunA.claim.signal.reason)));
    await expect(lost).resolves.toMatchObject({ code: 'ONCELY_LEASE_LOST' });

    // B takes over the expired lease and completes.
    const begunB = await workerB.begin({ id: key, fingerprint: 'f' });
    if (begunB.kind !== 'run') throw new Error('expected takeover');
    expect(begunB.claim.takeover).toBe(true);
    expect(await begunB.claim.complete('from-B')).toBe(true);

    // A's link heals; its late complete must not overwrite B's record.
    a.link.cut = false;
    expect(await begunA.claim.complete('from-A')).toBe(false);
    expect(events).toContain('fenced:complete');
    const record = await store.get(key);
    expect(record?.state === 'completed' && record.outcome).toBe('from-B');
  });

  it('a stale worker cannot release the new owner', async () => {
    const store = memoryStore();
    const engine = new Engine({ store, leaseMs: 100 });
    const key = id();
    const first = await engine.begin({ id: key, fingerprint: null });
    if (first.kind !== 'run') throw new Error('expected run');
    // The record changes hands behind the first worker's back (deleted by an
    // operator, then claimed anew); the first worker still holds its old token.
    await store.delete(key);
    const second = await engine.begin({ id: key, fingerprint: null });
    if (second.kind !== 'run') throw new Error('expected run');
    expect(await first.claim.release()).toBe(false);
    expect((await store.get(key))?.state).toBe('in_progress');
    expect(await second.claim.complete('ok')).toBe(true);
  });

  it('answers a mismatch for a different fingerprint, in flight or completed', async () => {
    const engine = new Engine({ store: memoryStore() });
    const key = id();
    const begun = await engine.begin({ id: key, fingerprint: 'f1' });
    expect(await engine.begin({ id: key, fingerprint: 'f2' })).toMatchObject({ error: { code: 'ONCELY_FINGERPRINT_MISMATCH', status: 422 } });
    if (begun.kind === 'run') await begun.claim.complete('x');
    expect(await engine.begin({ id: key, fingerprint: 'f2' })).toMatchObject({ error: { code: 'ONCELY_FINGERPRINT_MISMATCH' } });
  });

  it('waits for an in-flight duplicate and replays its outcome', async () => {
    const engine = new Engine({ store: memoryStore(), wait: { timeoutMs: 2_000, pollMs: 10 } });
    const key = id();
    const begun = await engine.begin({ id: key, fingerprint: null });
    if (begun.kind !== 'run') throw new Error('expected run');
    setTimeout(() => void begun.claim.complete('answer'), 100);
    const waited = await engine.begin({ id: key, fingerprint: null });
    expect(waited.kind === 'replay' && waited.record.outcome).toBe('answer');
  });

  it('gives up waiting after the timeout with InFlightError', async () => {
    const engine = new Engine({ store: memoryStore(), wait: { timeoutMs: 100, pollMs: 10 } });
    const key = id();
    await engine.begin({ id: key, fingerprint: null });
    const started = Date.now();
    expect(await engine.begin({ id: key, fingerprint: null })).toMatchObject({ error: { code: 'ONCELY_IN_FLIGHT' } });
    expect(Date.now() - started).toBeGreaterThanOrEqual(90);
  });

  it('turns a slow or failing store into StoreUnavailableError and reports it', async () => {
    const store = memoryStore();
    const errors: string[] = [];
    const slow: IdempotencyStore = {
      ...store,
      capabilities: { ...store.capabilities, synchronous: false },
      claim: () => new Promise(() => {}),
    };
    const engine = new Engine({ store: slow, storeTimeoutMs: 50, hooks: { storeError: (e) => errors.push(e.operation) } });
    expect(await engine.begin({ id: id(), fingerprint: null })).toMatchObject({ error: { code: 'ONCELY_STORE_UNAVAILABLE', status: 503 } });
    expect(errors).toEqual(['claim']);
  });

  it('refuses nonsense configuration', () => {
    expect(() => new Engine({ store: memoryStore(), leaseMs: 0 })).toThrow(/leaseMs/);
    expect(() => new Engine({ store: memoryStore(), leaseMs: 10_000, ttlMs: 1_000 })).toThrow(/ttlMs/);
    expect(() => new Engine({ store: undefined as never })).toThrow(/store/);
  });
});

describe('idempotent()', () => {
  it('runs once per key under 100 concurrent calls, and replays the result', async () => {
    let runs = 0;
    const charge = idempotent(
      async (req: { id: string; amount: number }) => {
        runs++;
        await sleep(50);
        return { charged: req.amount, run: runs };
      },
      { store: memoryStore(), namespace: 'charge', key: (req) => req.id, wait: { timeoutMs: 5_000, pollMs: 5 } },
    );
    const results = await Promise.all(Array.from({ length: 100 }, () => charge({ id: 'evt_1', amount: 5 })));
    expect(runs).toBe(1);
    expect(new Set(results.map((r) => JSON.stringify(r))).size).toBe(1);
    expect(await charge({ id: 'evt_1', amount: 5 })).toEqual({ charged: 5, run: 1 });
  });

  it('refuses the same key with other arguments', async () => {
    const fn = idempotent(async (_id: string, amount: number) => amount, { store: memoryStore(), namespace: 'amounts', key: (k) => k });
    await fn('k', 1);
    await expect(fn('k', 2)).rejects.toMatchObject({ code: 'ONCELY_FINGERPRINT_MISMATCH' });
  });

  it('releases on a thrown error (a retry runs) but stores a final error (a retry throws it again)', async () => {
    let runs = 0;
    const flaky = idempotent(
      async (k: string) => {
        runs++;
        if (runs === 1) throw new Error('transient');
        if (k === 'final') throw Object.assign(new Error('card declined'), { final: true, code: 'declined' });
        return 'ok';
      },
      { store: memoryStore(), namespace: 'flaky', key: (k) => k },
    );
    await expect(flaky('a')).rejects.toThrow('transient');
    expect(await flaky('a')).toBe('ok');
    expect(runs).toBe(2);
    await expect(flaky('final')).rejects.toThrow('card declined');
    await expect(flaky('final')).rejects.toMatchObject({ message: 'card declined', code: 'declined', replayed: true });
    expect(runs).toBe(3);
  });

  it('exposes the run (key, lease signal) to the wrapped function and keeps undefined results', async () => {
    const seen: string[] = [];
    const fn = idempotent(
      async () => {
        seen.push(currentRun()?.key ?? 'none');
        return undefined;
      },
      { store: memoryStore(), namespace: 'job', key: () => 'job-1', fingerprint: false },
    );
    expect(await fn()).toBeUndefined();
    expect(await fn()).toBeUndefined();
    expect(seen).toEqual(['job-1']);
  });
});
