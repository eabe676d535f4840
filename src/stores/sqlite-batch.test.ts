/**
 * Group commit in the SQLite store: the writes asked for in one turn of the
 * event loop commit together in one BEGIN IMMEDIATE transaction, each with
 * its own answer and fencing, in the order asked.
 */
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../engine/engine.js';
import type { ClaimResult } from '../engine/store.js';
import { StoreUnavailableError } from '../errors/index.js';
import { type SqliteDatabase, type SqliteStatement, type SqliteStore, sqliteStore, sqliteTransaction } from './sqlite.js';
import { holdWriteLock } from '../../test/support/sqlite-lock.js';

const dir = mkdtempSync(join(tmpdir(), 'oncely-sqlite-batch-'));
const children: ChildProcess[] = [];
const opened: Database.Database[] = [];
const stores: SqliteStore[] = [];
afterAll(async () => {
  for (const child of children) child.kill('SIGKILL');
  for (const store of stores) await store.close();
  for (const db of opened) if (db.open) db.close();
  rmSync(dir, { recursive: true, force: true });
});

const LONG = { fingerprint: 'fp', leaseMs: 30_000, ttlMs: 60_000 };
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const newId = (): string => randomBytes(16).toString('hex');

/**
 * A Database seen through a wrapper that counts the commits made through
 * statements the store prepared: its COMMITs (batches and transactional
 * mode's alike) and its writes run outside any transaction (autocommit).
 */
