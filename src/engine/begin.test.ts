/**
 * Beginning an operation, on a virtual clock: the one rule for engine
 * settings, what a claim sends to the store, the store timeout, every answer
 * of begin() and beginMany(), the poll schedule of a wait, and takeover
 * from a dead process session.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ConfigError, FingerprintMismatchError, InFlightError, StoreFullError, StoreUnavailableError } from '../errors/index.js';
import { memoryStore } from '../stores/memory.js';
import { checkDuration, ENGINE_OPTION_NAMES, Engine, engineFrom } from './engine.js';
import type { ClaimInput, ClaimResult, IdempotencyStore, StoreSessions } from './store.js';

const T0 = 1_700_000_000_000;

interface Script {
  claim?: IdempotencyStore['claim'];
  claimMany?: IdempotencyStore['claimMany'] | null;
  renew?: IdempotencyStore['renew'];
}

function scripted(options: { synchronous?: boolean; sessions?: StoreSessions; claimMany?: boolean } = {}) {
  const real = memoryStore({ now: () => Date.now() });
  const calls: Array<{ op: string; at: number; args: unknown[] }> = [];
  const script: Script = {};
  const log = (op: string, args: unknown[]) => calls.push({ op, at: Date.now() - T0, args });
  const store: IdempotencyStore = {
    name: 'scripted',
    capabilities: { nativeTtl: false, serverClock: false, shared: false, synchronous: options.synchronous === true },
    claim: (id, input) => {
      log('claim', [id, input]);
      return (script.claim ?? real.claim)(id, input);
    },
    renew: (id, token, leaseMs) => {
      log('renew', [id, token, leaseMs]);
      return (script.renew ?? real.renew)(id, token, leaseMs);
    },
    complete: (id, token, outcome, ttlMs) => real.complete(id, token, outcome, ttlMs),
    release: (id, token) => real.release(id, token),
    get: (id) => real.get(id),
    delete: (id) => real.delete(id),
    purgeExpired: (limit) => real.purgeExpired(limit),
    close: () => real.close(),
    ...(options.claimMany === false
      ? {}
      : {
          claimMany: (ids: readonly string[], input: ClaimInput) => {
      log('claimMany', [ids, input]);
      return (script.claimMany ?? real.claimMany!)(ids, input);
    },
        }),
    ...(options.sessions ? { sessions: options.sessions } : {}),
  };
  const at = (op: string) => calls.filter((call) => call.op === op).map((call) => call.at);
  const args = (op: string) => calls.filter((call) => call.op === op).map((call) => call.args);
  return { store, real, calls, script, at, args };
}

const until = async (ms: number): Promise<void> => {
  await vi.advanceTimersByTimeAsync(T0 + ms - Date.now());
};
const hang = <T>(): Promise<T> => new Promise<T>(() => {});

function recorder(engine: Engine) {
  const events: string[] = [];
  engine.on('acquired', (e) => events.push(`acquired ${e.id} takeover=${e.takeover}`));
  engine.on('replayed', (e) => events.push(`replayed ${e.id}`));
  engine.on('mismatch', (e) => events.push(`mismatch ${e.id}`));
  engine.on('conflict', (e) => events.push(`conflict ${e.id} ${e.leaseUntil - T0} @${Date.now() - T0}`));
  engine.on('storeError', (e) => events.push(`storeError ${e.id} ${e.operation}`));
  return events;
}

/** A store answer "in progress", with the store's own clock and lease end. */
const inProgress = (leaseLeft: number, storeNow = Date.now(), fingerprint: string | null = null, owner?: string): ClaimResult => ({
  status: 'in_progress',
  fingerprint,
  leaseUntil: storeNow + leaseLeft,
  now: storeNow,
  ...(owner ? { owner } : {}),
});

beforeEach(() => {
  vi.useFakeTimers({ now: T0 });
});
afterEach(() => {
  vi.useRealTimers();
});

