/**
 * Lease arithmetic of a claim on a virtual clock: when renewals are sent,
 * what they present, where they move the local deadline, and the exact
 * instant the signal fires when they do not get through. Every store call
 * goes through a script over a real memory store and is logged with the
 * virtual time, so an off-by-one in the arithmetic shows as a wrong instant.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { LeaseLostError } from '../errors/index.js';
import { memoryStore } from '../stores/memory.js';
import { type Claim, Engine, type EngineOptions } from './engine.js';
import type { IdempotencyStore, StoreSessions } from './store.js';

const T0 = 1_700_000_000_000;

interface Script {
  claim?: IdempotencyStore['claim'];
  renew?: IdempotencyStore['renew'];
  complete?: IdempotencyStore['complete'];
  release?: IdempotencyStore['release'];
}
type Op = keyof Script;

/** A memory store behind a script; every call is logged with its virtual time (ms after T0). */
function scripted(sessions?: StoreSessions) {
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
    get: (id) => real.get(id),
    delete: (id) => real.delete(id),
    purgeExpired: (limit) => real.purgeExpired(limit),
    close: () => real.close(),
    ...(sessions ? { sessions } : {}),
  };
  const at = (op: Op) => calls.filter((call) => call.op === op).map((call) => call.at);
  return { store, real, calls, script, at };
}

const hang = <T>(): Promise<T> => new Promise<T>(() => {});
const answerAfter = <T>(ms: number, value: T): Promise<T> => new Promise<T>((resolve) => setTimeout(() => resolve(value), ms));
/** Move the virtual clock to `ms` after T0, running every timer and promise due on the way. */
const until = async (ms: number): Promise<void> => {
  await vi.advanceTimersByTimeAsync(T0 + ms - Date.now());
};

function engineOn(store: IdempotencyStore, options: Partial<EngineOptions> = {}) {
  const events: string[] = [];
  const engine = new Engine({ store, storeTimeoutMs: 60_000, ...options });
  engine.on('leaseLost', (e) => events.push(`leaseLost ${e.id} @${Date.now() - T0}`));
  engine.on('fenced', (e) => events.push(`fenced ${e.operation} @${Date.now() - T0}`));
  engine.on('stored', () => events.push(`stored @${Date.now() - T0}`));
  return { engine, events };
}

async function won(engine: Engine, id = 'op'): Promise<Claim> {
  const begun = await engine.begin({ id, fingerprint: 'f' });
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  return begun.claim;
}

/** When the signal aborted (ms after T0), or undefined. */
function abortTime(claim: Claim): { at: number | undefined } {
  const seen: { at: number | undefined } = { at: undefined };
  claim.signal.addEventListener('abort', () => {
    seen.at = Date.now() - T0;
  });
  return seen;
}

beforeEach(() => {
  vi.useFakeTimers({ now: T0 });
});
afterEach(() => {
  vi.useRealTimers();
});

describe('renewals', () => {
  it('are sent every third of the lease, each with the token and the full lease', async () => {
    const { store, calls, at } = scripted();
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    await until(3_500);
    expect(at('renew')).toEqual([1_000, 2_000, 3_000]);
    for (const call of calls.filter((c) => c.op === 'renew')) expect(call.args).toEqual(['op', claim.token, 3_000]);
    expect(claim.leaseUntil).toBe(T0 + 3_000 + 3_000);
    expect(claim.lost).toBe(false);
  });

  it('round a third of the lease down, and are never more often than every 10 ms', async () => {
    const a = scripted();
    await won(engineOn(a.store, { leaseMs: 3_002, ttlMs: 60_000 }).engine);
    await until(3_002);
    expect(a.at('renew')).toEqual([1_000, 2_000, 3_000]);

    vi.setSystemTime(T0);
    const b = scripted();
    await won(engineOn(b.store, { leaseMs: 20, ttlMs: 60_000 }).engine);
    await until(35);
    expect(b.at('renew')).toEqual([10, 20, 30]);
  });

  it('are due a third of the lease after the previous one was sent, however late its answer came', async () => {
    const { store, real, script, at } = scripted();
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    script.renew = (id, token, leaseMs) => answerAfter(400, undefined).then(() => real.renew(id, token, leaseMs));
    const claim = await won(engine);
    await until(3_500);
    expect(at('renew')).toEqual([1_000, 2_000, 3_000]);
    expect(claim.lost).toBe(false);
  });

  it('stop once the claim settles', async () => {
    const { store, at } = scripted();
    const { engine } = engineOn(store, { leaseMs: 300 });
    const claim = await won(engine);
    await until(150);
    expect(claim.settling).toBe(false);
    const settled = claim.complete('done');
    expect(claim.settling).toBe(true);
    expect(await settled).toBe(true);
    expect(claim.settling).toBe(true);
    await until(2_000);
    expect(at('renew')).toEqual([100]);
  });
});

