/**
 * How a claim ends, on a virtual clock: settle once, the completion retried
 * with the same token until the lease deadline (and not one pause past it),
 * a timed-out completion that landed recognised as this claim's own, marker
 * versus release, what perform() settles on each path, and the transactional
 * commit and rollback. Store calls are scripted over a real memory store.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { StoreFullError, StoreUnavailableError } from '../errors/index.js';
import { memoryStore } from '../stores/memory.js';
import { type Claim, Engine, type EngineOptions } from './engine.js';
import type { IdempotencyStore, StoreTransaction, StoreTransactions } from './store.js';

const T0 = 1_700_000_000_000;

interface Script {
  claim?: IdempotencyStore['claim'];
  renew?: IdempotencyStore['renew'];
  complete?: IdempotencyStore['complete'];
  release?: IdempotencyStore['release'];
  get?: IdempotencyStore['get'];
}
type Op = keyof Script;

function scripted(transactions?: StoreTransactions) {
  const real = memoryStore({ now: () => Date.now() });
  const calls: Array<{ op: Op; at: number; args: unknown[] }> = [];
  const script: Script = {};
  const log = (op: Op, args: unknown[]) => calls.push({ op, at: Date.now() - T0, args });
  const store: IdempotencyStore = {
    name: 'scripted',
    capabilities: { nativeTtl: false, serverClock: false, shared: false },
    claim: (id, input) => {
      log('claim', [id, input]);
      return (script.claim ?? real.claim)(id, input);
    },
    renew: (id, token, leaseMs) => {
      log('renew', [id, token, leaseMs]);
      return (script.renew ?? real.renew)(id, token, leaseMs);
    },
    complete: (id, token, outcome, ttlMs) => {
      log('complete', [id, token, outcome, ttlMs]);
      return (script.complete ?? real.complete)(id, token, outcome, ttlMs);
    },
    release: (id, token) => {
      log('release', [id, token]);
      return (script.release ?? real.release)(id, token);
    },
    get: (id) => {
      log('get', [id]);
      return (script.get ?? real.get)(id);
    },
    delete: (id) => real.delete(id),
    purgeExpired: (limit) => real.purgeExpired(limit),
    close: () => real.close(),
    ...(transactions ? { transactions } : {}),
  };
  const at = (op: Op) => calls.filter((call) => call.op === op).map((call) => call.at);
  const args = (op: Op) => calls.filter((call) => call.op === op).map((call) => call.args);
  return { store, real, calls, script, at, args };
}

const until = async (ms: number): Promise<void> => {
  await vi.advanceTimersByTimeAsync(T0 + ms - Date.now());
};
const unavailable = () => Promise.reject(new Error('ECONNRESET'));

function engineOn(store: IdempotencyStore, options: Partial<EngineOptions> = {}) {
  const events: string[] = [];
  const engine = new Engine({ store, storeTimeoutMs: 60_000, ttlMs: 60_000, ...options });
  engine.on('stored', (e) => events.push(`stored ${e.bytes}`));
  engine.on('released', (e) => events.push(`released ${e.reason}`));
  engine.on('fenced', (e) => events.push(`fenced ${e.operation}`));
  engine.on('unsettled', (e) => events.push(`unsettled ${(e.error as Error).name}`));
  engine.on('leaseLost', () => events.push('leaseLost'));
  engine.on('storeError', (e) => events.push(`storeError ${e.operation}`));
  return { engine, events };
}

async function won(engine: Engine, id = 'op'): Promise<Claim> {
  const begun = await engine.begin({ id, fingerprint: null });
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  return begun.claim;
}

/** Settle and run the clock until the settlement is known; answers it and when (ms after T0). */
async function timed<T>(settling: Promise<T>, limit = 60_000): Promise<{ value: T; at: number }> {
  let done: { value: T; at: number } | undefined;
  void settling.then((value) => {
    done = { value, at: Date.now() - T0 };
  });
  for (let t = Date.now() - T0; done === undefined && t <= limit; t += 10) await until(t);
  if (done === undefined) throw new Error('never settled');
  return done;
}