describe('settings', () => {
  it('defaults: a 30 s lease, 24 h retention, 2 s store timeout, no wait, fail closed', () => {
    const engine = new Engine({ store: memoryStore() });
    expect([engine.leaseMs, engine.ttlMs, engine.storeTimeoutMs, engine.wait, engine.failOpen]).toEqual([
      30_000,
      86_400_000,
      2_000,
      false,
      false,
    ]);
    expect(new Engine({ store: memoryStore(), failOpen: true }).failOpen).toBe(true);
  });

  it('a retention equal to the lease is enough; a store without claim() is no store', () => {
    expect(new Engine({ store: memoryStore(), leaseMs: 5_000, ttlMs: 5_000 }).ttlMs).toBe(5_000);
    expect(() => new Engine({ store: { name: 'x' } as unknown as IdempotencyStore })).toThrow('oncely needs a store (see oncely/stores/*).');
  });

  it('checkDuration names the setting and the value, and the bound when there is one', () => {
    expect(() => checkDuration('leaseMs', 0)).toThrow('leaseMs must be a positive number of ms; got 0.');
    expect(() => checkDuration('leaseMs', '100')).toThrow('leaseMs must be a positive number of ms; got 100.');
    expect(() => checkDuration('x', 11, 10)).toThrow('x must be a positive number of ms up to 10; got 11.');
    expect(() => checkDuration('x', 10, 10)).not.toThrow();
    expect(() => checkDuration('x', 0.5)).not.toThrow();
    expect(() => checkDuration('x', undefined)).not.toThrow();
    expect(() => checkDuration('x', -0.001)).toThrow(ConfigError);
    expect(() => checkDuration('x', Number.NaN)).toThrow(ConfigError);
    expect(() => checkDuration('x', Number.MAX_SAFE_INTEGER)).not.toThrow();
  });

  it('wait must be false or { timeoutMs, pollMs? }, each a duration', () => {
    const store = memoryStore();
    for (const wait of [true, null, 5, 'soon']) {
      expect(() => new Engine({ store, wait: wait as never })).toThrow('wait must be false or { timeoutMs, pollMs? }.');
    }
    expect(() => new Engine({ store, wait: { timeoutMs: 100, pollMs: 0 } })).toThrow('wait.pollMs must be a positive number of ms');
    expect(() => new Engine({ store, wait: { timeoutMs: -1 } })).toThrow('wait.timeoutMs must be a positive number of ms');
    expect(new Engine({ store, wait: { timeoutMs: 100 } }).wait).toEqual({ timeoutMs: 100 });
    expect(() => new Engine({ store, storeTimeoutMs: 0 })).toThrow('storeTimeoutMs must be');
    expect(() => new Engine({ store, ttlMs: Number.POSITIVE_INFINITY })).toThrow('ttlMs must be');
  });

  it('engineFrom: the engine given, or one made from the options; never both, never neither', () => {
    const engine = new Engine({ store: memoryStore() });
    expect(engineFrom({ engine }, 'x')).toBe(engine);
    const made = engineFrom({ store: memoryStore(), leaseMs: 1_234 }, 'x');
    expect(made).toBeInstanceOf(Engine);
    expect(made.leaseMs).toBe(1_234);
    expect(() => engineFrom({}, 'oncely/koa')).toThrow('oncely/koa needs a `store` (see oncely/stores/*) or an `engine`.');
    expect(() => engineFrom({ engine: {} as Engine }, 'oncely/koa')).toThrow('oncely/koa: `engine` must be an oncely Engine.');
    expect(() => engineFrom({ engine, store: memoryStore(), ttlMs: 1 }, 'oncely/koa')).toThrow(
      'oncely/koa was given an `engine` and also `store`, `ttlMs`: set those on the engine instead.',
    );
  });

  it.each(ENGINE_OPTION_NAMES.map((name) => [name]))('engineFrom refuses an engine together with %s', (name) => {
    const engine = new Engine({ store: memoryStore() });
    expect(() => engineFrom({ engine, [name]: false }, 'x')).toThrow(`also \`${name}\`:`);
  });

  it('the option names are every engine option', () => {
    expect([...ENGINE_OPTION_NAMES].sort()).toEqual(['failOpen', 'hooks', 'leaseMs', 'sessions', 'store', 'storeTimeoutMs', 'ttlMs', 'wait']);
  });
});

