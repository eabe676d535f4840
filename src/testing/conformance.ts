import { strict as assert } from 'node:assert';
import { randomBytes, randomUUID } from 'node:crypto';
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
  /**
   * Business writes for the transactional-mode cases (stores with
   * `transactions`): the suite cannot know your tables. When given, every
   * transaction case also writes one business row through the transaction's
   * client and checks that it commits with the completion and is rolled
   * back with everything else. Without it, only the record's side is checked.
   */
  transactionWrites?: TransactionWrites;
}

/** How the conformance suite writes and reads a business row of yours (see {@link StoreConformanceOptions.transactionWrites}). */
export interface TransactionWrites {
  /** Write one row keyed `key` through `client`, the driver's handle inside the open transaction. */
  write(client: unknown, key: string): Promise<void> | void;
  /** True when the row keyed `key` is committed, read outside any transaction. */
  exists(key: string): Promise<boolean> | boolean;
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
 * Stores with process sessions (`sessions`) are held to the owner and
 * `takeoverFrom` rules, stores with transactional mode (`transactions`) to
 * commit-with-the-completion, fencing and rollback; those cases pass at once
 * for a store without the capability.
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

    // ── Process sessions (stores with `sessions`) ──────────────────────────

    /** A session that was alive once and has ended: its claims may be taken over. */
    const deadSession = async (): Promise<string> => {
      const session = randomUUID();
      await store.sessions!.heartbeat(session, 60_000);
      await store.sessions!.end(session);
      return session;
    };

    it('sessions: a heartbeat keeps a session alive for its TTL; end or expiry ends it', async () => {
      const sessions = store.sessions;
      if (!sessions) return;
      const session = randomUUID();
      assert.equal(await sessions.alive(session), false, 'a session never seen is not alive');
      await sessions.heartbeat(session, 60_000);
      assert.equal(await sessions.alive(session), true);
      await sessions.heartbeat(session, 60_000); // an upsert
      assert.equal(await sessions.alive(session), true);
      await sessions.end(session);
      assert.equal(await sessions.alive(session), false, 'ended');
      await sessions.end(session); // ending twice is harmless
      const brief = randomUUID();
      await sessions.heartbeat(brief, short);
      assert.equal(await sessions.alive(brief), true);
      await sleep(short * 2 + 50);
      assert.equal(await sessions.alive(brief), false, 'expired after its TTL without a heartbeat');
      await sessions.heartbeat(brief, 60_000);
      assert.equal(await sessions.alive(brief), true, 'a heartbeat after a stall makes it alive again');
      await sessions.end(brief);
    });

    it('sessions: a claim stores its owner, and in_progress answers carry it', async () => {
      if (!store.sessions) return;
      const owner = randomUUID();
      const id = newId();
      assert.equal((await store.claim(id, { ...LONG, owner })).status, 'acquired');
      const busy = await store.claim(id, { ...LONG, owner: randomUUID() });
      if (busy.status !== 'in_progress') assert.fail(`expected in_progress, got ${busy.status}`);
      assert.equal(busy.owner, owner);
      const anonymous = newId();
      assert.equal((await store.claim(anonymous, LONG)).status, 'acquired');
      const unowned = await store.claim(anonymous, { ...LONG, owner });
      if (unowned.status !== 'in_progress') assert.fail(`expected in_progress, got ${unowned.status}`);
      assert.equal(unowned.owner, undefined, 'a claim made without an owner answers none');
      if (store.claimMany) {
        const batch = [newId(), newId()];
        const claimed = await store.claimMany(batch, { ...LONG, owner });
        assert.deepEqual(claimed.map((r) => r.status), ['acquired', 'acquired']);
        const again = await store.claimMany(batch, { ...LONG, owner: randomUUID() });
        for (const result of again) {
          if (result.status !== 'in_progress') assert.fail(`expected in_progress, got ${result.status}`);
          assert.equal(result.owner, owner, 'claimMany stores the owner too');
        }
      }
    });

    it("sessions: takeoverFrom takes over a dead owner's live lease at once, and fences the old token", async () => {
      if (!store.sessions) return;
      const dead = await deadSession();
      const heir = randomUUID();
      const id = newId();
      const old = await store.claim(id, { ...LONG, owner: dead });
      if (old.status !== 'acquired') assert.fail('expected acquired');
      const plain = await store.claim(id, { ...LONG, owner: heir });
      assert.equal(plain.status, 'in_progress', 'without takeoverFrom the live lease holds');
      const taken = await store.claim(id, { ...LONG, owner: heir, takeoverFrom: dead });
      if (taken.status !== 'acquired') assert.fail(`expected a takeover, got ${taken.status}`);
      assert.equal(taken.takeover, true);
      assert.notEqual(taken.token, old.token);
      assert.ok(taken.leaseUntil > Date.now() + 10_000, 'the new owner gets a full lease');
      assert.equal(await store.renew(id, old.token, 60_000), false, 'the dead owner cannot renew');
      assert.equal(await store.complete(id, old.token, 'stale', 60_000), false, 'the dead owner cannot complete');
      assert.equal(await store.release(id, old.token), false, 'the dead owner cannot release');
      const now = await store.claim(id, { ...LONG, owner: randomUUID() });
      if (now.status !== 'in_progress') assert.fail(`expected in_progress, got ${now.status}`);
      assert.equal(now.owner, heir, 'the record now belongs to the new owner');
      const again = await store.claim(id, { ...LONG, owner: randomUUID(), takeoverFrom: dead });
      assert.equal(again.status, 'in_progress', 'a second takeover from the same dead owner finds the record moved on');
      assert.equal(await store.complete(id, taken.token, 'fresh', 60_000), true);
    });