beforeEach(() => {
  vi.useFakeTimers({ now: T0 });
});
afterEach(() => {
  vi.useRealTimers();
});

describe('settle once', () => {
  it('every later settlement answers the first one (the same promise) and writes nothing', async () => {
    const { store, args } = scripted();
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    const first = claim.settle({ kind: 'complete', outcome: 'one' });
    expect(claim.settle({ kind: 'release', reason: 'late' })).toBe(first);
    expect(claim.fail('late')).toBe(first);
    expect(await claim.complete('two')).toBe(true);
    expect(await claim.release()).toBe(false);
    expect(await first).toBe('stored');
    expect(args('complete')).toEqual([['op', claim.token, 'one', 60_000]]);
    expect(args('release')).toEqual([]);
    expect(events).toEqual(['stored 3']);
  });

  it('a completion keeps the claim retention unless the settlement names its own', async () => {
    const { store, args } = scripted();
    const { engine } = engineOn(store, { leaseMs: 1_000, ttlMs: 50_000 });
    const plain = await won(engine, 'plain');
    expect(plain.ttlMs).toBe(50_000);
    await plain.settle({ kind: 'complete', outcome: 'x' });
    const own = await won(engine, 'own');
    await own.settle({ kind: 'complete', outcome: 'x', ttlMs: 7_000 });
    const shorthand = await won(engine, 'shorthand');
    await shorthand.complete('x', 8_000);
    const perCall = await engine.begin({ id: 'per-call', fingerprint: null, ttlMs: 9_000 });
    if (perCall.kind !== 'run') throw new Error('expected run');
    expect(perCall.claim.ttlMs).toBe(9_000);
    await perCall.claim.complete('x');
    expect(args('complete').map(([id, , , ttl]) => [id, ttl])).toEqual([
      ['plain', 50_000],
      ['own', 7_000],
      ['shorthand', 8_000],
      ['per-call', 9_000],
    ]);
  });

  it('release() names its reason, by default a retryable failure; the record is gone', async () => {
    const { store, real } = scripted();
    const { engine, events } = engineOn(store);
    expect(await (await won(engine, 'a')).release()).toBe(true);
    expect(await (await won(engine, 'b')).release('status 503')).toBe(true);
    expect(events).toEqual(['released retryable failure', 'released status 503']);
    expect(await real.get('a')).toBeNull();
  });
});

describe('marker versus release', () => {
  it('fail() releases with its reason when nothing went out', async () => {
    const { store, real } = scripted();
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    expect(claim.marker).toBeUndefined();
    expect(await claim.fail('handler threw')).toBe('released');
    expect(events).toEqual(['released handler threw']);
    expect(await real.get('op')).toBeNull();
  });

  it('fail() completes with the marker once an answer went out: never run again', async () => {
    const { store, real } = scripted();
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    claim.answered('{"k":"m","s":200}\n');
    expect(await claim.fail('stream broke')).toBe('stored');
    expect(events).toEqual(['stored 18']);
    expect(await real.get('op')).toMatchObject({ state: 'completed', outcome: '{"k":"m","s":200}\n' });
  });
});