describe('what a claim sends', () => {
  it('the fingerprint, scope, lease and a retention of at least the lease', async () => {
    const { store, args } = scripted();
    const engine = new Engine({ store, leaseMs: 4_000, ttlMs: 9_000 });
    await engine.begin({ id: 'a', fingerprint: 'f', scope: 'acct' });
    await engine.begin({ id: 'b', fingerprint: null, leaseMs: 2_000, ttlMs: 1_000 });
    expect(args('claim')).toEqual([
      ['a', { fingerprint: 'f', leaseMs: 4_000, ttlMs: 9_000, scope: 'acct', owner: undefined }],
      ['b', { fingerprint: null, leaseMs: 2_000, ttlMs: 2_000, scope: undefined, owner: undefined }],
    ]);
  });

  it('a per-call duration that is not one is a programming error: it throws', async () => {
    const engine = new Engine({ store: memoryStore() });
    await expect(engine.begin({ id: 'a', fingerprint: null, leaseMs: 0 })).rejects.toThrow('leaseMs must be');
    await expect(engine.begin({ id: 'a', fingerprint: null, ttlMs: -5 })).rejects.toThrow('ttlMs must be');
    await expect(engine.beginMany(['a'], { fingerprint: null, leaseMs: 0 })).rejects.toThrow('leaseMs must be');
    await expect(engine.beginMany(['a'], { fingerprint: null, ttlMs: Number.NaN })).rejects.toThrow('ttlMs must be');
  });
});

describe('the store timeout', () => {
  it('a claim that hangs is unavailable after exactly storeTimeoutMs, named in the cause', async () => {
    const { store, script } = scripted();
    script.claim = () => hang();
    const engine = new Engine({ store, storeTimeoutMs: 250 });
    const events = recorder(engine);
    let begun: Awaited<ReturnType<Engine['begin']>> | undefined;
    void engine.begin({ id: 'a', fingerprint: null }).then((b) => {
      begun = b;
    });
    await until(249);
    expect(begun).toBeUndefined();
    await until(250);
    expect(begun).toMatchObject({ kind: 'unavailable', error: expect.any(StoreUnavailableError) });
    expect((begun as { error: Error }).error.cause).toMatchObject({ message: 'scripted store did not answer claim within 250 ms' });
    expect(events).toEqual(['storeError a claim']);
  });

  it('an answer after the timeout changes nothing and is not reported again', async () => {
    const { store, script } = scripted();
    const engine = new Engine({ store, storeTimeoutMs: 100 });
    const events = recorder(engine);
    script.claim = () => new Promise((_, reject) => setTimeout(() => reject(new Error('late')), 300));
    const failed = engine.storeCall('a', 'claim', () => store.claim('a', { fingerprint: null, leaseMs: 1, ttlMs: 1 }));
    failed.catch(() => undefined);
    script.claim = () => new Promise((resolve) => setTimeout(() => resolve(inProgress(5)), 300));
    const late = engine.storeCall('b', 'claim', () => store.claim('b', { fingerprint: null, leaseMs: 1, ttlMs: 1 }));
    late.catch(() => undefined);
    await until(1_000);
    await expect(failed).rejects.toMatchObject({ cause: { message: 'scripted store did not answer claim within 100 ms' } });
    await expect(late).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(events).toEqual(['storeError a claim', 'storeError b claim']);
  });

  it('a timely answer clears its timer; a store that throws at once is unavailable at once', async () => {
    const { store } = scripted();
    const engine = new Engine({ store, storeTimeoutMs: 100 });
    const events = recorder(engine);
    expect(await engine.storeCall('a', 'get', () => Promise.resolve(7))).toBe(7);
    expect(vi.getTimerCount()).toBe(0);
    const thrown = new Error('sync');
    const failed = engine.storeCall('a', 'get', () => {
      throw thrown;
    });
    await expect(failed).rejects.toMatchObject({ code: 'ONCELY_STORE_UNAVAILABLE', cause: thrown });
    expect(vi.getTimerCount()).toBe(0);
    expect(events).toEqual(['storeError a get']);
  });

  it('a synchronous store is called without a timer: a pending call waits, a throw is unavailable', async () => {
    const { store } = scripted({ synchronous: true });
    const engine = new Engine({ store, storeTimeoutMs: 100 });
    const events = recorder(engine);
    let settled = false;
    void engine.storeCall('a', 'get', () => hang()).finally(() => {
      settled = true;
    });
    expect(vi.getTimerCount()).toBe(0);
    await until(1_000);
    expect(settled).toBe(false);
    const thrown = new Error('sync');
    await expect(
      engine.storeCall('a', 'get', () => {
        throw thrown;
      }),
    ).rejects.toMatchObject({ code: 'ONCELY_STORE_UNAVAILABLE', cause: thrown });
    await expect(engine.storeCall('a', 'get', () => Promise.reject(thrown))).rejects.toMatchObject({ cause: thrown });
    await expect(engine.storeCall('a', 'get', () => Promise.resolve('v'))).resolves.toBe('v');
    expect(events).toEqual(['storeError a get', 'storeError a get']);
  });

  it("oncely's own errors pass through as they are: a full store is not a down store, and failOpen does not bypass it", async () => {
    for (const synchronous of [false, true]) {
      const { store, script } = scripted({ synchronous });
      const full = new StoreFullError();
      script.claim = () => Promise.reject(full);
      const engine = new Engine({ store, failOpen: true });
      expect(await engine.begin({ id: 'a', fingerprint: null })).toEqual({ kind: 'unavailable', error: full });
      script.claim = () => Promise.reject(new Error('ECONNREFUSED'));
      expect(await engine.begin({ id: 'a', fingerprint: null })).toMatchObject({ kind: 'bypass', error: expect.any(StoreUnavailableError) });
    }
  });
});

