/**
 * The function form: its settings, the record id and fingerprint of a call,
 * each answer of the engine, the run context, final errors, and the
 * transactional rule (a result whose writes did not commit is never
 * returned as if they had).
 */
import { describe, expect, it } from 'vitest';
import { ConfigError, FingerprintMismatchError, InFlightError, RolledBackError, StoreFullError } from '../errors/index.js';
import { memoryStore } from '../stores/memory.js';
import { Engine } from './engine.js';
import { fingerprintOf, recordId } from './fingerprint.js';
import { currentRun, idempotent, type RunContext } from './idempotent.js';
import type { ClaimInput, IdempotencyStore, StoreTransactions } from './store.js';

/** A memory store whose claims are logged; complete and the transactions can be scripted. */
function scripted(options: { complete?: IdempotencyStore['complete']; transactions?: StoreTransactions; claim?: IdempotencyStore['claim'] } = {}) {
  const real = memoryStore();
  const claims: Array<[string, ClaimInput]> = [];
  const store: IdempotencyStore = {
    name: 'scripted',
    capabilities: real.capabilities,
    claim: (id, input) => {
      claims.push([id, input]);
      return (options.claim ?? real.claim)(id, input);
    },
    renew: (id, token, leaseMs) => real.renew(id, token, leaseMs),
    complete: options.complete ?? ((id, token, outcome, ttlMs) => real.complete(id, token, outcome, ttlMs)),
    release: (id, token) => real.release(id, token),
    get: (id) => real.get(id),
    delete: (id) => real.delete(id),
    purgeExpired: (limit) => real.purgeExpired(limit),
    close: () => real.close(),
    ...(options.transactions ? { transactions: options.transactions } : {}),
  };
  return { store, real, claims };
}

describe('settings', () => {
  it('wraps a function, with a key function', () => {
    const store = memoryStore();
    expect(() => idempotent('charge' as never, { store, key: () => 'k' })).toThrow('idempotent() wraps a function.');
    expect(() => idempotent(async function charge() {}, { store } as never)).toThrow('idempotent() needs a `key` function.');
    expect(() => idempotent(async function charge() {}, undefined as never)).toThrow('idempotent() needs a `key` function.');
  });

  it('checks its own lease and retention', () => {
    const store = memoryStore();
    expect(() => idempotent(async function charge() {}, { store, key: () => 'k', leaseMs: 0 })).toThrow('leaseMs must be');
    expect(() => idempotent(async function charge() {}, { store, key: () => 'k', ttlMs: -1 })).toThrow('ttlMs must be');
  });

  it('an anonymous function needs a namespace; with one it is fine', async () => {
    const store = memoryStore();
    expect(() => idempotent(async () => 1, { store, key: () => 'k' })).toThrow(/anonymous function needs a `namespace`/);
    expect(await idempotent(async () => 1, { store, key: () => 'k', namespace: 'ns' })()).toBe(1);
  });

  it('lease, retention and wait are per-call settings that go with a shared engine', async () => {
    const { store, real, claims } = scripted();
    const engine = new Engine({ store, leaseMs: 30_000, ttlMs: 86_400_000 });
    const fn = idempotent(async function charge() {
      return 'ok';
    }, { engine, key: () => 'k', leaseMs: 1_234, ttlMs: 5_678, wait: { timeoutMs: 100 } });
    const before = Date.now();
    expect(await fn()).toBe('ok');
    expect(claims[0]![1]).toMatchObject({ leaseMs: 1_234, ttlMs: 5_678 });
    const record = await real.get(claims[0]![0]);
    expect(record?.expiresAt).toBeGreaterThanOrEqual(before + 5_678);
    expect(record?.expiresAt).toBeLessThanOrEqual(Date.now() + 5_678);
  });

  it('store-wide settings with an engine are refused (one rule for engine settings), naming idempotent()', () => {
    const engine = new Engine({ store: memoryStore() });
    expect(() => idempotent(async function charge() {}, { engine, key: () => 'k', failOpen: false })).toThrow(
      'idempotent() was given an `engine` and also `failOpen`: set those on the engine instead.',
    );
    for (const extra of [{ storeTimeoutMs: 10 }, { failOpen: true }, { hooks: {} }, { sessions: false as const }]) {
      expect(() => idempotent(async function charge() {}, { engine, key: () => 'k', ...extra })).toThrow(ConfigError);
    }
  });
});