describe('perform settles on every path', () => {
  it('a result as settle() says, handing it the value and the claim', async () => {
    const { store, real } = scripted();
    const { engine } = engineOn(store);
    const claim = await won(engine);
    const seen: unknown[] = [];
    const performed = await claim.perform({
      run: (c) => {
        seen.push(c);
        return 41;
      },
      settle: (value, c) => {
        seen.push(value, c);
        return { kind: 'complete', outcome: String(value + 1) };
      },
    });
    expect(performed).toEqual({ ok: true, value: 41, settled: 'stored' });
    expect(seen).toEqual([claim, 41, claim]);
    expect(await real.get('op')).toMatchObject({ outcome: '42' });
  });

  it('a throw: the same error back, released as "operation failed" by default', async () => {
    const { store } = scripted();
    const { engine, events } = engineOn(store);
    const boom = new Error('boom');
    const performed = await (await won(engine)).perform({
      run: () => Promise.reject(boom),
      settle: () => ({ kind: 'complete', outcome: 'never' }),
    });
    expect(performed.ok).toBe(false);
    expect(!performed.ok && performed.error).toBe(boom);
    expect(performed.settled).toBe('released');
    expect(events).toEqual(['released operation failed']);
  });

  it('a throw: settled as failure() says, which sees the error and the claim', async () => {
    const { store, real } = scripted();
    const { engine } = engineOn(store);
    const claim = await won(engine);
    const boom = Object.assign(new Error('declined'), { final: true });
    const seen: unknown[] = [];
    const performed = await claim.perform({
      run: () => {
        throw boom;
      },
      settle: () => ({ kind: 'complete', outcome: 'never' }),
      failure: (error, c) => {
        seen.push(error, c);
        return { kind: 'complete', outcome: 'final error' };
      },
    });
    expect(performed).toEqual({ ok: false, error: boom, settled: 'stored' });
    expect(seen).toEqual([boom, claim]);
    expect(await real.get('op')).toMatchObject({ outcome: 'final error' });
  });

  it('a failure() that answers undefined or throws falls back to fail(): the marker when an answer went out', async () => {
    const { store, real } = scripted();
    const { engine, events } = engineOn(store);
    const quiet = await won(engine, 'quiet');
    const q = await quiet.perform({ run: () => Promise.reject(new Error('x')), settle: () => ({ kind: 'release', reason: 'no' }), failure: () => undefined });
    expect(q.settled).toBe('released');
    const throwing = await won(engine, 'throwing');
    throwing.answered('marker');
    const t = await throwing.perform({
      run: () => Promise.reject(new Error('x')),
      settle: () => ({ kind: 'release', reason: 'no' }),
      failure: () => {
        throw new Error('failure() broke');
      },
    });
    expect(t.settled).toBe('stored');
    expect(await real.get('throwing')).toMatchObject({ outcome: 'marker' });
    expect(events).toEqual(['released operation failed', 'stored 6']);
  });

  it('a settle() that throws is a failure too: its error back, failure() asked', async () => {
    const { store } = scripted();
    const { engine } = engineOn(store);
    const encode = new Error('cannot encode');
    const seen: unknown[] = [];
    const performed = await (await won(engine)).perform({
      run: () => 1,
      settle: () => {
        throw encode;
      },
      failure: (error) => {
        seen.push(error);
        return { kind: 'release', reason: 'settle threw' };
      },
    });
    expect(performed).toEqual({ ok: false, error: encode, settled: 'released' });
    expect(seen).toEqual([encode]);
  });
});