describe('begin answers', () => {
  it('run for a new id and for a takeover, each announced', async () => {
    const { store, real } = scripted();
    const engine = new Engine({ store, leaseMs: 1_000 });
    const events = recorder(engine);
    const first = await engine.begin({ id: 'a', fingerprint: 'f' });
    if (first.kind !== 'run') throw new Error('expected run');
    expect(first.claim.takeover).toBe(false);
    first.claim.abandon(); // no more renewals: the lease runs out
    await until(1_000);
    expect(await real.get('a')).toMatchObject({ state: 'in_progress' });
    const second = await engine.begin({ id: 'a', fingerprint: 'f' });
    expect(second.kind === 'run' && second.claim.takeover).toBe(true);
    expect(events).toEqual(['acquired a takeover=false', 'acquired a takeover=true']);
  });

  it('replay or mismatch of a completed record, by fingerprint; null on either side never mismatches', async () => {
    const cases: Array<[string | null, string | null, string]> = [
      ['f', 'f', 'replay'],
      ['f', 'g', 'mismatch'],
      [null, 'g', 'replay'],
      ['f', null, 'replay'],
      [null, null, 'replay'],
    ];
    for (const [stored, asked, kind] of cases) {
      const { store, script } = scripted();
      const record = { state: 'completed' as const, fingerprint: stored, outcome: 'o', expiresAt: T0 + 1e6 };
      script.claim = async () => ({ status: 'completed', record });
      const engine = new Engine({ store });
      const events = recorder(engine);
      const begun = await engine.begin({ id: 'a', fingerprint: asked });
      expect([stored, asked, begun.kind]).toEqual([stored, asked, kind]);
      if (begun.kind === 'replay') expect(begun.record).toBe(record);
      if (begun.kind === 'mismatch') expect(begun.error).toBeInstanceOf(FingerprintMismatchError);
      expect(events).toEqual([kind === 'replay' ? 'replayed a' : 'mismatch a']);
    }
  });

  it('in flight or mismatch of a record in progress, by fingerprint; in flight says retry in 1 s and the lease end', async () => {
    const cases: Array<[string | null, string | null, string]> = [
      ['f', 'f', 'in_flight'],
      ['f', 'g', 'mismatch'],
      [null, 'g', 'in_flight'],
      ['f', null, 'in_flight'],
    ];
    for (const [stored, asked, kind] of cases) {
      const { store, script } = scripted();
      script.claim = async () => inProgress(5_000, Date.now(), stored);
      const engine = new Engine({ store });
      const events = recorder(engine);
      const begun = await engine.begin({ id: 'a', fingerprint: asked });
      expect([stored, asked, begun.kind]).toEqual([stored, asked, kind]);
      if (begun.kind === 'in_flight') {
        expect(begun.error).toBeInstanceOf(InFlightError);
        expect(begun.error.retryAfter).toBe(1);
        expect(begun.error.leaseUntil).toBe(T0 + 5_000);
      }
      expect(events).toEqual([kind === 'mismatch' ? 'mismatch a' : `conflict a 5000 @0`]);
    }
  });

  it('unavailable when the store fails, bypass with failOpen', async () => {
    const { store, script } = scripted();
    script.claim = () => Promise.reject(new Error('ECONNREFUSED'));
    expect(await new Engine({ store }).begin({ id: 'a', fingerprint: null })).toMatchObject({
      kind: 'unavailable',
      error: { code: 'ONCELY_STORE_UNAVAILABLE' },
    });
    expect(await new Engine({ store, failOpen: false }).begin({ id: 'a', fingerprint: null })).toMatchObject({ kind: 'unavailable' });
  });
});