describe('the local lease deadline', () => {
  it('counts from when the claim was sent, not from when the store answered', async () => {
    const { store, real, script } = scripted();
    script.claim = (id, input) => answerAfter(700, undefined).then(() => real.claim(id, input));
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const begun = engine.begin({ id: 'op', fingerprint: null });
    await until(700);
    const result = await begun;
    if (result.kind !== 'run') throw new Error('expected run');
    expect(result.claim.leaseUntil).toBe(T0 + 3_000);
  });

  it('moves with each renewal that gets through, to when that renewal was sent', async () => {
    const { store, real, script } = scripted();
    script.renew = (id, token, leaseMs) => answerAfter(250, undefined).then(() => real.renew(id, token, leaseMs));
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    await until(1_249);
    expect(claim.leaseUntil).toBe(T0 + 3_000);
    await until(1_250);
    expect(claim.leaseUntil).toBe(T0 + 1_000 + 3_000);
  });

  it('fires the signal exactly at the deadline while a renewal hangs, once', async () => {
    const { store, script, at } = scripted();
    script.renew = () => hang();
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(2_999);
    expect(claim.signal.aborted).toBe(false);
    expect(claim.lost).toBe(false);
    await until(3_000);
    expect(aborted.at).toBe(3_000);
    expect(claim.lost).toBe(true);
    expect(claim.signal.reason).toBeInstanceOf(LeaseLostError);
    await until(10_000);
    expect(events).toEqual(['leaseLost op @3000']);
    // The hanging renewal is the only one: nothing is sent while it is outstanding.
    expect(at('renew')).toEqual([1_000]);
  });

  it('renewals that fail are tried again at the next third; one that then gets through keeps the lease', async () => {
    const { store, real, script, at } = scripted();
    let failures = 1;
    script.renew = (id, token, leaseMs) =>
      failures-- > 0 ? Promise.reject(new Error('ECONNRESET')) : real.renew(id, token, leaseMs);
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(1_000);
    expect(claim.lost).toBe(false);
    expect(claim.leaseUntil).toBe(T0 + 3_000);
    await until(2_000);
    expect(claim.leaseUntil).toBe(T0 + 2_000 + 3_000);
    // The deadline armed by the failed renewal is disarmed by the good one: nothing fires at 3 000.
    await until(4_500);
    expect(aborted.at).toBeUndefined();
    expect(events).toEqual([]);
    expect(at('renew')).toEqual([1_000, 2_000, 3_000, 4_000]);
  });

  it('renewals that keep failing: lost at the deadline, and no renewal is sent after it', async () => {
    const { store, script, at } = scripted();
    script.renew = () => Promise.reject(new Error('ECONNRESET'));
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(2_999);
    expect(aborted.at).toBeUndefined();
    await until(20_000);
    expect(aborted.at).toBe(3_000);
    expect(at('renew')).toEqual([1_000, 2_000, 3_000]);
    expect(events).toEqual(['leaseLost op @3000']);
  });

  it('a renewal whose failure comes after the deadline sends no further renewal', async () => {
    // The failure arrives at 3 500, past the deadline (3 000): retrying would renew a lease
    // that others may already hold.
    const { store, script, at } = scripted();
    script.renew = () => new Promise((_, reject) => setTimeout(() => reject(new Error('ECONNRESET')), 2_500));
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    await until(20_000);
    expect(claim.lost).toBe(true);
    expect(at('renew')).toEqual([1_000]);
  });

  it('a refused renewal (taken over) aborts at once and stops renewing', async () => {
    const { store, script, at } = scripted();
    script.renew = () => answerAfter(5, false);
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(10_000);
    expect(aborted.at).toBe(1_005);
    expect(events).toEqual(['fenced renew @1005', 'leaseLost op @1005']);
    expect(at('renew')).toEqual([1_000]);
  });

  it('a signal first asked for after the loss is already aborted, with the same reason', async () => {
    const { store, script } = scripted();
    script.renew = () => Promise.resolve(false);
    const { engine } = engineOn(store, { leaseMs: 300 });
    const claim = await won(engine);
    await until(200);
    expect(claim.lost).toBe(true);
    const signal = claim.signal;
    expect(signal.aborted).toBe(true);
    expect(signal.reason).toBeInstanceOf(LeaseLostError);
    expect(claim.signal).toBe(signal);
  });

  it('an answer that comes after the claim settled changes nothing: no loss, no event', async () => {
    const { store, script } = scripted();
    script.renew = () => answerAfter(500, false);
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    await until(1_100);
    expect(await claim.complete('done')).toBe(true);
    await until(10_000);
    expect(claim.lost).toBe(false);
    expect(claim.signal.aborted).toBe(false);
    expect(events).toEqual(['stored @1100']);
  });

  it('a renewal that fails after the claim settled, even past the deadline, changes nothing', async () => {
    const { store, script } = scripted();
    script.renew = () => new Promise((_, reject) => setTimeout(() => reject(new Error('ECONNRESET')), 2_500));
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    await until(1_100);
    expect(await claim.complete('done')).toBe(true);
    await until(10_000);
    expect(claim.lost).toBe(false);
    expect(events).toEqual(['stored @1100']);
  });

  it('a failed renewal is reported as a store error of the renew operation', async () => {
    const { store, script } = scripted();
    script.renew = () => Promise.reject(new Error('ECONNRESET'));
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const errors: string[] = [];
    engine.on('storeError', (e) => errors.push(`${e.id} ${e.operation}`));
    await won(engine);
    await until(1_000);
    expect(errors).toEqual(['op renew']);
  });

  it('a claim settled while a renewal hangs never fires its signal at the old deadline', async () => {
    const { store, script } = scripted();
    script.renew = () => hang();
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(1_500);
    expect(await claim.complete('done')).toBe(true);
    await until(10_000);
    expect(aborted.at).toBeUndefined();
    expect(events).toEqual(['stored @1500']);
  });
});