describe('completion: retried with the same token until the lease deadline', () => {
  it('backs off 50, 100, 200, 400, 800 ms, then every second, with the same token and outcome', async () => {
    const { store, real, script, at, args } = scripted();
    let failures = 6;
    script.complete = (id, token, outcome, ttlMs) => (failures-- > 0 ? unavailable() : real.complete(id, token, outcome, ttlMs));
    const { engine, events } = engineOn(store, { leaseMs: 30_000 });
    const claim = await won(engine);
    const settled = await timed(claim.settle({ kind: 'complete', outcome: 'late' }));
    expect(settled).toEqual({ value: 'stored', at: 2_550 });
    expect(at('complete')).toEqual([0, 50, 150, 350, 750, 1_550, 2_550]);
    expect(new Set(args('complete').map((a) => JSON.stringify(a))).size).toBe(1);
    expect(events.filter((e) => !e.startsWith('storeError'))).toEqual(['stored 4']);
  });

  it('gives up when the pause would reach the deadline: not one try past it (remaining = pause gives up)', async () => {
    // Lease 350: tries at 0 (350 left), 50 (300 left), 150 (200 left = the next pause): unsettled.
    const { store, script, at } = scripted();
    script.complete = unavailable;
    const { engine, events } = engineOn(store, { leaseMs: 350 });
    const claim = await won(engine);
    const settled = await timed(claim.settle({ kind: 'complete', outcome: 'x' }));
    expect(settled).toEqual({ value: 'unsettled', at: 150 });
    expect(at('complete')).toEqual([0, 50, 150]);
    expect(events.filter((e) => !e.startsWith('storeError'))).toEqual(['unsettled StoreUnavailableError']);
    expect(claim.lost).toBe(false);
  });

  it('one millisecond more of lease buys exactly one more try', async () => {
    const { store, script, at } = scripted();
    script.complete = unavailable;
    const { engine } = engineOn(store, { leaseMs: 351 });
    const settled = await timed((await won(engine)).settle({ kind: 'complete', outcome: 'x' }));
    expect(settled).toEqual({ value: 'unsettled', at: 350 });
    expect(at('complete')).toEqual([0, 50, 150, 350]);
  });

  it('counts from the local deadline, which renewals move', async () => {
    const { store, script, at } = scripted();
    const { engine } = engineOn(store, { leaseMs: 600 });
    const claim = await won(engine);
    await until(250);
    expect(claim.leaseUntil).toBe(T0 + 200 + 600);
    script.complete = unavailable;
    const settled = await timed(claim.settle({ kind: 'complete', outcome: 'x' }));
    // From 250, deadline 800: tries at 250 (550 left), 300 (500), 400 (400), 600 (200, under the
    // next pause of 400): gives up. Counted from the first deadline (600) it would stop at 400.
    expect(settled).toEqual({ value: 'unsettled', at: 600 });
    expect(at('complete')).toEqual([250, 300, 400, 600]);
  });

  it('an error that is not the store being unreachable is not retried', async () => {
    const { store, script, at } = scripted();
    script.complete = () => Promise.reject(new StoreFullError());
    const { engine, events } = engineOn(store, { leaseMs: 30_000 });
    expect(await (await won(engine)).settle({ kind: 'complete', outcome: 'x' })).toBe('unsettled');
    expect(at('complete')).toEqual([0]);
    expect(events).toEqual(['storeError complete', 'unsettled StoreFullError']);
  });

  it('a refusal is fenced at once: the lease is lost, nothing is retried', async () => {
    const { store, script, at } = scripted();
    script.complete = () => Promise.resolve(false);
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    expect(await claim.settle({ kind: 'complete', outcome: 'x' })).toBe('fenced');
    expect(claim.lost).toBe(true);
    expect(claim.signal.aborted).toBe(true);
    expect(at('complete')).toEqual([0]);
    expect(at('get')).toEqual([]);
    expect(events).toEqual(['fenced complete', 'leaseLost']);
  });

  it('a first refusal is never taken for this claim own completion, even if the stored outcome is the same', async () => {
    const { store, script, at } = scripted();
    script.complete = () => Promise.resolve(false);
    script.get = async () => ({ state: 'completed', fingerprint: null, outcome: 'same', expiresAt: T0 + 1e6 });
    const { engine } = engineOn(store);
    expect(await (await won(engine)).settle({ kind: 'complete', outcome: 'same' })).toBe('fenced');
    expect(at('get')).toEqual([]);
  });
});