describe('waiting for a duplicate in flight', () => {
  it('polls at 50, 100, 200, 400 ms, then every 500 ms, and stops at the wait timeout with one conflict', async () => {
    const { store, script, at } = scripted();
    script.claim = async () => inProgress(1e9);
    const engine = new Engine({ store, wait: { timeoutMs: 2_000 } });
    const events = recorder(engine);
    const begun = engine.begin({ id: 'a', fingerprint: null });
    await until(5_000);
    expect((await begun).kind).toBe('in_flight');
    expect(at('claim')).toEqual([0, 50, 150, 350, 750, 1_250, 1_750, 2_000]);
    // The lease end of the last answer.
    expect(events).toEqual(['conflict a 1000002000 @2000']);
  });

  it('starts at pollMs and doubles it, capped at 500 ms', async () => {
    const { store, script, at } = scripted();
    script.claim = async () => inProgress(1e9);
    const engine = new Engine({ store, wait: { timeoutMs: 1_000, pollMs: 100 } });
    const begun = engine.begin({ id: 'a', fingerprint: null });
    await until(5_000);
    await begun;
    expect(at('claim')).toEqual([0, 100, 300, 700, 1_000]);
  });

  it('never sleeps past the moment the lease could be taken over, on the store clock', async () => {
    const { store, script, at } = scripted();
    // The store's clock is an hour ahead of ours: only its own difference counts.
    const skew = 3_600_000;
    const answers = [inProgress(20, Date.now() + skew), inProgress(-5, Date.now() + skew)];
    script.claim = async () => answers.shift() ?? { status: 'completed', record: { state: 'completed', fingerprint: null, outcome: 'o', expiresAt: T0 + 1e9 } };
    const engine = new Engine({ store, wait: { timeoutMs: 5_000 } });
    const begun = engine.begin({ id: 'a', fingerprint: null });
    await until(100);
    expect((await begun).kind).toBe('replay');
    // 20 ms left: sleep 21; then already over: sleep at least 1.
    expect(at('claim')).toEqual([0, 21, 22]);
  });

  it('runs itself once the first releases; a per-call wait of false answers at once', async () => {
    const { store, real, at } = scripted();
    const engine = new Engine({ store, wait: { timeoutMs: 5_000, pollMs: 10 } });
    const first = await engine.begin({ id: 'a', fingerprint: null });
    if (first.kind !== 'run') throw new Error('expected run');
    const now = await engine.begin({ id: 'a', fingerprint: null, wait: false });
    expect(now.kind).toBe('in_flight');
    const waiting = engine.begin({ id: 'a', fingerprint: null });
    setTimeout(() => void first.claim.release(), 25);
    await until(100);
    expect((await waiting).kind).toBe('run');
    expect(at('claim')).toEqual([0, 0, 0, 10, 30]);
    expect(await real.get('a')).toMatchObject({ state: 'in_progress' });
  });

  it('a per-call wait applies where the engine has none', async () => {
    const { store, script, at } = scripted();
    script.claim = async () => inProgress(1e9);
    const engine = new Engine({ store });
    const begun = engine.begin({ id: 'a', fingerprint: null, wait: { timeoutMs: 120, pollMs: 40 } });
    await until(1_000);
    await begun;
    expect(at('claim')).toEqual([0, 40, 120]);
  });
});