    it('sessions: takeoverFrom is refused when the stored owner differs', async () => {
      if (!store.sessions) return;
      const owner = randomUUID();
      await store.sessions.heartbeat(owner, 60_000);
      const someoneElse = await deadSession();
      const id = newId();
      const first = await store.claim(id, { ...LONG, owner });
      if (first.status !== 'acquired') assert.fail('expected acquired');
      const refused = await store.claim(id, { ...LONG, owner: randomUUID(), takeoverFrom: someoneElse });
      if (refused.status !== 'in_progress') assert.fail(`expected in_progress, got ${refused.status}`);
      assert.equal(refused.owner, owner);
      const unowned = newId();
      const plain = await store.claim(unowned, LONG);
      if (plain.status !== 'acquired') assert.fail('expected acquired');
      assert.equal((await store.claim(unowned, { ...LONG, owner: randomUUID(), takeoverFrom: someoneElse })).status, 'in_progress', 'a record without an owner is not taken over either');
      assert.equal(await store.complete(id, first.token, 'mine', 60_000), true, 'the owner keeps its record');
      await store.sessions.end(owner);
    });

    it('sessions: takeoverFrom keeps the fingerprint rule', async () => {
      if (!store.sessions) return;
      const dead = await deadSession();
      const id = newId();
      const old = await store.claim(id, { ...LONG, owner: dead });
      if (old.status !== 'acquired') assert.fail('expected acquired');
      const other = await store.claim(id, { ...LONG, fingerprint: FP2, owner: randomUUID(), takeoverFrom: dead });
      if (other.status !== 'in_progress') assert.fail(`expected in_progress, got ${other.status}`);
      assert.equal(other.fingerprint, FP);
      const same = await store.claim(id, { ...LONG, owner: randomUUID(), takeoverFrom: dead });
      assert.equal(same.status === 'acquired' && same.takeover, true);
    });