describe('a retried completion whose timed-out first try landed', () => {
  /** The first complete lands at once but answers after the store timeout (100 ms); later ones answer at once. */
  function landedLate(getOverride?: IdempotencyStore['get']) {
    const s = scripted();
    let first = true;
    s.script.complete = async (id, token, outcome, ttlMs) => {
      const ok = await s.real.complete(id, token, outcome, ttlMs);
      if (!first) return ok;
      first = false;
      return new Promise<boolean>((resolve) => setTimeout(() => resolve(ok), 1_000));
    };
    if (getOverride) s.script.get = getOverride;
    return s;
  }

  it('is recognised by its outcome: stored, not fenced', async () => {
    const { store, at } = landedLate();
    const { engine, events } = engineOn(store, { storeTimeoutMs: 100 });
    const claim = await won(engine);
    const settled = await timed(claim.settle({ kind: 'complete', outcome: 'mine' }));
    expect(settled).toEqual({ value: 'stored', at: 150 });
    expect(at('complete')).toEqual([0, 150]);
    expect(at('get')).toEqual([150]);
    expect(events).toEqual(['storeError complete', 'stored 4']);
    expect(claim.lost).toBe(false);
  });

  it('another outcome stored there is another owner: fenced', async () => {
    const { store } = landedLate(async () => ({ state: 'completed', fingerprint: null, outcome: 'theirs', expiresAt: T0 + 1e6 }));
    const { engine, events } = engineOn(store, { storeTimeoutMs: 100 });
    const settled = await timed((await won(engine)).settle({ kind: 'complete', outcome: 'mine' }));
    expect(settled.value).toBe('fenced');
    expect(events).toEqual(['storeError complete', 'fenced complete', 'leaseLost']);
  });

  it('a record still in progress, or none, or a read that fails: fenced', async () => {
    const answers: Array<IdempotencyStore['get']> = [
      async () => ({ state: 'in_progress', fingerprint: null, leaseUntil: T0 + 1e6, expiresAt: T0 + 1e6 }),
      async () => null,
      () => Promise.reject(new Error('ECONNRESET')),
    ];
    for (const get of answers) {
      vi.setSystemTime(T0);
      const { store } = landedLate(get);
      const { engine, events } = engineOn(store, { storeTimeoutMs: 100 });
      const settled = await timed((await won(engine)).settle({ kind: 'complete', outcome: 'mine' }));
      expect(settled.value).toBe('fenced');
      expect(events.filter((e) => e.startsWith('storeError'))).toEqual(
        get === answers[2] ? ['storeError complete', 'storeError get'] : ['storeError complete'],
      );
    }
  });
});

describe('release', () => {
  it('refused: fenced, and the lease is not declared lost by it', async () => {
    const { store, script } = scripted();
    script.release = () => Promise.resolve(false);
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    expect(await claim.settle({ kind: 'release', reason: 'r' })).toBe('fenced');
    expect(events).toEqual(['fenced release']);
  });

  it('failing: tried once only, unsettled (the lease ends by itself)', async () => {
    const { store, script, at } = scripted();
    script.release = unavailable;
    const { engine, events } = engineOn(store, { leaseMs: 30_000 });
    const settled = await timed((await won(engine)).settle({ kind: 'release', reason: 'r' }));
    expect(settled).toEqual({ value: 'unsettled', at: 0 });
    await until(30_000);
    expect(at('release')).toEqual([0]);
    expect(events).toEqual(['storeError release', 'unsettled StoreUnavailableError']);
  });
});

