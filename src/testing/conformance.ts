import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import type { ClaimInput, IdempotencyStore } from '../engine/store.js';
import { purgeExpiredRecords } from '../stores/purge.js';

/** The test-runner functions the suite registers its cases with (vitest, jest, mocha and node:test all fit). */
export interface ConformanceRunner {
  describe(name: string, body: () => void): unknown;
  it(name: string, body: () => Promise<void>, timeoutMs?: number): unknown;
  beforeAll(body: () => Promise<void> | void, timeoutMs?: number): unknown;
  afterAll(body: () => Promise<void> | void, timeoutMs?: number): unknown;
}

/** Options of {@link defineStoreConformance}. */
export interface StoreConformanceOptions {
  /** Name shown in the test report, e.g. `"postgres"`. */
  name: string;
  /** Make the store under test (called once, before the cases). */
  store: () => IdempotencyStore | Promise<IdempotencyStore>;
  /**
   * Make another store on the same backend through a separate client or
   * connection. When given, the concurrency cases spread their claims over
   * four such stores, so that races cross connections, as between servers.
   */
  anotherClient?: () => IdempotencyStore | Promise<IdempotencyStore>;
  /** Close what `store` and `anotherClient` opened (called once, after the cases). */
  teardown?: () => Promise<void> | void;
  /** Short lease used by expiry cases, in ms. Default 150; raise it for a slow or remote store. */
  shortMs?: number;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const FP = 'v1:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa';
const FP2 = 'v1:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb';
const LONG: ClaimInput = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };

/**
 * Register the store conformance suite: every transition of the record
 * lifecycle, fencing (a stale token can neither renew, complete nor
 * release), lease takeover, TTL expiry, the purge of expired records (never
 * a live one), and 100 concurrent claims of one id with exactly one winner.
 * Run it against the real server, never a mock. Turn the store's own
 * background purge off for the run (`purge: false`): the purge cases count
 * what they delete themselves.
 *
 * @example
 * ```ts
 * import { describe, it, beforeAll, afterAll } from 'vitest';
 * import { defineStoreConformance } from 'oncely/testing';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const store = memoryStore();
 * defineStoreConformance({ describe, it, beforeAll, afterAll }, { name: 'memory', store: () => store });
 * ```
 */
