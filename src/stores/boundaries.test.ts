/**
 * The instants where a store's decisions flip, on a clock the test holds:
 * a lease ends AT its leaseUntil (a claim at that instant takes over), a
 * record expires AT its expiresAt (absent to every operation from then on),
 * and a takeover needs the same fingerprint. `claimMany` decides under the
 * write lock without the plain read `claim` answers from first, so both
 * paths are checked. Run for the memory and the SQLite store.
 */
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import type { ClaimInput, ClaimResult, IdempotencyStore } from '../engine/store.js';
import { memoryStore } from './memory.js';
import { sqliteStore } from './sqlite.js';

const T0 = 1_700_000_000_000;
const clock = { now: T0 };
const databases: Database.Database[] = [];
const closing: IdempotencyStore[] = [];

afterAll(async () => {
  for (const store of closing) await store.close();
  for (const db of databases) db.close();
});

const makers: Array<[string, () => IdempotencyStore]> = [
  ['memory', () => memoryStore({ now: () => clock.now })],
  [
    'sqlite',
    () => {
      const database = new Database(':memory:');
      databases.push(database);
      const store = sqliteStore({ database, purge: false, now: () => clock.now });
      closing.push(store);
      return store;
    },
  ],
];

const input = (fingerprint: string | null = 'f', leaseMs = 1_000, ttlMs = 5_000): ClaimInput => ({ fingerprint, leaseMs, ttlMs });
type Claimer = (store: IdempotencyStore, id: string, claim: ClaimInput) => Promise<ClaimResult>;
const paths: Array<[string, Claimer]> = [
  ['claim', (store, id, claim) => store.claim(id, claim)],
  ['claimMany', async (store, id, claim) => (await store.claimMany!([id], claim))[0]!],
];

async function acquired(store: IdempotencyStore, id: string, claim = input()): Promise<string> {
  const result = await store.claim(id, claim);
  if (result.status !== 'acquired') throw new Error(`expected acquired, got ${result.status}`);
  return result.token;
}

describe.each(makers)('%s store at the boundaries', (_, make) => {
  describe.each(paths)('through %s', (__, claimVia) => {
    it('a lease is live one millisecond before leaseUntil and taken over at it, with the same fingerprint only', async () => {
      const store = make();
      clock.now = T0;
      const first = await acquired(store, 'a');
      clock.now = T0 + 999;
      expect(await claimVia(store, 'a', input())).toMatchObject({ status: 'in_progress', leaseUntil: T0 + 1_000, now: T0 + 999 });
      clock.now = T0 + 1_000;
      expect(await claimVia(store, 'a', input('g'))).toMatchObject({ status: 'in_progress', fingerprint: 'f' });
      const taken = await claimVia(store, 'a', input('f', 2_000));
      expect(taken).toMatchObject({ status: 'acquired', takeover: true, leaseUntil: T0 + 3_000 });
      // The old owner is fenced from every write.
      expect(await store.renew('a', first, 1_000)).toBe(false);
      expect(await store.complete('a', first, 'stale', 1_000)).toBe(false);
      expect(await store.release('a', first)).toBe(false);
    });

    it('a record expires at expiresAt: a claim at that instant starts afresh', async () => {
      const store = make();
      clock.now = T0;
      await acquired(store, 'b', input('f', 1_000, 5_000));
      clock.now = T0 + 4_999;
      expect((await claimVia(store, 'b', input('g'))).status).toBe('in_progress');
      clock.now = T0 + 5_000;
      expect(await claimVia(store, 'b', input('g'))).toMatchObject({ status: 'acquired', takeover: false });
    });

    it('a completed record replays until expiresAt, then runs again', async () => {
      const store = make();
      clock.now = T0;
      const token = await acquired(store, 'c');
      expect(await store.complete('c', token, 'out', 2_000)).toBe(true);
      clock.now = T0 + 1_999;
      expect(await claimVia(store, 'c', input())).toMatchObject({ status: 'completed', record: { outcome: 'out', expiresAt: T0 + 2_000 } });
      clock.now = T0 + 2_000;
      expect(await claimVia(store, 'c', input())).toMatchObject({ status: 'acquired', takeover: false });
    });
  });

  it('renew, complete, release and get see an expired record as absent, from expiresAt on', async () => {
    const store = make();
    clock.now = T0;
    const token = await acquired(store, 'd', input('f', 1_000, 3_000));
    clock.now = T0 + 2_999;
    expect(await store.get('d')).toMatchObject({ state: 'in_progress', expiresAt: T0 + 3_000 });
    clock.now = T0 + 3_000;
    expect(await store.get('d')).toBeNull();
    expect(await store.renew('d', token, 1_000)).toBe(false);
    expect(await store.complete('d', token, 'late', 1_000)).toBe(false);
    expect(await store.release('d', token)).toBe(false);
  });

  it('a renewal sets the lease from now, and stretches the retention when the lease would outlive it', async () => {
    const store = make();
    clock.now = T0;
    const token = await acquired(store, 'e', input('f', 1_000, 1_500));
    clock.now = T0 + 900;
    expect(await store.renew('e', token, 1_000)).toBe(true);
    expect(await store.get('e')).toMatchObject({ leaseUntil: T0 + 1_900, expiresAt: T0 + 1_900 });
    clock.now = T0 + 1_000;
    expect(await store.renew('e', token, 100)).toBe(true);
    expect(await store.get('e')).toMatchObject({ leaseUntil: T0 + 1_100, expiresAt: T0 + 1_900 });
  });

  it('a completion keeps the outcome for ttlMs from the moment it completes', async () => {
    const store = make();
    clock.now = T0;
    const token = await acquired(store, 'f', input('f', 1_000, 60_000));
    clock.now = T0 + 500;
    expect(await store.complete('f', token, 'x', 10_000)).toBe(true);
    expect(await store.get('f')).toMatchObject({ state: 'completed', expiresAt: T0 + 10_500 });
  });

  it('a claim keeps the record at least as long as its lease, whatever ttlMs', async () => {
    const store = make();
    clock.now = T0;
    await acquired(store, 'g', input('f', 4_000, 1_000));
    expect(await store.get('g')).toMatchObject({ leaseUntil: T0 + 4_000, expiresAt: T0 + 4_000 });
  });

  it('delete answers whether a live record existed: an expired one is gone but counts as none', async () => {
    const store = make();
    clock.now = T0;
    await acquired(store, 'h', input('f', 1_000, 2_000));
    await acquired(store, 'i', input('f', 1_000, 2_000));
    expect(await store.delete('h')).toBe(true);
    expect(await store.delete('h')).toBe(false);
    clock.now = T0 + 2_000;
    expect(await store.delete('i')).toBe(false);
    expect(await store.delete('nothing')).toBe(false);
  });

  it('purgeExpired removes the records expired at that instant, up to the limit, and no live one', async () => {
    const store = make();
    clock.now = T0;
    for (const id of ['p1', 'p2', 'p3']) await acquired(store, id, input('f', 1_000, 1_000));
    await acquired(store, 'live', input('f', 1_000, 1_001));
    clock.now = T0 + 1_000;
    expect(await store.purgeExpired(2)).toBe(2);
    expect(await store.purgeExpired(10)).toBe(1);
    expect(await store.purgeExpired(10)).toBe(0);
    expect(await store.get('live')).not.toBeNull();
  });

  it('claimMany of nothing answers nothing', async () => {
    expect(await make().claimMany!([], input())).toEqual([]);
  });
});
