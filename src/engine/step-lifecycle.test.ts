/**
 * Recovery points and their parent claim, on a virtual clock: where a
 * step's record lives, what its work is given, how long a step waits for an
 * earlier attempt still holding it, and that a step never outlives its
 * operation (abandoned with it, or at once when started after it).
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { deriveKey } from '../client/derive.js';
import { memoryStore } from '../stores/memory.js';
import { type Claim, Engine, type EngineOptions } from './engine.js';
import { recordId } from './fingerprint.js';
import type { IdempotencyStore } from './store.js';

const T0 = 1_700_000_000_000;

/** A memory store whose renewals and claims are logged by record id, with the virtual time. */
function logged(options: { claimFails?: () => boolean } = {}) {
  const real = memoryStore({ now: () => Date.now() });
  const renewals: Array<[string, number]> = [];
  const claims: Array<[string, number]> = [];
  const store: IdempotencyStore = {
    name: 'logged',
    capabilities: { nativeTtl: false, serverClock: false, shared: false },
    claim: (id, input) => {
      claims.push([id, Date.now() - T0]);
      return options.claimFails?.() ? Promise.reject(new Error('ECONNREFUSED')) : real.claim(id, input);
    },
    renew: (id, token, leaseMs) => {
      renewals.push([id, Date.now() - T0]);
      return real.renew(id, token, leaseMs);
    },
    complete: (id, token, outcome, ttlMs) => real.complete(id, token, outcome, ttlMs),
    release: (id, token) => real.release(id, token),
    get: (id) => real.get(id),
    delete: (id) => real.delete(id),
    purgeExpired: (limit) => real.purgeExpired(limit),
    close: () => real.close(),
  };
  return { store, real, renewals, claims };
}

const until = async (ms: number): Promise<void> => {
  await vi.advanceTimersByTimeAsync(T0 + ms - Date.now());
};

async function won(engine: Engine, id: string, fingerprint: string | null = 'fp'): Promise<Claim> {
  const begun = await engine.begin({ id, fingerprint });
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  return begun.claim;
}

const stepId = (claim: Claim, name: string, fingerprint: string | null = 'fp') => recordId(name, `${claim.id}\u0000${fingerprint ?? ''}`, 'oncely:step');

function engineOn(store: IdempotencyStore, options: Partial<EngineOptions> = {}) {
  return new Engine({ store, leaseMs: 3_000, ttlMs: 60_000, storeTimeoutMs: 60_000, ...options });
}

beforeEach(() => {
  vi.useFakeTimers({ now: T0 });
});
afterEach(() => {
  vi.useRealTimers();
});

describe('a step', () => {
  it('lives in its own record: the step name under the operation id and fingerprint, in the oncely:step namespace', async () => {
    const { store, real } = logged();
    const engine = engineOn(store);
    const claim = await won(engine, 'op');
    expect(await claim.step('reserve', () => 7)).toBe(7);
    expect(await real.get(stepId(claim, 'reserve'))).toMatchObject({ state: 'completed', outcome: '{"v":7}' });
    const unprinted = await won(engine, 'op2', null);
    await unprinted.step('reserve', () => 1);
    expect(await real.get(stepId(unprinted, 'reserve', null))).toMatchObject({ state: 'completed' });
  });

  it('gives its work the derived key, the operation signal and whether it took over', async () => {
    const { store } = logged();
    const engine = engineOn(store);
    const claim = await won(engine, 'op');
    const seen = await claim.step('pay', (step) => step);
    expect(seen).toEqual({ key: deriveKey('op', 'pay'), signal: claim.signal, takeover: false });
  });

  it('needs a name, and an operation not yet settled', async () => {
    const { store } = logged();
    const engine = engineOn(store);
    const claim = await won(engine, 'op');
    await expect(claim.step('', () => 1)).rejects.toThrow('A step needs a non-empty name.');
    await expect(claim.step(42 as never, () => 1)).rejects.toThrow('A step needs a non-empty name.');
    await claim.complete('done');
    await expect(claim.step('late', () => 1)).rejects.toThrow('Step "late" was asked for after the operation settled.');
  });

  it('waits for an earlier attempt still holding it, never sleeping past that attempt lease', async () => {
    const { store, claims } = logged();
    const engine = engineOn(store, { leaseMs: 3_000 });
    const first = await won(engine, 'op');
    await until(1_500);
    void first.step('pay', () => new Promise(() => {})); // cut off mid-call: holds the step until 4 500
    await until(1_600);
    first.abandon(); // the operation lapses at 4 000 (renewed at 1 000), its step at 4 500
    await until(4_000);
    const second = await won(engine, 'op');
    expect(second.takeover).toBe(true);
    let answered: unknown;
    void second.step('pay', () => 'paid').then((value) => {
      answered = value;
    });
    await until(20_000);
    expect(answered).toBe('paid');
    const stepClaims = claims.filter(([id]) => id === stepId(first, 'pay')).map(([, at]) => at);
    // Polls at 50, 100, 200 ms, then wakes 1 ms after the old lease (4 500) and takes it over.
    expect(stepClaims).toEqual([1_500, 4_000, 4_050, 4_150, 4_350, 4_501]);
  });

  it('gives up waiting after its lease and a second more: in flight', async () => {
    const { store, real, claims } = logged();
    const engine = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine, 'op');
    // An earlier attempt that holds the step and keeps it (a live process still running it).
    await real.claim(stepId(claim, 'pay'), { fingerprint: null, leaseMs: 1e9, ttlMs: 1e9 });
    let answered: unknown;
    void claim.step('pay', () => 'paid').catch((error: unknown) => {
      answered = error;
    });
    await until(3_999);
    expect(answered).toBeUndefined();
    await until(20_000);
    expect(answered).toMatchObject({ code: 'ONCELY_IN_FLIGHT' });
    expect(claims.filter(([id]) => id === stepId(claim, 'pay')).at(-1)![1]).toBe(4_000);
  });

  it('with the store down and failOpen, runs unrecorded with the derived key', async () => {
    let down = false;
    const { store } = logged({ claimFails: () => down });
    const engine = engineOn(store, { failOpen: true });
    const claim = await won(engine, 'op');
    down = true;
    expect(await claim.step('pay', (step) => step)).toEqual({ key: deriveKey('op', 'pay'), signal: claim.signal, takeover: false });
    const closed = engineOn(store);
    down = false;
    const other = await won(closed, 'op3');
    down = true;
    await expect(other.step('pay', () => 1)).rejects.toMatchObject({ code: 'ONCELY_STORE_UNAVAILABLE' });
  });
});

