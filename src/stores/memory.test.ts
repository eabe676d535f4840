import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { idempotent } from '../engine/idempotent.js';
import { StoreFullError } from '../errors/index.js';
import { defineStoreConformance } from '../testing/index.js';
import { type MemoryStore, memoryStore, RECORD_OVERHEAD_BYTES } from './memory.js';

const store = memoryStore();
defineStoreConformance({ describe, it, beforeAll, afterAll }, { name: 'memory', store: () => store });

const MiB = 1024 * 1024;
const LIVE = { fingerprint: null, leaseMs: 10_000, ttlMs: 60_000 };

/** Claim and complete `id` in `scope` with `outcome`; answers the claim's status. */
async function fill(store: MemoryStore, id: string, scope: string | undefined, outcome: string): Promise<string> {
  const claim = await store.claim(id, { ...LIVE, scope });
  if (claim.status === 'acquired') expect(await store.complete(id, claim.token, outcome, 60_000)).toBe(true);
  return claim.status;
}

describe('memory store bounds', () => {
  it("the audit's attack: a tenant echoing 1 MiB responses never pushes out another tenant's records", async () => {
    // Default bounds (64 MiB, no per-scope share): before, 32 such requests evicted everyone else.
    const store = memoryStore();
    for (let i = 0; i < 20; i++) await fill(store, `b-${i}`, 'tenant-b', `{"status":201,"n":${i}}`);
    let accepted = 0;
    for (let i = 0; i < 100; i++) {
      try {
        await fill(store, `a-${i}`, 'tenant-a', 'x'.repeat(MiB));
        accepted++;
      } catch (error) {
        expect(error).toBeInstanceOf(StoreFullError);
        break;
      }
    }
    expect(accepted).toBeGreaterThan(0);
    // 2 MiB each as held (UTF-16): the 32nd claim still fits, its outcome crosses the bound.
    expect(accepted).toBe(32);
    expect(store.bytes).toBeGreaterThan(64 * MiB);
    // Tenant B's completed records all replay: its retries never run again.
    for (let i = 0; i < 20; i++) {
      const replay = await store.claim(`b-${i}`, { ...LIVE, scope: 'tenant-b' });
      expect(replay).toMatchObject({ status: 'completed', record: { outcome: `{"status":201,"n":${i}}` } });
    }
    // Tenant A's next new claim is refused, and nothing was evicted to make room.
    const size = store.size;
    await expect(store.claim('a-next', { ...LIVE, scope: 'tenant-a' })).rejects.toBeInstanceOf(StoreFullError);
    await expect(store.claim('a-next', { ...LIVE, scope: 'tenant-a' })).rejects.toMatchObject({
      status: 503,
      type: expect.stringContaining('store-full'),
    });
    expect(store.size).toBe(size);
    expect(store.usage('tenant-b').entries).toBe(20);
  });

  it('with a per-scope share, the tenant that filled its share is refused and the others still claim new keys', async () => {
    const store = memoryStore({ maxBytes: 64 * MiB, maxBytesPerScope: 8 * MiB });
    for (let i = 0; i < 5; i++) await fill(store, `b-${i}`, 'tenant-b', 'ok');
    let accepted = 0;
    await expect(
      (async () => {
        for (;;) {
          await fill(store, `a-${accepted}`, 'tenant-a', 'x'.repeat(MiB));
          accepted++;
        }
      })(),
    ).rejects.toBeInstanceOf(StoreFullError);
    expect(accepted).toBe(4); // 4 × (2 MiB + overhead) fills 8 MiB
    expect(store.usage('tenant-a').bytes).toBeGreaterThan(8 * MiB);
    // Tenant B: its records replay and its new claims go through.
    for (let i = 0; i < 5; i++) expect(await fill(store, `b-${i}`, 'tenant-b', 'again')).toBe('completed');
    expect(await fill(store, 'b-new', 'tenant-b', 'ok')).toBe('acquired');
    // A replay and a duplicate in flight of tenant A still answer: only new records are refused.
    expect(await fill(store, 'a-0', 'tenant-a', 'y')).toBe('completed');
  });

  it("counts entries per scope with maxEntriesPerScope; claims without a scope share the '' scope", async () => {
    const store = memoryStore({ maxEntries: 100, maxEntriesPerScope: 3 });
    for (const id of ['n1', 'n2', 'n3']) await fill(store, id, undefined, 'x');
    await expect(store.claim('n4', LIVE)).rejects.toBeInstanceOf(StoreFullError);
    await expect(store.claim('n4', { ...LIVE, scope: '' })).rejects.toBeInstanceOf(StoreFullError);
    expect(store.usage('')).toMatchObject({ entries: 3 });
    expect(await fill(store, 's1', 'tenant', 'x')).toBe('acquired');
  });

  it('refuses a new claim with StoreFullError when the store is full, and evicts nothing', async () => {
    const store = memoryStore({ maxEntries: 3 });
    const busy = await store.claim('busy', LIVE);
    expect(busy.status).toBe('acquired');
    await fill(store, 'a', 'one', 'a');
    await fill(store, 'b', 'two', 'b');
    await expect(store.claim('c', { ...LIVE, scope: 'three' })).rejects.toMatchObject({ code: 'ONCELY_STORE_FULL' });
    expect(await store.get('c')).toBeNull();
    expect(store.size).toBe(3);
    expect(await store.get('busy')).toMatchObject({ state: 'in_progress' });
    expect(await store.get('a')).toMatchObject({ state: 'completed', outcome: 'a' });
    expect(await store.get('b')).toMatchObject({ state: 'completed', outcome: 'b' });
    // Releasing a record makes room again.
    if (busy.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.release('busy', busy.token)).toBe(true);
    expect(await fill(store, 'c', 'three', 'c')).toBe('acquired');
  });

  it('refuses by bytes: the bound counts ids, tokens, fingerprints and a per-record overhead, not only outcomes', async () => {
    const store = memoryStore({ maxBytes: 10 * RECORD_OVERHEAD_BYTES });
    let accepted = 0;
    await expect(
      (async () => {
        for (;;) {
          const id = `${'k'.repeat(64)}${accepted}`;
          // Empty outcomes: before, such records counted 0 bytes and the bound never held.
          await store.claim(id, { ...LIVE, fingerprint: `v1:${'f'.repeat(64)}` }).then(async (claim) => {
            if (claim.status === 'acquired') await store.complete(id, claim.token, '', 60_000);
          });
          accepted++;
        }
      })(),
    ).rejects.toBeInstanceOf(StoreFullError);
    expect(accepted).toBeGreaterThan(3);
    expect(accepted).toBeLessThan(10);
    expect(store.bytes).toBeLessThanOrEqual(10 * RECORD_OVERHEAD_BYTES);
    // One record: overhead + 2 bytes per character of id, token, fingerprint and outcome.
    const one = memoryStore();
    await fill(one, 'id', 'sc', 'outcome');
    const token = 36; // a UUID
    expect(one.bytes).toBe(RECORD_OVERHEAD_BYTES + 2 * ('id'.length + token + 'sc'.length + 'outcome'.length));
    expect(one.usage('sc').bytes).toBe(one.bytes);
  });

  it('stores an outcome that crosses the bound (the operation ran), and refuses the next new claim', async () => {
    const store = memoryStore({ maxBytes: 1_000_000 });
    const claim = await store.claim('big', LIVE);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete('big', claim.token, 'x'.repeat(600_000), 60_000)).toBe(true);
    expect(store.bytes).toBeGreaterThan(1_000_000);
    expect(await store.claim('big', LIVE)).toMatchObject({ status: 'completed' });
    await expect(store.claim('next', LIVE)).rejects.toBeInstanceOf(StoreFullError);
  });

  it('reclaims expired records before refusing, whichever scope they belong to', async () => {
    let now = 1_000;
    const store = memoryStore({ maxEntries: 3, now: () => now });
    const short = { ...LIVE, ttlMs: 1_000, leaseMs: 500 };
    for (const [id, scope] of [
      ['x', 'one'],
      ['y', 'two'],
    ] as const) {
      const claim = await store.claim(id, { ...short, scope });
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await store.complete(id, claim.token, 'old', 1_000);
    }
    await fill(store, 'z', 'three', 'live');
    await expect(store.claim('w', LIVE)).rejects.toBeInstanceOf(StoreFullError);
    now += 1_001;
    expect(await fill(store, 'w', 'three', 'new')).toBe('acquired');
    expect(await fill(store, 'v', 'three', 'new')).toBe('acquired');
    expect(store.size).toBe(3);
    expect(store.usage('one').entries + store.usage('two').entries).toBe(0);
    expect(await store.get('z')).toMatchObject({ outcome: 'live' });
  });

  it('reclaims a few expired records on every claim, so it stays clean without a timer', async () => {
    let now = 0;
    const store = memoryStore({ now: () => now });
    for (let i = 0; i < 200; i++) {
      const claim = await store.claim(`old${i}`, { ...LIVE, ttlMs: 100, leaseMs: 100 });
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await store.complete(`old${i}`, claim.token, 'x', 100);
    }
    now = 1_000;
    for (let i = 0; i < 13; i++) await fill(store, `new${i}`, undefined, 'y');
    expect(store.size).toBe(13); // 16 reclaimed per claim: 13 claims cleared 200
  });

  it('purges expired records soonest first and keeps live ones, also after renewals moved their deadlines', async () => {
    let now = 0;
    const store = memoryStore({ now: () => now });
    for (let i = 0; i < 10; i++) {
      const claim = await store.claim(`e${i}`, { ...LIVE, leaseMs: 10, ttlMs: 100 + i });
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await store.complete(`e${i}`, claim.token, 'x', 100 + i);
    }
    const held = await store.claim('held', { ...LIVE, leaseMs: 50, ttlMs: 50 });
    if (held.status !== 'acquired') throw new Error('expected acquired');
    now = 40;
    expect(await store.renew('held', held.token, 1_000)).toBe(true);
    now = 104;
    expect(await store.purgeExpired(3)).toBe(3);
    expect(await store.purgeExpired(100)).toBe(2);
    expect(store.size).toBe(6);
    expect(await store.get('e5')).toMatchObject({ state: 'completed' });
    expect(await store.get('held')).toMatchObject({ state: 'in_progress' });
  });

  it('keeps its expiry queue bounded when records are released over and over', async () => {
    const store = memoryStore();
    for (let i = 0; i < 20_000; i++) {
      const claim = await store.claim(`r${i}`, LIVE);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await store.release(`r${i}`, claim.token);
    }
    expect(store.size).toBe(0);
    expect(store.bytes).toBe(0);
    expect(store.usage('')).toEqual({ entries: 0, bytes: 0 });
  });

  it('refuses bounds that are not positive numbers', () => {
    expect(() => memoryStore({ maxEntries: 0 })).toThrow(/maxEntries/);
    expect(() => memoryStore({ maxBytesPerScope: -1 })).toThrow(/maxBytesPerScope/);
  });
});