    it('sessions: takeoverFrom changes nothing on a completed record, and claims an absent one plainly', async () => {
      if (!store.sessions) return;
      const dead = await deadSession();
      const id = newId();
      const claim = await store.claim(id, { ...LONG, owner: dead });
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.complete(id, claim.token, 'done', 60_000), true);
      const replay = await store.claim(id, { ...LONG, owner: randomUUID(), takeoverFrom: dead });
      if (replay.status !== 'completed') assert.fail(`expected completed, got ${replay.status}`);
      assert.equal(replay.record.outcome, 'done');
      const fresh = await store.claim(newId(), { ...LONG, owner: randomUUID(), takeoverFrom: dead });
      assert.equal(fresh.status === 'acquired' && fresh.takeover, false);
    });

    it('sessions: exactly one winner among concurrent takeovers from a dead owner', async () => {
      if (!store.sessions) return;
      const dead = await deadSession();
      const id = newId();
      assert.equal((await store.claim(id, { ...LONG, owner: dead })).status, 'acquired');
      const results = await Promise.all(
        Array.from({ length: 40 }, (_, i) => clients[i % clients.length]!.claim(id, { ...LONG, owner: randomUUID(), takeoverFrom: dead })),
      );
      const winners = results.filter((r) => r.status === 'acquired');
      assert.equal(winners.length, 1, `${winners.length} winners`);
    });

    // ── Transactional mode (stores with `transactions`) ────────────────────
    // Only `store` is used while a transaction is open: on SQLite another
    // connection's write would wait for the open transaction's write lock
    // with the event loop blocked.

    const writes = options.transactionWrites;
    const businessKey = (): string => `oncely-conformance-${randomBytes(8).toString('hex')}`;
    const exists = async (key: string): Promise<boolean | undefined> => (writes ? await writes.exists(key) : undefined);

    it('transactions: commit stores the outcome together with the business writes', async () => {
      const transactions = store.transactions;
      if (!transactions) return;
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      const key = businessKey();
      const transaction = await transactions.open(id, claim.token);
      assert.ok(transaction.client !== undefined && transaction.client !== null, 'the driver handle is handed out');
      await writes?.write(transaction.client, key);
      assert.equal((await store.get(id))?.state, 'in_progress', 'nothing is completed before the commit');
      assert.equal(await transaction.commit('{"paid":true}', 60_000), true);
      const record = await store.get(id);
      if (record?.state !== 'completed') assert.fail(`expected completed, got ${record?.state}`);
      assert.equal(record.outcome, '{"paid":true}');
      assert.ok(record.expiresAt > Date.now() + 30_000, 'the completion keeps the record for its ttlMs');
      if (writes) assert.equal(await exists(key), true, 'the business write committed with the completion');
      assert.equal(await store.complete(id, claim.token, 'again', 60_000), false, 'the record is final');
    });

    it('transactions: a fenced commit rolls the business writes back and answers false', async () => {
      const transactions = store.transactions;
      if (!transactions) return;
      const id = newId();
      const old = await store.claim(id, SHORT);
      if (old.status !== 'acquired') assert.fail('expected acquired');
      await sleep(short * 2 + 50);
      const taken = await store.claim(id, LONG);
      if (taken.status !== 'acquired') assert.fail('expected takeover');
      const key = businessKey();
      const transaction = await transactions.open(id, old.token);
      await writes?.write(transaction.client, key);
      assert.equal(await transaction.commit('stale', 60_000), false);
      if (writes) assert.equal(await exists(key), false, 'the stale owner leaves no business write behind');
      assert.equal((await store.get(id))?.state, 'in_progress', "the new owner's record is untouched");
      // Released meanwhile: fenced too.
      const released = newId();
      const gone = await store.claim(released, LONG);
      if (gone.status !== 'acquired') assert.fail('expected acquired');
      assert.equal(await store.release(released, gone.token), true);
      const late = await transactions.open(released, gone.token);
      await writes?.write(late.client, businessKey());
      assert.equal(await late.commit('late', 60_000), false);
      assert.equal(await store.get(released), null, 'a fenced commit creates no record');
      assert.equal(await store.complete(id, taken.token, 'fresh', 60_000), true);
    });

    it('transactions: rollback leaves the record in progress and no business writes', async () => {
      const transactions = store.transactions;
      if (!transactions) return;
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') assert.fail('expected acquired');
      const key = businessKey();
      const transaction = await transactions.open(id, claim.token);
      await writes?.write(transaction.client, key);
      await transaction.rollback();
      if (writes) assert.equal(await exists(key), false);
      assert.equal((await store.get(id))?.state, 'in_progress', 'rollback leaves the record to the release that follows');
      assert.equal(await store.release(id, claim.token), true);
      assert.equal(await store.get(id), null);
    });

    it("transactions: the store's own writes for other records are never part of an open transaction", async () => {
      const transactions = store.transactions;
      if (!transactions) return;
      const id = newId();
      const claim = await store.claim(id, LONG);
      const done = newId();
      const toComplete = await store.claim(done, LONG);
      if (claim.status !== 'acquired' || toComplete.status !== 'acquired') assert.fail('expected acquired');
      const transaction = await transactions.open(id, claim.token);
      await writes?.write(transaction.client, businessKey());
      // Started while the transaction is open (a store may hold them until it ends).
      const other = newId();
      const claiming = store.claim(other, LONG);
      const completing = store.complete(done, toComplete.token, 'kept', 60_000);
      await sleep(20);
      await transaction.rollback();
      assert.equal((await claiming).status, 'acquired');
      assert.equal(await completing, true);
      assert.equal((await store.get(other))?.state, 'in_progress', 'a claim made meanwhile survives the rollback');
      assert.equal((await store.get(done))?.state, 'completed', 'a completion made meanwhile survives the rollback');
      assert.equal(await store.release(id, claim.token), true);
    });

    it('transactions: several claims each commit their own transaction', async () => {
      const transactions = store.transactions;
      if (!transactions) return;
      const ids = [newId(), newId(), newId()];
      const keys = ids.map(businessKey);
      const tokens: string[] = [];
      for (const id of ids) {
        const claim = await store.claim(id, LONG);
        if (claim.status !== 'acquired') assert.fail('expected acquired');
        tokens.push(claim.token);
      }
      // Opened together: a store may let them take turns (the second opens once the first ends).
      const opening = ids.map((id, i) => transactions.open(id, tokens[i]!));
      for (const [i, pending] of opening.entries()) {
        const transaction = await pending;
        await writes?.write(transaction.client, keys[i]!);
        if (i === 1) await transaction.rollback();
        else assert.equal(await transaction.commit(`outcome ${i}`, 60_000), true);
      }
      assert.equal((await store.get(ids[0]!))?.state, 'completed');
      assert.equal((await store.get(ids[1]!))?.state, 'in_progress');
      assert.equal((await store.get(ids[2]!))?.state, 'completed');
      if (writes) assert.deepEqual(await Promise.all(keys.map(exists)), [true, false, true]);
    });
  });
}