describe('beginMany', () => {
  it('nothing to begin: no round trip', async () => {
    const { store, calls } = scripted();
    expect(await new Engine({ store }).beginMany([])).toEqual([]);
    expect(calls).toEqual([]);
  });

  it('one claimMany with the batch input, answers in order, a conflict per id in flight', async () => {
    const { store, real, args } = scripted();
    const engine = new Engine({ store, leaseMs: 3_000, ttlMs: 60_000 });
    const events = recorder(engine);
    const done = await engine.begin({ id: 'done', fingerprint: null });
    if (done.kind === 'run') await done.claim.complete('o');
    await engine.begin({ id: 'busy', fingerprint: null });
    events.length = 0;
    await until(100);
    const begun = await engine.beginMany(['new', 'done', 'busy'], { fingerprint: null, leaseMs: 2_000, ttlMs: 1_000, scope: 's' });
    expect(begun.map((b) => b.kind)).toEqual(['run', 'replay', 'in_flight']);
    expect(args('claimMany')).toEqual([
      [['new', 'done', 'busy'], { fingerprint: null, leaseMs: 2_000, ttlMs: 2_000, scope: 's', owner: undefined }],
    ]);
    expect(begun[0]!.kind === 'run' && begun[0]!.claim.leaseUntil).toBe(T0 + 100 + 2_000);
    expect(begun[0]!.kind === 'run' && begun[0]!.claim.ttlMs).toBe(1_000);
    expect(events).toEqual(['acquired new takeover=false', 'replayed done', 'conflict busy 3000 @100']);
    expect(await real.get('new')).toMatchObject({ state: 'in_progress' });
  });

  it('the engine defaults without options; without claimMany in the store, one claim per id', async () => {
    const { store, args } = scripted({ claimMany: false });
    const engine = new Engine({ store, leaseMs: 3_000, ttlMs: 60_000 });
    const begun = await engine.beginMany(['a', 'b']);
    expect(begun.map((b) => b.kind)).toEqual(['run', 'run']);
    expect(args('claim')).toEqual([
      ['a', { fingerprint: null, leaseMs: 3_000, ttlMs: 60_000, scope: undefined, owner: undefined }],
      ['b', { fingerprint: null, leaseMs: 3_000, ttlMs: 60_000, scope: undefined, owner: undefined }],
    ]);
  });

  it('refuses repeated ids before any round trip', async () => {
    const { store, calls } = scripted();
    await expect(new Engine({ store }).beginMany(['a', 'b', 'a'])).rejects.toThrow('beginMany needs unique ids.');
    expect(calls).toEqual([]);
  });

  it('a failing store refuses the whole batch, unavailable or bypass with failOpen', async () => {
    const { store, script } = scripted();
    script.claimMany = () => Promise.reject(new Error('ECONNRESET'));
    const engine = new Engine({ store });
    const events = recorder(engine);
    const closed = await engine.beginMany(['a', 'b']);
    expect(events).toEqual(['storeError undefined claimMany']);
    expect(closed.map((b) => b.kind)).toEqual(['unavailable', 'unavailable']);
    expect(closed[0]).toBe(closed[1]);
    const open = await new Engine({ store, failOpen: true }).beginMany(['a', 'b']);
    expect(open.map((b) => b.kind)).toEqual(['bypass', 'bypass']);
  });
});