describe('memory store behind idempotent()', () => {
  it("a victim's retry never runs its handler again while another tenant floods the store", async () => {
    const store = memoryStore();
    const runs = new Map<string, number>();
    const echo = idempotent(
      async (request: { account: string; key: string; body: string }) => {
        runs.set(request.key, (runs.get(request.key) ?? 0) + 1);
        return request.body;
      },
      { store, namespace: 'echo', key: (r) => r.key, scope: (r) => r.account, fingerprint: false },
    );
    await echo({ account: 'victim', key: 'pay-1', body: 'paid' });
    const flood = 'x'.repeat(MiB);
    let refused: unknown;
    for (let i = 0; i < 40 && refused === undefined; i++) {
      await echo({ account: 'attacker', key: `big-${i}`, body: flood }).catch((error: unknown) => {
        refused = error;
      });
    }
    expect(refused).toBeInstanceOf(StoreFullError);
    expect(await echo({ account: 'victim', key: 'pay-1', body: 'paid' })).toBe('paid');
    expect(runs.get('pay-1')).toBe(1);
  });
});

describe('memory store claimMany', () => {
  it('undoes the claims of its own batch when one claim fails with StoreFullError, and nothing else', async () => {
    let now = 1_000;
    const bounded = memoryStore({ maxEntries: 3, now: () => now });
    const input = { fingerprint: null, leaseMs: 10_000, ttlMs: 60_000 };
    // Someone else's live claim, and an abandoned one whose lease has ended.
    const held = await bounded.claim('held', input);
    const stale = await bounded.claim('stale', { ...input, leaseMs: 100 });
    if (held.status !== 'acquired' || stale.status !== 'acquired') throw new Error('expected acquired');
    now += 200;
    // 'stale' is taken over, 'held' answers in progress, 'new1' fills the
    // store and 'new2' finds no room.
    await expect(bounded.claimMany!(['stale', 'held', 'new1', 'new1', 'new2'], input)).rejects.toMatchObject({
      code: 'ONCELY_STORE_FULL',
    });
    // What the batch created or took over is gone; nobody holds those tokens.
    expect(await bounded.get('new1')).toBeNull();
    expect(await bounded.get('new2')).toBeNull();
    expect(await bounded.get('stale')).toBeNull();
    // What the batch did not take is untouched: the owner of 'held' still owns it.
    expect(await bounded.get('held')).toMatchObject({ state: 'in_progress' });
    expect(await bounded.renew('held', held.token, 10_000)).toBe(true);
    expect(bounded.size).toBe(1);
    // With room again, the same batch succeeds as a whole.
    expect((await memoryStore().claimMany!(['a', 'b'], input)).map((r) => r.status)).toEqual(['acquired', 'acquired']);
  });
  it('undoes a claim of its batch held in the first slot of the table too', async () => {
    // The store's first record sits in slot 0 (found by the mutation run: `slot > 0` survived the test above).
    const bounded = memoryStore({ maxEntries: 1 });
    const input = { fingerprint: null, leaseMs: 10_000, ttlMs: 60_000 };
    await expect(bounded.claimMany!(['first', 'second'], input)).rejects.toMatchObject({ code: 'ONCELY_STORE_FULL' });
    expect(await bounded.get('first')).toBeNull();
    expect(bounded.size).toBe(0);
    expect((await bounded.claim('first', input)).status).toBe('acquired');
  });
});

