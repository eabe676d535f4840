import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defineStoreConformance } from '../testing/index.js';
import { memoryStore } from './memory.js';

const store = memoryStore();
defineStoreConformance({ describe, it, beforeAll, afterAll }, { name: 'memory', store: () => store });

describe('memory store bounds', () => {
  it('evicts the oldest completed records beyond maxEntries, never one in progress', async () => {
    const bounded = memoryStore({ maxEntries: 3 });
    const input = { fingerprint: null, leaseMs: 10_000, ttlMs: 10_000 };
    const busy = await bounded.claim('busy', input);
    expect(busy.status).toBe('acquired');
    for (const id of ['a', 'b', 'c']) {
      const claim = await bounded.claim(id, input);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await bounded.complete(id, claim.token, id, 10_000);
    }
    expect(bounded.size).toBeLessThanOrEqual(3);
    expect((await bounded.get('busy'))?.state).toBe('in_progress');
    expect(await bounded.get('c')).not.toBeNull();
    expect(await bounded.get('a')).toBeNull();
  });

  it('refuses a claim with StoreFullError when only records in progress remain', async () => {
    const bounded = memoryStore({ maxEntries: 2 });
    const input = { fingerprint: null, leaseMs: 10_000, ttlMs: 10_000 };
    await bounded.claim('x', input);
    await bounded.claim('y', input);
    await expect(bounded.claim('z', input)).rejects.toMatchObject({ code: 'ONCELY_STORE_FULL' });
    expect(await bounded.get('z')).toBeNull();
  });

  it('evicts by bytes', async () => {
    const bounded = memoryStore({ maxBytes: 1000 });
    const input = { fingerprint: null, leaseMs: 10_000, ttlMs: 10_000 };
    for (const id of ['a', 'b', 'c']) {
      const claim = await bounded.claim(id, input);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await bounded.complete(id, claim.token, 'x'.repeat(200), 10_000);
    }
    expect(bounded.bytes).toBeLessThanOrEqual(1000);
    expect(await bounded.get('a')).toBeNull();
    expect(await bounded.get('c')).not.toBeNull();
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
});