describe('abandon', () => {
  it('stops renewing; the signal fires exactly at the deadline of the last renewal that got through', async () => {
    const { store, at } = scripted();
    const { engine, events } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    await until(1_500);
    expect(claim.leaseUntil).toBe(T0 + 4_000);
    claim.abandon();
    expect(claim.settling).toBe(false);
    const aborted = abortTime(claim);
    await until(3_999);
    expect(aborted.at).toBeUndefined();
    await until(10_000);
    expect(aborted.at).toBe(4_000);
    expect(at('renew')).toEqual([1_000]);
    expect(events).toEqual(['leaseLost op @4000']);
  });

  it('a renewal answered after the abandon does not move the deadline or renew again', async () => {
    const { store, real, script, at } = scripted();
    script.renew = (id, token, leaseMs) => answerAfter(200, undefined).then(() => real.renew(id, token, leaseMs));
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(1_100);
    claim.abandon();
    await until(10_000);
    expect(aborted.at).toBe(3_000);
    expect(at('renew')).toEqual([1_000]);
  });

  it('twice, or after settling, does nothing more', async () => {
    const { store, at } = scripted();
    const { engine } = engineOn(store, { leaseMs: 3_000 });
    const settled = await won(engine, 'settled');
    await settled.complete('done');
    settled.abandon();
    expect(settled.settling).toBe(true);
    const claim = await won(engine, 'twice');
    claim.abandon();
    claim.abandon();
    const aborted = abortTime(claim);
    await until(10_000);
    expect(aborted.at).toBe(3_000);
    expect(at('renew')).toEqual([]);
  });

  it('with an answer already out, completes with its marker at once instead', async () => {
    const { store, calls } = scripted();
    const { engine, events } = engineOn(store, { leaseMs: 3_000, ttlMs: 60_000 });
    const claim = await won(engine);
    claim.answered('marker');
    expect(claim.marker).toBe('marker');
    claim.abandon();
    expect(claim.settling).toBe(true);
    await until(10);
    expect(calls.filter((c) => c.op === 'complete').map((c) => c.args)).toEqual([['op', claim.token, 'marker', 60_000]]);
    expect(events).toEqual(['stored @0']);
    await until(10_000);
    expect(claim.lost).toBe(false);
  });
});

