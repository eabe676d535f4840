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