describe('what a call is', () => {
  it('its record id: the key, the scope and the namespace fn:<name> by default', async () => {
    const { store, claims } = scripted();
    const charge = idempotent(async function charge(_req: { id: string; account?: string }) {}, {
      store,
      key: (req) => req.id,
      scope: (req) => req.account,
    });
    await charge({ id: 'k1', account: 'acct' });
    await charge({ id: 'k2' });
    const named = idempotent(async function charge() {}, { store, key: () => 'k3', namespace: 'payments' });
    await named();
    expect(claims.map(([id]) => id)).toEqual([recordId('k1', 'acct', 'fn:charge'), recordId('k2', '', 'fn:charge'), recordId('k3', '', 'payments')]);
    expect(claims.map(([, input]) => input.scope)).toEqual(['acct', '', '']);
  });

  it('a key that is not a non-empty string is refused before anything runs', async () => {
    let runs = 0;
    for (const key of ['', 42, undefined]) {
      const fn = idempotent(async function charge() {
        runs++;
      }, { store: memoryStore(), key: () => key as string });
      await expect(fn()).rejects.toThrow('The key function must return a non-empty string.');
    }
    expect(runs).toBe(0);
  });

  it('its fingerprint: every argument by default, the chosen fields, or none', async () => {
    const { store, claims } = scripted();
    const all = idempotent(async function all(_id: string, _n: number) {}, { store, key: (id) => id });
    const chosen = idempotent(async function chosen(_id: string, _n: number) {}, { store, key: (id) => id, fingerprint: (_id, n) => ({ n }) });
    const none = idempotent(async function none(_id: string, _n: number) {}, { store, key: (id) => id, fingerprint: false });
    await all('a', 1);
    await chosen('b', 2);
    await none('c', 3);
    expect(claims.map(([, input]) => input.fingerprint)).toEqual([fingerprintOf(['a', 1]), fingerprintOf({ n: 2 }), null]);
  });
});

describe('each answer of the engine', () => {
  it('replay: the stored result, without running again', async () => {
    let runs = 0;
    const fn = idempotent(async function charge() {
      runs++;
      return { charged: 5 };
    }, { store: memoryStore(), key: () => 'k' });
    expect(await fn()).toEqual({ charged: 5 });
    expect(await fn()).toEqual({ charged: 5 });
    expect(runs).toBe(1);
  });

  it('in flight and mismatch: their errors', async () => {
    let release: () => void = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    const fn = idempotent(async function slow(_n: number) {
      await gate;
    }, { store: memoryStore(), key: (_n: number) => 'k' });
    const first = fn(1);
    await new Promise((resolve) => setTimeout(resolve, 10));
    await expect(fn(1)).rejects.toBeInstanceOf(InFlightError);
    await expect(fn(2)).rejects.toBeInstanceOf(FingerprintMismatchError);
    release();
    await first;
  });

  it('bypass (store down, failOpen): runs without a record, every time', async () => {
    const { store } = scripted({ claim: () => Promise.reject(new Error('ECONNREFUSED')) });
    let runs = 0;
    const fn = idempotent(async function charge(n: number) {
      runs++;
      return n * 2;
    }, { store, key: (_n: number) => 'k', failOpen: true });
    expect(await fn(2)).toBe(4);
    expect(await fn(2)).toBe(4);
    expect(runs).toBe(2);
    const closed = idempotent(async function charge() {}, { store, key: () => 'k' });
    await expect(closed()).rejects.toMatchObject({ code: 'ONCELY_STORE_UNAVAILABLE' });
  });
});