describe('with a process session', () => {
  /** Sessions whose heartbeats fail while `down` is set; TTL 1 000 ms, so a beat every 250 ms. */
  function withSessions() {
    const link = { down: false, hang: false };
    const beats: number[] = [];
    const sessions: StoreSessions = {
      heartbeat: async () => {
        beats.push(Date.now() - T0);
        if (link.hang) await new Promise(() => {});
        if (link.down) throw new Error('ECONNRESET');
      },
      alive: async () => true,
      end: async () => {},
    };
    return { ...scripted(sessions), link, beats };
  }

  it("the deadline is never later than the session's, which each heartbeat moves", async () => {
    const { store, beats } = withSessions();
    const { engine } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    expect(claim.leaseUntil).toBe(T0 + 1_000);
    await until(600);
    expect(beats).toEqual([0, 250, 500]);
    expect(claim.leaseUntil).toBe(T0 + 1_500);
    await engine.close();
  });

  it('heartbeats that fail: the signal fires exactly when the session may have ended', async () => {
    const { store, link } = withSessions();
    const { engine, events } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    link.down = true;
    await until(999);
    expect(aborted.at).toBeUndefined();
    await until(5_000);
    expect(aborted.at).toBe(1_000);
    expect(events).toEqual(['leaseLost op @1000']);
    await engine.close();
  });

  it('one failed heartbeat and then good ones: the deadline it armed moves on, nothing is lost', async () => {
    const { store, link } = withSessions();
    const { engine, events } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    link.down = true;
    await until(300);
    link.down = false;
    await until(5_000);
    expect(claim.lost).toBe(false);
    expect(claim.leaseUntil).toBe(T0 + 5_000 + 1_000);
    expect(events).toEqual([]);
    // And when they fail for good later, the signal still fires at the session's end.
    link.down = true;
    const aborted = abortTime(claim);
    await until(10_000);
    expect(aborted.at).toBe(6_000);
    await engine.close();
  });

  it('a deadline moved on by good heartbeats is kept armed: a heartbeat that then hangs still ends the claim at the session end', async () => {
    // Beat at 250 fails (deadline armed for 1 000), 500 succeeds (session alive until 1 500), 750 hangs
    // (the store timeout is a minute): the claim must still count as lost at 1 500.
    const { store, link } = withSessions();
    const { engine, events } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    link.down = true;
    await until(300);
    link.down = false;
    await until(600);
    link.hang = true;
    await until(20_000);
    expect(aborted.at).toBe(1_500);
    expect(events).toEqual(['leaseLost op @1500']);
    await engine.close();
  });

  it('an abandoned claim follows the session too: its deadline moves with good heartbeats and fires when they stop', async () => {
    const { store, link } = withSessions();
    const { engine } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    claim.abandon();
    const aborted = abortTime(claim);
    await until(600);
    link.hang = true; // no failure to report: only the re-armed deadline can fire
    await until(20_000);
    // Last good heartbeat sent at 500: alive until 1 500.
    expect(aborted.at).toBe(1_500);
    await engine.close();
  });

  it('armed twice (a renewal hangs, then a heartbeat fails): one deadline timer, so nothing fires after the claim settles', async () => {
    // Renewal at 1 000 hangs: the deadline is armed for 3 000. The heartbeat at 2 500 fails: the
    // session is at risk and the deadline must stay the one timer. Settled at 2 600, nothing may fire
    // at 3 000 (a second timer would leave the first behind, to mark a settled claim lost).
    const { store, script, link } = withSessions();
    script.renew = () => hang();
    const { engine, events } = engineOn(store, { leaseMs: 3_000, sessions: { ttlMs: 10_000 } });
    const claim = await won(engine);
    const aborted = abortTime(claim);
    await until(2_400);
    link.down = true;
    await until(2_600);
    expect(await claim.complete('done')).toBe(true);
    await until(20_000);
    expect(aborted.at).toBeUndefined();
    expect(claim.lost).toBe(false);
    expect(events).toEqual(['stored @2600']);
    await engine.close();
  });

  it("a completion cut off by the outage that stopped the heartbeats is retried to the lease's end, not the session's", async () => {
    // Seen in a Redis failover: heartbeats and the completion fail together for
    // ~3 s. Giving up at the session's end (1 000) left the record in progress
    // until its lease ended, and a retry then ran the operation again.
    const { store, link, script, at } = withSessions();
    const { engine, events } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    link.down = true;
    script.complete = async () => {
      if (Date.now() - T0 < 3_000) throw new Error('ECONNRESET');
      link.down = false;
      return true;
    };
    const settled = claim.settle({ kind: 'complete', outcome: 'done' });
    await until(10_000);
    expect(await settled).toBe('stored');
    expect(at('complete').at(-1)).toBeGreaterThanOrEqual(3_000);
    expect(at('complete').at(-1)).toBeLessThan(5_000);
    expect(events).toEqual([expect.stringMatching(/^stored @/)]);
    await engine.close();
  });

  it('that retry is still fenced: taken over meanwhile (the session looked dead), the completion writes nothing', async () => {
    const { store, real, link, script } = withSessions();
    const { engine } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const claim = await won(engine);
    link.down = true;
    script.complete = async (id, token, outcome, ttlMs) => {
      if (Date.now() - T0 < 3_000) throw new Error('ECONNRESET');
      return real.complete(id, token, outcome, ttlMs);
    };
    const settled = claim.settle({ kind: 'complete', outcome: 'first' });
    await until(2_000);
    // Another worker holds the record now under a token of its own (as after a
    // takeover once the session looked dead; the memory store has no sessions).
    await real.delete('op');
    const taken = await real.claim('op', { fingerprint: 'f', leaseMs: 30_000, ttlMs: 60_000 });
    expect(taken.status).toBe('acquired');
    await until(10_000);
    expect(await settled).toBe('fenced');
    expect((await real.get('op'))?.state).toBe('in_progress');
    await engine.close();
  });

  it('a settled or abandoned claim: heartbeats failing after it settled change nothing; abandoned, it ends with the session', async () => {
    const { store, link } = withSessions();
    const { engine, events } = engineOn(store, { leaseMs: 30_000, sessions: { ttlMs: 1_000 } });
    const settled = await won(engine, 'settled');
    expect(await settled.complete('done')).toBe(true);
    const abandoned = await won(engine, 'abandoned');
    abandoned.abandon();
    const aborted = abortTime(abandoned);
    link.down = true;
    await until(5_000);
    expect(settled.lost).toBe(false);
    expect(aborted.at).toBe(1_000);
    expect(events).toEqual(['stored @0', 'leaseLost abandoned @1000']);
    await engine.close();
  });
});
