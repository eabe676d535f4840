/**
 * Process sessions on the SQL stores, with real processes: a claim held by a
 * process that is SIGKILLed is taken over by another engine within 2 s
 * (the session TTL is 1 s, the lease the default 30 s), while a live
 * process's slow claim keeps its whole lease.
 */
import { randomBytes } from 'node:crypto';
import { Engine } from 'oncely';
import { afterAll, describe, expect, it } from 'vitest';
import { type Backend, killStoreChildren, openBackend, spawnStoreChild } from '../support/store-children.js';

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const FINGERPRINT = 'v1:store-child'; // the child's
const engines: Engine[] = [];
const backends: Backend[] = [];

afterAll(async () => {
  killStoreChildren();
  for (const engine of engines) await engine.close();
  for (const backend of backends) await backend.teardown();
});

describe.each(['postgres', 'mysql', 'sqlite'] as const)('process sessions on %s', (name) => {
  let backend: Backend;
  const setup = async (): Promise<Engine> => {
    backend ??= await openBackend(name);
    if (!backends.includes(backend)) backends.push(backend);
    const engine = new Engine({ store: backend.store }); // defaults: 30 s lease, 1 s session TTL
    engines.push(engine);
    return engine;
  };

  it('takes over the claim of a SIGKILLed process within 2 s, although its 30 s lease runs on', async () => {
    const engine = await setup();
    const id = newId();
    const child = spawnStoreChild({ ...backend.env, ID: id, MODE: 'hold', HOLD_MS: '60000' });
    expect(await child.line('claimed')).toBe('claimed false');
    // A few heartbeats, and a kill at a random point between two of them (every 250 ms).
    await sleep(500 + Math.floor(Math.random() * 250));
    const busy = await engine.begin({ id, fingerprint: FINGERPRINT });
    expect(busy.kind, 'a live owner keeps its claim').toBe('in_flight');
    const killedAt = Date.now();
    child.child.kill('SIGKILL');
    expect(await child.exited()).toBe('SIGKILL');
    let attempts = 0;
    for (;;) {
      attempts++;
      const begun = await engine.begin({ id, fingerprint: FINGERPRINT });
      if (begun.kind === 'run') {
        const ms = Date.now() - killedAt;
        console.log(`${name}: the claim of a SIGKILLed process was taken over ${ms} ms after the kill (${attempts} claims)`);
        expect(begun.claim.takeover).toBe(true);
        expect(ms).toBeLessThan(2_000);
        expect(await begun.claim.complete('{"retried":true}')).toBe(true);
        break;
      }
      expect(begun.kind).toBe('in_flight');
      if (begun.kind === 'in_flight') expect(begun.error.leaseUntil - Date.now(), 'the lease alone would hold for long').toBeGreaterThan(20_000);
      expect(Date.now() - killedAt, 'no takeover within 5 s').toBeLessThan(5_000);
      await sleep(50);
    }
  }, 60_000);

  it("does not take over a live process's slow claim: it keeps its whole lease and completes", async () => {
    const engine = await setup();
    const id = newId();
    const child = spawnStoreChild({ ...backend.env, ID: id, MODE: 'hold', HOLD_MS: '4000' });
    await child.line('claimed');
    const watchedUntil = Date.now() + 3_000;
    let polls = 0;
    while (Date.now() < watchedUntil) {
      const begun = await engine.begin({ id, fingerprint: FINGERPRINT });
      polls++;
      expect(begun.kind, `poll ${polls}: the live owner's claim stays its own`).toBe('in_flight');
      await sleep(100);
    }
    expect(await child.line('done')).toBe('done stored');
    expect(await child.exited()).toBe(0);
    const replay = await engine.begin({ id, fingerprint: FINGERPRINT });
    expect(replay.kind).toBe('replay');
    if (replay.kind === 'replay') expect(JSON.parse(replay.record.outcome)).toMatchObject({ held: true });
  }, 60_000);

  it('takes over at once the claim of a process that ended its session (a clean shutdown with a claim left)', async () => {
    const engine = await setup();
    const id = newId();
    const other = new Engine({ store: backend.store });
    // Another process's session, simulated by a session that is not this engine's.
    const session = `ended-${randomBytes(8).toString('hex')}`;
    await backend.store.sessions!.heartbeat(session, 60_000);
    const held = await backend.store.claim(id, { fingerprint: FINGERPRINT, leaseMs: 30_000, ttlMs: 60_000, owner: session });
    expect(held.status).toBe('acquired');
    expect((await engine.begin({ id, fingerprint: FINGERPRINT })).kind).toBe('in_flight');
    await backend.store.sessions!.end(session);
    const begun = await engine.begin({ id, fingerprint: FINGERPRINT });
    expect(begun.kind).toBe('run');
    if (begun.kind === 'run') {
      expect(begun.claim.takeover).toBe(true);
      await begun.claim.release();
    }
    await other.close();
  }, 30_000);
});