export function defineStoreConformance(runner: ConformanceRunner, options: StoreConformanceOptions): void {
  const { describe, it, beforeAll, afterAll } = runner;
  const short = options.shortMs ?? 150;
  const SHORT: ClaimInput = { fingerprint: FP, leaseMs: short, ttlMs: 60_000 };
  let store: IdempotencyStore;
  const clients: IdempotencyStore[] = [];

  describe(`store conformance: ${options.name}`, () => {
    beforeAll(async () => {
      store = await options.store();
      clients.push(store);
      if (options.anotherClient) {
        for (let i = 0; i < 3; i++) clients.push(await options.anotherClient());
      }
    });
    afterAll(async () => {
      await options.teardown?.();
    });

    it('claims an absent id and hands out a token and a lease', async () => {
      const id = newId();
      const claim = await store.claim(id, LONG);
      assert.equal(claim.status, 'acquired');
      if (claim.status !== 'acquired') return;
      assert.equal(claim.takeover, false);
      assert.equal(typeof claim.token, 'string');
      assert.ok(claim.token.length > 0);
      assert.ok(claim.leaseUntil > Date.now() - 60_000, 'leaseUntil is an epoch-ms deadline');
      const record = await store.get(id);
      assert.equal(record?.state, 'in_progress');
      assert.equal(record?.fingerprint, FP);
    });

    it('answers in_progress to a second claim while the lease is live', async () => {
      const id = newId();
      const first = await store.claim(id, LONG);
      assert.equal(first.status, 'acquired');
      const second = await store.claim(id, LONG);
      assert.equal(second.status, 'in_progress');
      if (second.status !== 'in_progress') return;
      assert.equal(second.fingerprint, FP);
      assert.ok(second.leaseUntil > second.now, 'the lease is live on the store clock');
      const other = await store.claim(id, { ...LONG, fingerprint: FP2 });
      assert.equal(other.status, 'in_progress');
      if (other.status === 'in_progress') assert.equal(other.fingerprint, FP);
    });

    it('completes with the owning token and replays the outcome to later claims', async () => {
      const id = newId();
      const claim = await store.claim(id, LONG);
      assert.equal(claim.status, 'acquired');
      if (claim.status !== 'acquired') return;
      const outcome = '{"status":201}\nbody ✓ ünïcödé \u0000 end';
      assert.equal(await store.complete(id, claim.token, outcome, 60_000), true);
      const again = await store.claim(id, LONG);
      assert.equal(again.status, 'completed');
      if (again.status !== 'completed') return;
      assert.equal(again.record.outcome, outcome);
      assert.equal(again.record.fingerprint, FP);
      assert.ok(again.record.expiresAt > Date.now() + 30_000);
      const mismatch = await store.claim(id, { ...LONG, fingerprint: FP2 });
      assert.equal(mismatch.status, 'completed', 'a completed record is reported whatever the fingerprint');
      if (mismatch.status === 'completed') assert.equal(mismatch.record.fingerprint, FP);
      const record = await store.get(id);
      assert.equal(record?.state, 'completed');
    });

    it('keeps large and empty outcomes intact', async () => {
      for (const outcome of ['', 'x'.repeat(300 * 1024)]) {
        const id = newId();
        const claim = await store.claim(id, LONG);
        if (claim.status !== 'acquired') assert.fail('expected acquired');
        assert.equal(await store.complete(id, claim.token, outcome, 60_000), true);
        const again = await store.claim(id, LONG);
        if (again.status !== 'completed') assert.fail('expected completed');
        assert.equal(again.record.outcome.length, outcome.length);
        assert.equal(again.record.outcome, outcome);
      }
    });

    it('accepts a null fingerprint', async () => {
      const id = newId();
      const input: ClaimInput = { fingerprint: null, leaseMs: 30_000, ttlMs: 60_000 };
      const claim = await store.claim(id, input);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      const busy = await store.claim(id, input);
      assert.equal(busy.status, 'in_progress');
      if (busy.status === 'in_progress') assert.equal(busy.fingerprint, null);
      assert.equal(await store.complete(id, claim.token, 'done', 60_000), true);
      const done = await store.claim(id, input);
      if (done.status !== 'completed') assert.fail('expected completed');
      assert.equal(done.record.fingerprint, null);
    });

    it('releases with the owning token, so that the next claim runs again', async () => {
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.release(id, claim.token), true);
      assert.equal(await store.get(id), null);
      const again = await store.claim(id, LONG);
      if (again.status !== 'acquired') assert.fail('expected acquired after release');
      assert.equal(again.takeover, false);
      assert.notEqual(again.token, claim.token, 'a new claim gets a new token');
      assert.equal(await store.complete(id, claim.token, 'stale', 60_000), false, 'the released token is dead');
    });

    it('fences a wrong token: renew, complete and release change nothing', async () => {
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      const wrong = `${claim.token}x`;
      assert.equal(await store.renew(id, wrong, 60_000), false);
      assert.equal(await store.complete(id, wrong, 'forged', 60_000), false);
      assert.equal(await store.release(id, wrong), false);
      const record = await store.get(id);
      assert.equal(record?.state, 'in_progress');
      assert.equal(await store.complete(id, claim.token, 'real', 60_000), true);
      const done = await store.claim(id, LONG);
      if (done.status !== 'completed') assert.fail('expected completed');
      assert.equal(done.record.outcome, 'real');
    });

    it('answers false to every token operation on an absent id', async () => {
      const id = newId();
      assert.equal(await store.renew(id, 'nope', 1000), false);
      assert.equal(await store.complete(id, 'nope', 'x', 1000), false);
      assert.equal(await store.release(id, 'nope'), false);
      assert.equal(await store.get(id), null, 'a failed complete does not create a record');
    });

    it('treats a completed record as final: no second complete, release or renew', async () => {
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.complete(id, claim.token, 'first', 60_000), true);
      assert.equal(await store.complete(id, claim.token, 'second', 60_000), false);
      assert.equal(await store.release(id, claim.token), false);
      assert.equal(await store.renew(id, claim.token, 60_000), false);
      const done = await store.claim(id, LONG);
      if (done.status !== 'completed') assert.fail('expected completed');
      assert.equal(done.record.outcome, 'first');
    });

    it('renews the lease of the owner, which keeps a duplicate out past the first lease', async () => {
      const id = newId();
      const claim = await store.claim(id, SHORT);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      for (let i = 0; i < 4; i++) {
        await sleep(short / 2);
        assert.equal(await store.renew(id, claim.token, short * 2), true);
      }
      const busy = await store.claim(id, SHORT);
      assert.equal(busy.status, 'in_progress', 'renewed lease still holds after twice the first lease');
      if (busy.status === 'in_progress') assert.ok(busy.leaseUntil > busy.now);
    });

    it('keeps a record alive past its first retention while its lease is renewed', async () => {
      const id = newId();
      const claim = await store.claim(id, { fingerprint: FP, leaseMs: short, ttlMs: short });
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      for (let i = 0; i < 5; i++) {
        await sleep(short / 2);
        assert.equal(await store.renew(id, claim.token, short), true, `renewal ${i} keeps the record`);
      }
      assert.equal((await store.get(id))?.state, 'in_progress', 'a long run does not lose its record');
      assert.equal(await store.complete(id, claim.token, 'long run', 60_000), true);
    });

    it('lets another worker take over an expired lease and fences the old owner', async () => {
      const id = newId();
      const old = await store.claim(id, SHORT);
      if (old.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      const taken = await store.claim(id, SHORT);
      if (taken.status !== 'acquired') assert.fail(`expected takeover, got ${taken.status}`);
      assert.equal(taken.takeover, true);
      assert.notEqual(taken.token, old.token);
      assert.equal(await store.renew(id, old.token, 60_000), false, 'stale owner cannot renew');
      assert.equal(await store.complete(id, old.token, 'stale', 60_000), false, 'stale owner cannot complete');
      assert.equal(await store.release(id, old.token), false, 'stale owner cannot release');
      assert.equal((await store.get(id))?.state, 'in_progress', "the new owner's record survives");
      assert.equal(await store.complete(id, taken.token, 'fresh', 60_000), true);
      assert.equal(await store.complete(id, old.token, 'stale', 60_000), false);
      const done = await store.claim(id, LONG);
      if (done.status !== 'completed') assert.fail('expected completed');
      assert.equal(done.record.outcome, 'fresh');
    });

    it('does not let an expired lease be taken over by a different fingerprint', async () => {
      const id = newId();
      const old = await store.claim(id, SHORT);
      if (old.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      const other = await store.claim(id, { ...SHORT, fingerprint: FP2 });
      assert.equal(other.status, 'in_progress');
      if (other.status === 'in_progress') {
        assert.equal(other.fingerprint, FP);
        assert.ok(other.leaseUntil <= other.now, 'reports the expired lease');
      }
    });

    it('forgets a completed record after its TTL, so the id runs again', async () => {
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.complete(id, claim.token, 'short-lived', short), true);
      await sleep(short * 2 + 50);
      assert.equal(await store.get(id), null, 'expired record is absent to get');
      const again = await store.claim(id, LONG);
      if (again.status !== 'acquired') assert.fail(`expected acquired after TTL, got ${again.status}`);
      assert.equal(again.takeover, false);
    });

    it('forgets an abandoned in-progress record after its TTL', async () => {
      const id = newId();
      const claim = await store.claim(id, { fingerprint: FP, leaseMs: short, ttlMs: short });
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      assert.equal(await store.get(id), null);
      const other = await store.claim(id, { ...LONG, fingerprint: FP2 });
      assert.equal(other.status, 'acquired', 'an expired record does not bind its fingerprint');
    });

    it('deletes any record on demand', async () => {
      const id = newId();
      assert.equal(await store.delete(id), false);
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.delete(id), true);
      assert.equal(await store.get(id), null);
      assert.equal(await store.complete(id, claim.token, 'late', 60_000), false);
    });

    it('purges expired records in batches and keeps live ones', async () => {
      const ids = Array.from({ length: 7 }, newId);
      for (const id of ids) {
        const claim = await store.claim(id, LONG);
        if (claim.status !== 'acquired') assert.fail('expected acquired');
        assert.equal(await store.complete(id, claim.token, 'x', short), true);
      }
      const keep = newId();
      const kept = await store.claim(keep, LONG);
      assert.equal(kept.status, 'acquired');
      await sleep(short * 2 + 50);
      let purged = 0;
      for (let round = 0; round < 100; round++) {
        const n = await store.purgeExpired(3);
        assert.ok(n <= 3, 'a batch never exceeds its limit');
        purged += n;
        if (n === 0) break;
      }
      if (!store.capabilities.nativeTtl) assert.ok(purged >= ids.length, `purged ${purged} of ${ids.length}`);
      for (const id of ids) assert.equal(await store.get(id), null);
      assert.equal((await store.get(keep))?.state, 'in_progress');
    });

    it('drains every expired record with purgeExpiredRecords, and keeps live ones (in progress past their lease too)', async () => {
      const expired = Array.from({ length: 25 }, newId);
      for (const id of expired) {
        const claim = await store.claim(id, LONG);
        if (claim.status !== 'acquired') assert.fail('expected acquired');
        assert.equal(await store.complete(id, claim.token, 'x', short), true);
      }
      const done = newId();
      const claimed = await store.claim(done, LONG);
      if (claimed.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.complete(done, claimed.token, 'kept', 60_000), true);
      // Its lease ends with the others' retention, but the record is retained for a minute.
      const stalled = newId();
      assert.equal((await store.claim(stalled, SHORT)).status, 'acquired');
      await sleep(short * 2 + 50);
      const report = await purgeExpiredRecords(store, { batch: 4 });
      assert.equal(report.done, true);
      if (!store.capabilities.nativeTtl) {
        assert.ok(report.deleted >= expired.length, `deleted ${report.deleted} of ${expired.length}`);
        assert.ok(report.batches >= Math.ceil(expired.length / 4), `${report.batches} batches`);
      }
      for (const id of expired) assert.equal(await store.get(id), null);
      assert.equal((await store.get(done))?.state, 'completed');
      assert.equal((await store.get(stalled))?.state, 'in_progress');
      const takeover = await store.claim(stalled, SHORT);
      assert.equal(takeover.status === 'acquired' && takeover.takeover, true, 'the stalled record is still there to take over');
    });

    it('keeps different ids independent', async () => {
      const a = newId();
      const b = newId();
      const ca = await store.claim(a, LONG);
      const cb = await store.claim(b, LONG);
      assert.equal(ca.status, 'acquired');
      assert.equal(cb.status, 'acquired');
      if (ca.status !== 'acquired' || cb.status !== 'acquired') return;
      assert.equal(await store.complete(b, ca.token, 'cross', 60_000), false, "a's token does not own b");
      assert.equal(await store.complete(a, ca.token, 'a', 60_000), true);
      assert.equal((await store.get(b))?.state, 'in_progress');
    });

    it('gives exactly one winner among 100 concurrent claims of one id', async () => {
      for (let round = 0; round < 3; round++) {
        const id = newId();
        const results = await Promise.all(
          Array.from({ length: 100 }, (_, i) => clients[i % clients.length]!.claim(id, LONG)),
        );
        const winners = results.filter((r) => r.status === 'acquired');
        assert.equal(winners.length, 1, `round ${round}: ${winners.length} winners`);
        assert.equal(results.filter((r) => r.status === 'in_progress').length, 99);
      }
    });

    it('gives exactly one winner among 100 concurrent takeovers of an expired lease', async () => {
      const id = newId();
      const old = await store.claim(id, SHORT);
      if (old.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      const results = await Promise.all(
        Array.from({ length: 100 }, (_, i) => clients[i % clients.length]!.claim(id, LONG)),
      );
      const winners = results.filter((r) => r.status === 'acquired');
      assert.equal(winners.length, 1, `${winners.length} winners`);
      assert.equal(winners[0]?.status === 'acquired' && winners[0].takeover, true);
    });

    it('gives exactly one completion among concurrent completes racing a takeover', async () => {
      const id = newId();
      const old = await store.claim(id, SHORT);
      if (old.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      const [taken, staleWrite] = await Promise.all([
        store.claim(id, LONG),
        clients[clients.length - 1]!.complete(id, old.token, 'stale', 60_000),
      ]);
      // Either the stale owner completed before the takeover (then the claim
      // sees a completed record) or the takeover won (then the stale write failed).
      if (taken.status === 'acquired') {
        assert.equal(staleWrite, false);
        assert.equal(await store.complete(id, taken.token, 'fresh', 60_000), true);
      } else {
        assert.equal(taken.status, 'completed');
        assert.equal(staleWrite, true);
      }
    });

    it('claims many ids in one call, answering in order', async () => {
      if (!store.claimMany) return;
      const done = newId();
      const busy = newId();
      const fresh = newId();
      const d = await store.claim(done, LONG);
      if (d.status !== 'acquired') assert.fail('expected acquired');
      await store.complete(done, d.token, 'done', 60_000);
      await store.claim(busy, LONG);
      const results = await store.claimMany([fresh, done, busy], LONG);
      assert.deepEqual(
        results.map((r) => r.status),
        ['acquired', 'completed', 'in_progress'],
      );
      assert.deepEqual(await store.claimMany([], LONG), []);
    });

    it('takes over expired leases inside a batch, and fences the old owners', async () => {
      if (!store.claimMany) return;
      const stale = newId();
      const fresh = newId();
      const old = await store.claim(stale, SHORT);
      if (old.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      const results = await store.claimMany([stale, fresh], SHORT);
      const [taken, made] = results;
      if (taken?.status !== 'acquired' || made?.status !== 'acquired') assert.fail('expected both acquired');
      assert.equal(taken.takeover, true);
      assert.equal(made.takeover, false);
      assert.equal(await store.complete(stale, old.token, 'stale', 60_000), false);
      assert.equal(await store.complete(stale, taken.token, 'fresh', 60_000), true);
    });
  });
}