describe('memory store lookups', () => {
  it('finds every record and forgets removed ones through growth, removals and reuse of slots (checked against a Map)', async () => {
    let now = 0;
    const store = memoryStore({ maxEntries: 1_000_000, maxBytes: 2 ** 34, now: () => now });
    const model = new Map<string, { token: string; done: boolean }>();
    // A small deterministic generator: the same sequence every run.
    let x = 42;
    const next = (n: number): number => {
      x = (Math.imul(x, 1103515245) + 12345) & 0x7fffffff;
      return x % n;
    };
    const idOf = (n: number) => (n % 3 === 0 ? `k${n}` : n % 3 === 1 ? `${n.toString(16).padStart(64, '0')}` : `scope/é/${n}`);
    for (let step = 0; step < 30_000; step++) {
      const id = idOf(next(5_000));
      const op = next(4);
      const known = model.get(id);
      if (op < 2) {
        const claim = await store.claim(id, LIVE);
        if (known === undefined) {
          expect(claim.status).toBe('acquired');
          if (claim.status === 'acquired') model.set(id, { token: claim.token, done: false });
        } else expect(claim.status).toBe(known.done ? 'completed' : 'in_progress');
      } else if (op === 2 && known !== undefined && !known.done) {
        if (next(2) === 0) {
          expect(await store.complete(id, known.token, `out ${id}`, 60_000)).toBe(true);
          known.done = true;
        } else {
          expect(await store.release(id, known.token)).toBe(true);
          model.delete(id);
        }
      } else if (op === 3) {
        expect(await store.delete(id)).toBe(known !== undefined);
        model.delete(id);
      }
    }
    expect(store.size).toBe(model.size);
    for (let n = 0; n < 5_000; n++) {
      const id = idOf(n);
      const record = await store.get(id);
      const known = model.get(id);
      if (known === undefined) expect(record).toBeNull();
      else expect(record).toMatchObject(known.done ? { state: 'completed', outcome: `out ${id}` } : { state: 'in_progress' });
    }
    // Everything expires and is reclaimed: the store empties.
    now += 120_000;
    expect(await store.purgeExpired(1_000_000)).toBe(model.size);
    expect(store.size).toBe(0);
    expect(store.bytes).toBe(0);
  });
});