function counted(path: string): { raw: Database.Database; db: SqliteDatabase; counts: { commit: number } } {
  const raw = new Database(path);
  opened.push(raw);
  const counts = { commit: 0 };
  const db = new Proxy(raw, {
    get(target, property) {
      if (property === 'prepare') {
        return (source: string): SqliteStatement => {
          const statement = target.prepare(source);
          const commits = (): boolean => source === 'COMMIT' || (!statement.reader && !target.inTransaction && !source.startsWith('BEGIN'));
          return {
            run: (...params: unknown[]) => {
              if (commits()) counts.commit++;
              return statement.run(...params);
            },
            get: (...params: unknown[]) => {
              if (commits()) counts.commit++;
              return statement.get(...params);
            },
          };
        };
      }
      const value: unknown = Reflect.get(target, property);
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  }) as unknown as SqliteDatabase;
  return { raw, db, counts };
}

function storeOn(db: SqliteDatabase, options: Partial<Parameters<typeof sqliteStore>[0]> = {}): SqliteStore {
  const store = sqliteStore({ database: db, purge: false, ...options });
  stores.push(store);
  return store;
}

async function acquire(store: SqliteStore, id: string): Promise<string> {
  const claim = await store.claim(id, LONG);
  if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
  return claim.token;
}

describe('SQLite group commit: one transaction per turn of the event loop', () => {
  it('commits the claims, renewals, completions and releases of one turn together, each with its own answer and fencing', async () => {
    const { db, counts } = counted(join(dir, 'turn.db'));
    const store = storeOn(db);
    const [a, b, c] = [newId(), newId(), newId()];
    const [ta, tb, tc] = await Promise.all([acquire(store, a), acquire(store, b), acquire(store, c)]);
    expect(counts.commit, 'three claims asked in one turn: one commit').toBe(1);

    const same = newId();
    const before = counts.commit;
    const [claims, renewA, completeA, fencedB, releaseB, fencedC, fresh] = await Promise.all([
      Promise.all(Array.from({ length: 20 }, () => store.claim(same, LONG))),
      store.renew(a, ta, 30_000),
      store.complete(a, ta, 'done-a', 60_000),
      store.complete(b, 'not-the-token', 'stolen', 60_000),
      store.release(b, tb),
      store.renew(c, `${tc}-stale`, 30_000),
      store.claim(newId(), LONG),
    ]);
    expect(counts.commit - before, 'everything asked in one turn: one commit').toBe(1);
    expect(claims.filter((r) => r.status === 'acquired')).toHaveLength(1);
    expect(claims[0]!.status, 'the first asked wins').toBe('acquired');
    expect(claims.slice(1).every((r) => r.status === 'in_progress')).toBe(true);
    expect([renewA, completeA, fencedB, releaseB, fencedC, fresh.status]).toEqual([true, true, false, true, false, 'acquired']);
    expect(await store.get(a)).toMatchObject({ state: 'completed', outcome: 'done-a' });
    expect(await store.get(b)).toBeNull();
    expect(await store.get(c)).toMatchObject({ state: 'in_progress' });
  });

  it('runs a completion and a renewal of the same record in the order asked, and a read asked after a write sees it', async () => {
    const { db } = counted(join(dir, 'order.db'));
    const store = storeOn(db);
    const [x, y, z] = [newId(), newId(), newId()];
    const [tx, ty, tz] = await Promise.all([acquire(store, x), acquire(store, y), acquire(store, z)]);
    // Renewal first: both land. Completion first: the renewal is fenced (the record is final).
    const renewedThenCompleted = Promise.all([store.renew(x, tx, 30_000), store.complete(x, tx, 'x', 60_000)]);
    const completedThenRenewed = Promise.all([store.complete(y, ty, 'y', 60_000), store.renew(y, ty, 30_000)]);
    // Read your writes: asked after a write of the same record in the same turn, a read waits for it.
    const seen = store.get(y);
    const released = store.release(z, tz);
    const reclaimed = store.claim(z, LONG);
    expect(await renewedThenCompleted).toEqual([true, true]);
    expect(await completedThenRenewed).toEqual([true, false]);
    expect(await seen).toMatchObject({ state: 'completed', outcome: 'y' });
    expect(await released).toBe(true);
    expect(await reclaimed, 'a claim asked after a release in the same turn is decided after it').toMatchObject({
      status: 'acquired',
      takeover: false,
    });
    expect(await store.claim(x, LONG)).toMatchObject({ status: 'completed', record: { outcome: 'x' } });
  });

  it('answers a statement error to its own operation only; the others of the batch land', async () => {
    const { raw, db, counts } = counted(join(dir, 'errors.db'));
    const store = storeOn(db);
    raw.exec(`CREATE TRIGGER refuse BEFORE INSERT ON oncely_records WHEN NEW.id LIKE 'abort-%' BEGIN SELECT RAISE(ABORT, 'refused'); END`);
    const done = newId();
    const token = await acquire(store, done);
    const before = counts.commit;
    const results = await Promise.allSettled([
      store.claim('first', LONG),
      store.claim('abort-1', LONG),
      store.claimMany!(['many-1', 'abort-2', 'many-2'], LONG),
      store.complete(done, token, 'kept', 60_000),
      store.claim('last', LONG),
    ]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'rejected', 'fulfilled', 'fulfilled']);
    expect((results[1] as PromiseRejectedResult).reason).toMatchObject({ message: 'refused' });
    expect(counts.commit - before, 'one commit for the batch, failures and all').toBe(1);
    expect(await store.get('first')).toMatchObject({ state: 'in_progress' });
    expect(await store.get('last')).toMatchObject({ state: 'in_progress' });
    expect(await store.get(done)).toMatchObject({ state: 'completed', outcome: 'kept' });
    // claimMany is all or nothing, even inside a batch.
    expect(await store.get('many-1')).toBeNull();
    expect(await store.get('many-2')).toBeNull();
  });

  it('runs again the operations of a batch that an error rolled back altogether (RAISE(ROLLBACK)); only the failing one fails', async () => {
    const { raw, db } = counted(join(dir, 'rollback.db'));
    const store = storeOn(db);
    raw.exec(`CREATE TRIGGER refuse BEFORE INSERT ON oncely_records WHEN NEW.id LIKE 'rollback-%' BEGIN SELECT RAISE(ROLLBACK, 'rolled back'); END`);
    const done = newId();
    const token = await acquire(store, done);
    const results = await Promise.allSettled([
      store.claim('before', LONG),
      store.complete(done, token, 'kept', 60_000),
      store.claim('rollback-1', LONG),
      store.claim('after', LONG),
    ]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'rejected', 'fulfilled']);
    expect((results[0] as PromiseFulfilledResult<ClaimResult>).value.status).toBe('acquired');
    expect((results[1] as PromiseFulfilledResult<boolean>).value).toBe(true);
    const landed = (results[0] as PromiseFulfilledResult<ClaimResult>).value;
    if (landed.status !== 'acquired') throw new Error('expected acquired');
    // The token answered is the one stored (the claim ran again, after the rollback).
    expect(await store.complete('before', landed.token, 'ok', 60_000)).toBe(true);
    expect(await store.get(done)).toMatchObject({ state: 'completed', outcome: 'kept' });
    expect(await store.get('after')).toMatchObject({ state: 'in_progress' });
    expect(raw.inTransaction).toBe(false);
  });

  it("waits out another process's write lock as one batch, without blocking the loop; operations asked meanwhile join it", async () => {
    const file = join(dir, 'busy.db');
    const { db, counts } = counted(file);
    const store = storeOn(db, { busyTimeoutMs: 5_000 });
    const held = newId();
    const token = await acquire(store, held);
    await holdWriteLock(file, 400, children);
    const before = counts.commit;
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    const started = Date.now();
    const first = Promise.all([store.claim(newId(), LONG), store.claim(newId(), LONG), store.renew(held, token, 30_000)]);
    await sleep(100);
    const later = Promise.all([store.claim(newId(), LONG), store.complete(held, token, 'after the lock', 60_000)]);
    const [[c1, c2, renewed], [c3, completed]] = await Promise.all([first, later]);
    clearInterval(timer);
    const ms = Date.now() - started;
    expect([c1.status, c2.status, renewed, c3.status, completed]).toEqual(['acquired', 'acquired', true, 'acquired', true]);
    expect(ms).toBeGreaterThanOrEqual(250);
    expect(ticks, 'the event loop kept turning').toBeGreaterThan(ms / 10 / 3);
    expect(counts.commit - before, 'the operations that waited commit together').toBe(1);
  });

  it('keeps each operation to its own busyTimeoutMs, counted from when it was asked', async () => {
    const { db } = counted(join(dir, 'deadlines.db'));
    const store = storeOn(db, { busyTimeoutMs: 200 });
    const id = newId();
    const token = await acquire(store, id);
    const transaction = await store.transactions.open(id, token);
    const started = Date.now();
    const settledAt = (pending: Promise<unknown>): Promise<number> =>
      pending.then(
        () => -1,
        (error: unknown) => {
          expect(error).toBeInstanceOf(StoreUnavailableError);
          return Date.now() - started;
        },
      );
    const early = settledAt(store.claim(newId(), LONG));
    await sleep(100);
    const late = settledAt(store.renew(id, token, 30_000));
    const [earlyMs, lateMs] = await Promise.all([early, late]);
    expect(earlyMs).toBeGreaterThanOrEqual(190);
    expect(earlyMs).toBeLessThan(290);
    expect(lateMs).toBeGreaterThanOrEqual(290);
    await transaction.rollback();
    expect(await store.renew(id, token, 30_000)).toBe(true);
  });
});