describe('a step never outlives its operation', () => {
  it('abandoning the operation abandons its running steps: they stop renewing', async () => {
    const { store, renewals } = logged();
    const engine = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine, 'op');
    void claim.step('pay', () => new Promise(() => {}));
    await until(1_500);
    const step = stepId(claim, 'pay');
    expect(renewals.filter(([id]) => id === step).map(([, at]) => at)).toEqual([1_000]);
    claim.abandon();
    await until(10_000);
    expect(renewals.filter(([id]) => id === step).map(([, at]) => at)).toEqual([1_000]);
  });

  it('an operation that loses its lease abandons its running steps', async () => {
    const { store, real, renewals } = logged();
    const engine = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine, 'op');
    void claim.step('pay', () => new Promise(() => {}));
    await until(500);
    // Someone else owns the operation now: its next renewal is refused.
    await real.delete('op');
    await real.claim('op', { fingerprint: 'fp', leaseMs: 3_000, ttlMs: 60_000 });
    await until(1_000);
    expect(claim.lost).toBe(true);
    await until(10_000);
    // The operation renewal (due first) is refused at 1 000: the step is abandoned before its own renewal.
    expect(renewals.filter(([id]) => id === stepId(claim, 'pay'))).toEqual([]);
    expect(renewals.filter(([id]) => id === 'op').map(([, at]) => at)).toEqual([1_000]);
  });

  it('a step begun after the operation was abandoned or lost is abandoned at once', async () => {
    for (const end of ['abandon', 'lose'] as const) {
      vi.setSystemTime(T0);
      const { store, real, renewals } = logged();
      const engine = engineOn(store, { leaseMs: 3_000 });
      const claim = await won(engine, `op-${end}`);
      if (end === 'abandon') claim.abandon();
      else {
        await real.delete(claim.id);
        await real.claim(claim.id, { fingerprint: 'fp', leaseMs: 3_000, ttlMs: 60_000 });
        await until(1_000);
        expect(claim.lost).toBe(true);
      }
      const started = Date.now() - T0;
      void claim.step('pay', () => new Promise(() => {}));
      await until(started + 10_000);
      expect([end, renewals.filter(([id]) => id === stepId(claim, 'pay'))]).toEqual([end, []]);
    }
  });

  it('while the operation holds, a running step keeps renewing', async () => {
    const { store, renewals } = logged();
    const engine = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine, 'op');
    void claim.step('pay', () => new Promise(() => {}));
    await until(3_500);
    expect(renewals.filter(([id]) => id === stepId(claim, 'pay')).map(([, at]) => at)).toEqual([1_000, 2_000, 3_000]);
  });
});