describe('process sessions', () => {
  function withSessions(alive: (session: string) => Promise<boolean>, heartbeat: () => Promise<void> = async () => {}) {
    const log: string[] = [];
    const sessions: StoreSessions = {
      heartbeat: async (session, ttlMs) => {
        log.push(`heartbeat ${session.length} ${ttlMs} @${Date.now() - T0}`);
        return heartbeat();
      },
      alive: async (session) => {
        log.push(`alive ${session}`);
        return alive(session);
      },
      end: async () => {
        log.push('end');
      },
    };
    return { ...scripted({ sessions }), log };
  }

  it('the first claim waits for the first heartbeat and names the session as owner; a live session is ready', async () => {
    const { store, args, log } = withSessions(async () => true);
    const engine = new Engine({ store, sessions: { ttlMs: 2_000 } });
    expect(engine.session).toBeDefined();
    await engine.begin({ id: 'a', fingerprint: null });
    await until(100);
    await engine.begin({ id: 'b', fingerprint: null });
    expect(log).toEqual(['heartbeat 36 2000 @0']);
    expect(args('claim').map(([, input]) => (input as ClaimInput).owner)).toEqual([engine.session!.id, engine.session!.id]);
    await engine.close();
    expect(log.at(-1)).toBe('end');
  });

  it('close() without sessions does nothing, and resolves', async () => {
    await expect(new Engine({ store: memoryStore() }).close()).resolves.toBeUndefined();
  });

  it('a claim within half a TTL of the session deadline waits for a heartbeat first: unavailable when it fails', async () => {
    let failing = false;
    const { store, calls } = withSessions(async () => true, async () => {
      if (failing) throw new Error('ECONNRESET');
    });
    const engine = new Engine({ store, sessions: { ttlMs: 1_000 } });
    expect((await engine.begin({ id: 'a', fingerprint: null })).kind).toBe('run');
    failing = true;
    // The session was last known alive until 1 000; at 500 that is exactly half a TTL away.
    await until(500);
    expect(engine.session!.until).toBe(T0 + 1_000);
    expect(await engine.begin({ id: 'b', fingerprint: null })).toMatchObject({ kind: 'unavailable' });
    expect((await engine.beginMany(['c', 'd'])).map((b) => b.kind)).toEqual(['unavailable', 'unavailable']);
    expect(calls.map((c) => c.args[0])).toEqual(['a']);
    await engine.close();
  });

  it('with sessions off, a record owned by another session is simply in flight', async () => {
    const { store, script, log } = withSessions(async () => false);
    script.claim = async () => inProgress(30_000, Date.now(), null, 'someone');
    const engine = new Engine({ store, sessions: false });
    expect((await engine.begin({ id: 'a', fingerprint: null })).kind).toBe('in_flight');
    expect(log).toEqual([]);
  });

  it('takeover from a dead session keeps the fingerprint rule: the same fingerprint is taken over; a null one asks the store', async () => {
    const { store, script, args } = withSessions(async () => false);
    const engine = new Engine({ store });
    let stored: string | null = 'f';
    script.claim = async (_id, input) =>
      input.takeoverFrom ? { status: 'acquired', token: 't', takeover: true, leaseUntil: Date.now() + 30_000 } : inProgress(30_000, Date.now(), stored, 'gone');
    expect((await engine.begin({ id: 'same', fingerprint: 'f' })).kind).toBe('run');
    stored = 'x';
    expect((await engine.begin({ id: 'unfingerprinted', fingerprint: null })).kind).toBe('run');
    stored = null;
    expect((await engine.begin({ id: 'stored-null', fingerprint: 'f' })).kind).toBe('run');
    expect(args('claim').filter(([, input]) => (input as ClaimInput).takeoverFrom === 'gone').map(([id]) => id)).toEqual([
      'same',
      'unfingerprinted',
      'stored-null',
    ]);
    await engine.close();
  });

  it('a failing liveness check or takeover claim is a store error of that operation: unavailable', async () => {
    const failing = withSessions(() => Promise.reject(new Error('ECONNRESET')));
    failing.script.claim = async () => inProgress(30_000, Date.now(), null, 'gone');
    const engine = new Engine({ store: failing.store });
    const events = recorder(engine);
    expect((await engine.begin({ id: 'a', fingerprint: null })).kind).toBe('unavailable');
    const refusing = withSessions(async () => false);
    refusing.script.claim = async (_id, input) => (input.takeoverFrom ? Promise.reject(new Error('ECONNRESET')) : inProgress(30_000, Date.now(), null, 'gone'));
    const other = new Engine({ store: refusing.store });
    const otherEvents = recorder(other);
    expect((await other.begin({ id: 'b', fingerprint: null })).kind).toBe('unavailable');
    expect(events).toEqual(['storeError a alive']);
    expect(otherEvents).toEqual(['storeError b claim']);
    await engine.close();
    await other.close();
  });

  it('a heartbeat that fails makes the claim unavailable: nothing is claimed', async () => {
    const { store, calls } = withSessions(async () => true, () => Promise.reject(new Error('ECONNREFUSED')));
    const engine = new Engine({ store });
    expect(await engine.begin({ id: 'a', fingerprint: null })).toMatchObject({ kind: 'unavailable' });
    expect((await engine.beginMany(['a', 'b'])).map((b) => b.kind)).toEqual(['unavailable', 'unavailable']);
    expect(calls).toEqual([]);
  });

  it('a record held by a dead session is taken over at once, naming that owner; a live one is in flight', async () => {
    const { store, script, args, log } = withSessions(async (session) => session === 'live');
    const engine = new Engine({ store });
    script.claim = async (id, input) =>
      input.takeoverFrom ? { status: 'acquired', token: 't', takeover: true, leaseUntil: Date.now() + 30_000 } : inProgress(30_000, Date.now(), null, id);
    expect((await engine.begin({ id: 'live', fingerprint: null })).kind).toBe('in_flight');
    const dead = await engine.begin({ id: 'dead', fingerprint: null });
    expect(dead.kind === 'run' && dead.claim.takeover).toBe(true);
    expect(args('claim').map(([id, input]) => [id, (input as ClaimInput).takeoverFrom])).toEqual([
      ['live', undefined],
      ['dead', undefined],
      ['dead', 'dead'],
    ]);
    expect(log.filter((l) => l.startsWith('alive'))).toEqual(['alive live', 'alive dead']);
    await engine.close();
  });

  it('no takeover for another fingerprint, for its own session, or for a record without owner', async () => {
    const { store, script, log } = withSessions(async () => false);
    const engine = new Engine({ store });
    const own = engine.session!.id;
    const answers: ClaimResult[] = [inProgress(30_000, Date.now(), 'other', 'gone'), inProgress(30_000, Date.now(), null, own), inProgress(30_000)];
    script.claim = async () => answers.shift()!;
    expect((await engine.begin({ id: 'a', fingerprint: 'mine' })).kind).toBe('mismatch');
    expect((await engine.begin({ id: 'b', fingerprint: null })).kind).toBe('in_flight');
    expect((await engine.begin({ id: 'c', fingerprint: null })).kind).toBe('in_flight');
    expect(log.filter((l) => l.startsWith('alive'))).toEqual([]);
    await engine.close();
  });

  it('beginMany takes over the records of dead sessions too', async () => {
    const { store, script } = withSessions(async () => false);
    const engine = new Engine({ store });
    script.claimMany = async (ids) => ids.map((id) => inProgress(30_000, Date.now(), null, `owner-${id}`));
    script.claim = async () => ({ status: 'acquired', token: 't', takeover: true, leaseUntil: Date.now() + 30_000 });
    const begun = await engine.beginMany(['a', 'b']);
    expect(begun.map((b) => b.kind === 'run' && b.claim.takeover)).toEqual([true, true]);
    await engine.close();
  });

  it('sessions: false turns them off; a bad sessions.ttlMs is refused', () => {
    const { store } = withSessions(async () => true);
    expect(new Engine({ store, sessions: false }).session).toBeUndefined();
    expect(() => new Engine({ store, sessions: { ttlMs: 0 } })).toThrow('sessions.ttlMs must be');
  });
});