describe('the run', () => {
  it('sees its key, id, takeover and lease signal; outside a run there is none', async () => {
    const seen: RunContext[] = [];
    const fn = idempotent(async function job() {
      seen.push(currentRun()!);
    }, { store: memoryStore(), key: () => 'job-1', scope: () => 'acct', namespace: 'jobs' });
    await fn();
    expect(currentRun()).toBeUndefined();
    expect(seen[0]).toMatchObject({ key: 'job-1', id: recordId('job-1', 'acct', 'jobs'), takeover: false });
    expect(seen[0]!.signal).toBeInstanceOf(AbortSignal);
    expect(seen[0]!.signal.aborted).toBe(false);
  });

  it('steps run once per key; transaction() asks the store (the memory store has none)', async () => {
    let steps = 0;
    let transaction: unknown;
    const fn = idempotent(async function job(fail: boolean) {
      const value = await currentRun()!.step('reserve', () => ++steps);
      transaction = await currentRun()!.transaction().catch((error: unknown) => error);
      if (fail) throw new Error('later step failed');
      return value;
    }, { store: memoryStore(), key: (_fail: boolean) => 'job-1', fingerprint: false });
    await expect(fn(true)).rejects.toThrow('later step failed');
    expect(await fn(false)).toBe(1);
    expect(steps).toBe(1);
    expect(transaction).toBeInstanceOf(ConfigError);
  });

  it('a thrown error is released (a retry runs) unless final: by default error.final === true', async () => {
    let runs = 0;
    const fn = idempotent(async function charge(kind: string) {
      runs++;
      if (kind === 'final') throw Object.assign(new Error('declined'), { final: true, code: 'card_declined' });
      if (kind === 'truthy') throw Object.assign(new Error('maybe'), { final: 'yes' });
      throw null;
    }, { store: memoryStore(), key: (kind) => kind });
    await expect(fn('null')).rejects.toBeNull();
    await expect(fn('null')).rejects.toBeNull();
    await expect(fn('truthy')).rejects.toThrow('maybe');
    await expect(fn('truthy')).rejects.toThrow('maybe');
    await expect(fn('final')).rejects.toThrow('declined');
    await expect(fn('final')).rejects.toMatchObject({ message: 'declined', code: 'card_declined', replayed: true, final: true });
    expect(runs).toBe(5);
  });

  it('isFinal decides instead when given', async () => {
    let runs = 0;
    const fn = idempotent(async function charge() {
      runs++;
      throw new TypeError('bad input');
    }, { store: memoryStore(), key: () => 'k', isFinal: (error) => error instanceof TypeError });
    await expect(fn()).rejects.toBeInstanceOf(TypeError);
    await expect(fn()).rejects.toMatchObject({ name: 'TypeError', message: 'bad input', replayed: true });
    expect(runs).toBe(1);
  });

  it('a result that could not be stored is still returned to this caller', async () => {
    const { store } = scripted({ complete: () => Promise.reject(new StoreFullError()) });
    const fn = idempotent(async function charge() {
      return 'charged';
    }, { store, key: () => 'k' });
    expect(await fn()).toBe('charged');
  });
});

describe('transactional mode', () => {
  function transactional(commit: () => Promise<boolean>) {
    const transactions: StoreTransactions = {
      open: async () => ({ client: 'db', commit, rollback: async () => {} }),
    };
    return scripted({ transactions });
  }

  it('a committed result is returned', async () => {
    const { store } = transactional(async () => true);
    const fn = idempotent(async function pay() {
      return (await currentRun()!.transaction()) === 'db' ? 'paid' : 'no client';
    }, { store, key: () => 'k' });
    expect(await fn()).toBe('paid');
  });

  it('a result whose commit failed or was fenced is not returned: RolledBackError says which', async () => {
    for (const [commit, settled] of [
      [() => Promise.reject(new Error('connection lost')), 'rolled_back'],
      [async () => false, 'fenced'],
    ] as const) {
      const { store } = transactional(commit);
      const fn = idempotent(async function pay() {
        await currentRun()!.transaction();
        return 'paid';
      }, { store, key: () => 'k' });
      const error = await fn().catch((e: unknown) => e);
      expect(error).toBeInstanceOf(RolledBackError);
      expect((error as Error).message).toBe(`The call did not commit (${settled}); nothing happened. Call again with the same key.`);
    }
  });

  it('a call that threw throws its own error, transaction or not', async () => {
    const { store } = transactional(async () => true);
    const boom = new Error('boom');
    const fn = idempotent(async function pay() {
      await currentRun()!.transaction();
      throw boom;
    }, { store, key: () => 'k' });
    await expect(fn()).rejects.toBe(boom);
  });
});