describe('transactional mode', () => {
  function transactional(commit: StoreTransaction['commit'], options: { openFails?: boolean; rollbackFails?: boolean } = {}) {
    const log: string[] = [];
    const transactions: StoreTransactions = {
      open: async (id, token) => {
        log.push(`open ${id} ${token.length}`);
        if (options.openFails) throw new Error('no connection');
        return {
          client: 'the client',
          commit: (outcome, ttlMs) => {
            log.push(`commit ${outcome} ${ttlMs}`);
            return commit(outcome, ttlMs);
          },
          rollback: async () => {
            log.push('rollback');
            if (options.rollbackFails) throw new Error('rollback broke');
          },
        };
      },
    };
    return { ...scripted(transactions), log };
  }

  it('the completion commits with the business writes: stored, and complete() is never called', async () => {
    const { store, log, at } = transactional(async () => true);
    const { engine, events } = engineOn(store, { ttlMs: 40_000 });
    const claim = await won(engine);
    expect(claim.transactional).toBe(false);
    expect(await claim.transaction()).toBe('the client');
    expect(await claim.transaction()).toBe('the client');
    expect(claim.transactional).toBe(true);
    expect(await claim.settle({ kind: 'complete', outcome: 'ok' })).toBe('stored');
    expect(log).toEqual(['open op 36', 'commit ok 40000']);
    expect(at('complete')).toEqual([]);
    expect(events).toEqual(['stored 2']);
    await expect(claim.transaction()).rejects.toThrow(/already settled/);
  });

  it('a commit refused by the token: fenced and lost', async () => {
    const { store } = transactional(async () => false);
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    await claim.transaction();
    expect(await claim.settle({ kind: 'complete', outcome: 'ok' })).toBe('fenced');
    expect(claim.lost).toBe(true);
    expect(events).toEqual(['fenced complete', 'leaseLost']);
  });

  it('a commit that fails and did not land: the claim is released, rolled back', async () => {
    const { store, real } = transactional(() => Promise.reject(new Error('connection lost')));
    const { engine, events } = engineOn(store);
    const claim = await won(engine);
    await claim.transaction();
    expect(await claim.settle({ kind: 'complete', outcome: 'ok' })).toBe('rolled_back');
    expect(events).toEqual(['storeError commit', 'released commit failed']);
    expect(await real.get('op')).toBeNull();
  });

  it('a commit that fails but landed (its outcome is there) is stored', async () => {
    const s = transactional(() => Promise.reject(new Error('result unknown')));
    s.script.release = () => Promise.resolve(false);
    s.script.get = async () => ({ state: 'completed', fingerprint: null, outcome: 'ok', expiresAt: T0 + 1e6 });
    const { engine } = engineOn(s.store);
    const claim = await won(engine);
    await claim.transaction();
    expect(await claim.settle({ kind: 'complete', outcome: 'ok' })).toBe('stored');
  });

  it('a commit that fails when the release cannot go through either: unsettled', async () => {
    const s = transactional(() => Promise.reject(new Error('down')));
    s.script.release = unavailable;
    const { engine } = engineOn(s.store);
    const claim = await won(engine);
    await claim.transaction();
    expect(await claim.settle({ kind: 'complete', outcome: 'ok' })).toBe('unsettled');
  });

  it('a transaction that never opened: released (rolled back), or unsettled when the release fails', async () => {
    const s = transactional(async () => true, { openFails: true });
    const { engine, events } = engineOn(s.store);
    const claim = await won(engine, 'a');
    await expect(claim.transaction()).rejects.toThrow('no connection');
    expect(await claim.settle({ kind: 'complete', outcome: 'ok' })).toBe('rolled_back');
    expect(events).toEqual(['storeError transaction', 'released transaction failed to open']);
    const other = await won(engine, 'b');
    await other.transaction().catch(() => undefined);
    s.script.release = unavailable;
    expect(await other.settle({ kind: 'complete', outcome: 'ok' })).toBe('unsettled');
  });

  it('a release rolls the business writes back first, even when the rollback fails', async () => {
    const s = transactional(async () => true, { rollbackFails: true });
    const { engine, events } = engineOn(s.store);
    const claim = await won(engine);
    await claim.transaction();
    expect(await claim.settle({ kind: 'release', reason: 'status 500' })).toBe('released');
    expect(s.log).toEqual(['open op 36', 'rollback']);
    expect(events).toEqual(['storeError rollback', 'released status 500']);
  });

  it('a store without transactional mode says so', async () => {
    const { store } = scripted();
    const { engine } = engineOn(store);
    const claim = await won(engine);
    await expect(claim.transaction()).rejects.toThrow('The scripted store has no transactional mode.');
    expect(claim.transactional).toBe(false);
  });
});

describe('events carry what happened', () => {
  it('stored counts the bytes of the outcome; the error of an unsettled settlement is the store error', async () => {
    const { store, script } = scripted();
    const { engine } = engineOn(store, { leaseMs: 100 });
    const seen: unknown[] = [];
    engine.on('unsettled', (e) => seen.push(e));
    engine.on('stored', (e) => seen.push(e));
    await (await won(engine, 'a')).complete('12345');
    script.complete = unavailable;
    await timed((await won(engine, 'b')).settle({ kind: 'complete', outcome: 'x' }));
    expect(seen[0]).toEqual({ id: 'a', bytes: 5 });
    expect(seen[1]).toMatchObject({ id: 'b', error: expect.any(StoreUnavailableError) });
  });
});