describe('SQLite group commit: a closed Database', () => {
  it('rejects the queued operations at once, with the driver\'s error, instead of waiting busyTimeoutMs', async () => {
    const { raw, db } = counted(join(dir, 'closed.db'));
    const store = storeOn(db, { busyTimeoutMs: 5_000 });
    const [id, token] = [newId(), 'a-token'];
    // Closed before the store's first batch.
    raw.close();
    const started = Date.now();
    const results = await Promise.allSettled([store.renew(id, token, 30_000), store.complete(id, token, 'x', 60_000)]);
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(String((results[0] as PromiseRejectedResult).reason)).toMatch(/not open/);
    expect(Date.now() - started).toBeLessThan(1_000);
  });
});

describe('SQLite group commit and transactions', () => {
  it('holds a batch while a transaction of transactional mode is open, then commits it once, outside the transaction', async () => {
    const { raw, db, counts } = counted(join(dir, 'gate.db'));
    raw.exec('CREATE TABLE payments (id TEXT NOT NULL)');
    const store = storeOn(db);
    const [owner, other] = [newId(), newId()];
    const [tOwner, tOther] = await Promise.all([acquire(store, owner), acquire(store, other)]);
    const transaction = await store.transactions.open(owner, tOwner);
    raw.prepare('INSERT INTO payments (id) VALUES (?)').run(owner);
    const settled: string[] = [];
    const writes = Promise.all([
      store.claim(newId(), LONG).then((r) => settled.push(`claim:${r.status}`)),
      store.renew(other, tOther, 30_000).then((r) => settled.push(`renew:${r}`)),
      store.complete(other, tOther, 'other', 60_000).then((r) => settled.push(`complete:${r}`)),
    ]);
    await sleep(50);
    expect(settled, 'nothing ran inside the open transaction').toEqual([]);
    const before = counts.commit;
    await transaction.rollback();
    await writes;
    expect(settled.sort()).toEqual(['claim:acquired', 'complete:true', 'renew:true']);
    expect(counts.commit - before, 'the held writes commit together, after the rollback').toBe(1);
    expect(await store.get(other)).toMatchObject({ state: 'completed', outcome: 'other' });
    expect((raw.prepare('SELECT count(*) AS n FROM payments').get() as { n: number }).n).toBe(0);
  });

  it('opens a transaction after the writes asked before it in the same turn: they commit first, and waiting for them inside it does not deadlock', async () => {
    const { raw, db } = counted(join(dir, 'barrier.db'));
    raw.exec('CREATE TABLE payments (id TEXT NOT NULL)');
    const store = storeOn(db, { busyTimeoutMs: 2_000 });
    const [mine, queued] = [newId(), newId()];
    const token = await acquire(store, mine);
    const claiming = store.claim(queued, LONG);
    const opening = store.transactions.open(mine, token);
    const transaction = await opening;
    // The claim asked before the transaction answers while it is open: it never waits for it.
    const started = Date.now();
    expect((await claiming).status).toBe('acquired');
    expect(Date.now() - started).toBeLessThan(500);
    raw.prepare('INSERT INTO payments (id) VALUES (?)').run(mine);
    await transaction.rollback();
    expect(await store.get(queued), 'the claim committed on its own, not with the rolled-back transaction').toMatchObject({
      state: 'in_progress',
    });
  });

  it('sqliteTransaction takes its turn after the writes asked before it, and the ones asked inside it wait for its commit', async () => {
    const { raw, db } = counted(join(dir, 'user-transaction.db'));
    raw.exec('CREATE TABLE entries (id TEXT NOT NULL)');
    const store = storeOn(db);
    const id = newId();
    const token = await acquire(store, id);
    const completing = store.complete(id, token, 'done', 60_000);
    let inside: Promise<ClaimResult> | undefined;
    const seen = await sqliteTransaction(db, async (database) => {
      // The completion asked before the transaction has landed by now.
      const state = (database.prepare('SELECT state FROM oncely_records WHERE id = ?').get(id) as { state: number }).state;
      database.prepare('INSERT INTO entries (id) VALUES (?)').run('a');
      inside = store.claim(newId(), LONG);
      await sleep(20);
      return state;
    });
    expect(seen).toBe(1);
    expect(await completing).toBe(true);
    expect((await inside!).status).toBe('acquired');
  });

  it('engine: many begins of the same key in one turn run the operation once', async () => {
    const { db } = counted(join(dir, 'engine.db'));
    const engine = new Engine({ store: storeOn(db), sessions: false });
    const id = newId();
    const begun = await Promise.all(Array.from({ length: 25 }, () => engine.begin({ id, fingerprint: null })));
    expect(begun.filter((b) => b.kind === 'run')).toHaveLength(1);
    expect(begun.filter((b) => b.kind === 'in_flight')).toHaveLength(24);
    await engine.close();
  });
});
