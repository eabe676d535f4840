/** sqliteTransaction: a transaction of the user's own that takes turns with transactional mode and the store's writes. */
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import { RolledBackError } from '../errors/index.js';
import { type SqliteStore, sqliteStore, sqliteTransaction } from './sqlite.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const LONG = { fingerprint: null, leaseMs: 30_000, ttlMs: 60_000 };

let db: Database.Database;
let store: SqliteStore;
afterEach(async () => {
  await store.close();
  db.close();
});
function setup(): void {
  db = new Database(':memory:');
  db.exec('CREATE TABLE entries (id TEXT NOT NULL)');
  store = sqliteStore({ database: db, purge: false });
}
const entries = () => (db.prepare('SELECT count(*) AS n FROM entries').get() as { n: number }).n;

describe('sqliteTransaction', () => {
  it('commits what fn wrote, and a store write asked for meanwhile waits for the commit instead of joining the transaction', async () => {
    setup();
    let claimed: Promise<unknown> | undefined;
    const order: string[] = [];
    const done = sqliteTransaction(db, async (database) => {
      database.prepare('INSERT INTO entries (id) VALUES (?)').run('a');
      claimed = store.claim('r1', LONG).then((r) => order.push(`claim:${r.status}`));
      await sleep(30);
      order.push(`inside:${database.inTransaction}`);
      return 'ok';
    });
    expect(await done).toBe('ok');
    await claimed;
    expect(order).toEqual(['inside:true', 'claim:acquired']);
    expect(entries()).toBe(1);
    expect(db.inTransaction).toBe(false);
  });

  it('rolls back on a throw, and a store write asked for meanwhile still lands (it never joined)', async () => {
    setup();
    let claimed: Promise<unknown> | undefined;
    await expect(
      sqliteTransaction(db, async (database) => {
        database.prepare('INSERT INTO entries (id) VALUES (?)').run('a');
        claimed = store.claim('r2', LONG);
        await sleep(10);
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    await claimed;
    expect(entries()).toBe(0);
    expect((await store.get('r2'))?.state).toBe('in_progress');
  });

  it("takes turns with transactional mode's transactions on the same Database", async () => {
    setup();
    const acquired = await store.claim('r3', LONG);
    if (acquired.status !== 'acquired') throw new Error('expected acquired');
    const tx = await store.transactions.open('r3', acquired.token);
    tx.client.prepare('INSERT INTO entries (id) VALUES (?)').run('from-operation');
    let mineStarted = false;
    const mine = sqliteTransaction(db, (database) => {
      mineStarted = true;
      database.prepare('INSERT INTO entries (id) VALUES (?)').run('mine');
    });
    await sleep(30);
    expect(mineStarted).toBe(false);
    await tx.rollback();
    await mine;
    expect(mineStarted).toBe(true);
    expect(db.prepare('SELECT id FROM entries').all()).toEqual([{ id: 'mine' }]);
  });

  it('refuses to commit when the transaction ended inside fn, and a bad timeout, with clear errors', async () => {
    setup();
    await expect(
      sqliteTransaction(db, (database) => {
        database.exec('ROLLBACK');
        database.prepare('INSERT INTO entries (id) VALUES (?)').run('outside');
      }),
    ).rejects.toBeInstanceOf(RolledBackError);
    await expect(sqliteTransaction(db, () => 1, { busyTimeoutMs: -1 })).rejects.toThrow(/busyTimeoutMs/);
    // The gate is free again: the store can write.
    expect((await store.claim('r4', LONG)).status).toBe('acquired');
  });
});
