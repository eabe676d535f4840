/** oncely/consumer/inbox on the real PostgreSQL (127.0.0.1:5432, db `test`) and on SQLite files, with SIGKILLed children. */
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { postgresInbox, sqliteInbox } from 'oncely/consumer/inbox';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sleep, spawnNode, suffix } from './helpers.js';

const childScript = fileURLToPath(new URL('./inbox-child.ts', import.meta.url));

describe('postgres inbox (real PostgreSQL)', () => {
  let pool: pg.Pool;
  const s = suffix();
  const table = `oncely_inbox_test_${s}`;
  const effects = `oncely_inbox_effects_${s}`;
  const uniques = `oncely_inbox_uniques_${s}`;

  beforeAll(async () => {
    pool = new pg.Pool({ host: '127.0.0.1', user: 'postgres', database: 'test', max: 8 });
    await pool.query(`CREATE TABLE ${effects} (message_id text NOT NULL)`);
    await pool.query(`CREATE TABLE ${uniques} (id text PRIMARY KEY)`);
  });
  afterAll(async () => {
    await pool.query(`DROP TABLE IF EXISTS ${table}; DROP TABLE IF EXISTS ${effects}; DROP TABLE IF EXISTS ${uniques}`);
    await pool.end();
  });

  const count = async (id: string) =>
    Number((await pool.query(`SELECT count(*) AS n FROM ${effects} WHERE message_id = $1`, [id])).rows[0].n);
  const inboxRows = async (id: string) =>
    Number((await pool.query(`SELECT count(*) AS n FROM ${table} WHERE message_id = $1`, [id])).rows[0].n);

  it('applies a message delivered three times (sequentially and concurrently) once', async () => {
    const inbox = postgresInbox({ pool, consumer: 'ledger', table });
    await inbox.migrate();
    const apply = (id: string) =>
      inbox.handle(id, async (client) => {
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, [id]);
        await sleep(50); // hold the transaction open so that the copies overlap
        return 'ok';
      });
    const seq = [await apply('seq'), await apply('seq'), await apply('seq')];
    expect(seq.map((r) => r.status)).toEqual(['processed', 'duplicate', 'duplicate']);
    expect(seq[0]).toEqual({ status: 'processed', result: 'ok' });
    const con = await Promise.all([apply('con'), apply('con'), apply('con')]);
    expect(con.filter((r) => r.status === 'processed')).toHaveLength(1);
    expect(await count('seq')).toBe(1);
    expect(await count('con')).toBe(1);
    // Another consumer name is another inbox.
    const other = postgresInbox({ pool, consumer: 'audit', table });
    expect((await other.handle('seq', () => 1)).status).toBe('processed');
  });

  it('rolls back the id with the handler\'s writes when the handler throws', async () => {
    const inbox = postgresInbox({ pool, consumer: 'ledger', table });
    await expect(
      inbox.handle('fails', async (client) => {
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['fails']);
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await count('fails')).toBe(0);
    expect(await inboxRows('fails')).toBe(0);
    expect((await inbox.handle('fails', () => 'second')).status).toBe('processed');
  });

  it('rejects when a caught failed statement left the transaction aborted (COMMIT rolls back); the redelivery runs again', async () => {
    const inbox = postgresInbox({ pool, consumer: 'ledger', table });
    await inbox.migrate();
    await pool.query(`INSERT INTO ${uniques} (id) VALUES ('taken')`);
    let runs = 0;
    // The common "ignore a unique violation" pattern: in PostgreSQL the failed INSERT aborts the
    // whole transaction, and COMMIT then answers ROLLBACK instead of failing.
    const swallowing = inbox.handle('swallowed', async (client) => {
      runs++;
      await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['swallowed']);
      try {
        await client.query(`INSERT INTO ${uniques} (id) VALUES ('taken')`);
      } catch (error) {
        if ((error as { code?: string }).code !== '23505') throw error;
      }
      return 'applied';
    });
    await expect(swallowing).rejects.toThrow(/rolled back/);
    expect(await inboxRows('swallowed')).toBe(0);
    expect(await count('swallowed')).toBe(0);
    const redelivered = await inbox.handle('swallowed', async (client) => {
      runs++;
      await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['swallowed']);
      await client.query(`INSERT INTO ${uniques} (id) VALUES ('taken') ON CONFLICT DO NOTHING`);
      return 'applied';
    });
    expect(redelivered).toEqual({ status: 'processed', result: 'applied' });
    expect(runs).toBe(2);
    expect(await count('swallowed')).toBe(1);
    expect(await inboxRows('swallowed')).toBe(1);
  });

  it('a process killed (SIGKILL) between the handler\'s write and COMMIT leaves neither; the redelivery applies it once', async () => {
    const inbox = postgresInbox({ pool, consumer: 'crash', table });
    await inbox.migrate();
    const child = spawnNode(childScript, { kind: 'pg', table, effects, messageId: 'crash-1' });
    await child.waitForLine(/^written$/);
    await child.kill('SIGKILL');
    expect(await count('crash-1')).toBe(0);
    const redeliver = () =>
      inbox.handle('crash-1', async (client) => {
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['crash-1']);
      });
    // Postgres rolls the dead session back; the redelivery may wait on its row lock until then.
    expect((await redeliver()).status).toBe('processed');
    expect((await redeliver()).status).toBe('duplicate');
    expect(await count('crash-1')).toBe(1);
    expect(await inboxRows('crash-1')).toBe(1);
  });

  it('purges old ids', async () => {
    const inbox = postgresInbox({ pool, consumer: 'purge', table });
    await inbox.handle('old', () => undefined);
    await sleep(20);
    expect(await inbox.purge(10)).toBe(1);
    expect((await inbox.handle('old', () => undefined)).status).toBe('processed');
  });
});

describe('sqlite inbox (better-sqlite3 files)', () => {
  const dbPath = join(tmpdir(), `oncely-inbox-${suffix()}.db`);
  const table = 'inbox_test';
  const effects = 'effects_test';
  let db: Database.Database;

  beforeAll(() => {
    db = new Database(dbPath);
    db.pragma('journal_mode = WAL');
    db.pragma('busy_timeout = 5000');
    db.exec(`CREATE TABLE ${effects} (message_id TEXT NOT NULL)`);
  });
  afterAll(() => {
    db.close();
    for (const ext of ['', '-wal', '-shm']) rmSync(dbPath + ext, { force: true });
  });
  const count = (id: string) =>
    (db.prepare(`SELECT count(*) AS n FROM ${effects} WHERE message_id = ?`).get(id) as { n: number }).n;

  it('applies a message delivered three times once, with the handler inside the transaction', () => {
    const inbox = sqliteInbox({ database: db, consumer: 'ledger', table });
    const apply = () =>
      inbox.handle('m1', (database) => {
        database.prepare(`INSERT INTO ${effects} (message_id) VALUES (?)`).run('m1');
        return database.inTransaction;
      });
    expect(apply()).toEqual({ status: 'processed', result: true });
    expect(apply().status).toBe('duplicate');
    expect(apply().status).toBe('duplicate');
    expect(count('m1')).toBe(1);
  });

  it('rolls back on a throw, and refuses an async handler', () => {
    const inbox = sqliteInbox({ database: db, consumer: 'ledger', table });
    expect(() =>
      inbox.handle('bad', (database) => {
        database.prepare(`INSERT INTO ${effects} (message_id) VALUES (?)`).run('bad');
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(() => inbox.handle('bad', async () => undefined)).toThrow(/synchronous/);
    expect(count('bad')).toBe(0);
    expect(inbox.handle('bad', () => 1).status).toBe('processed');
  });

  it('a process killed (SIGKILL) between the handler\'s write and COMMIT leaves neither; the redelivery applies it once', async () => {
    const inbox = sqliteInbox({ database: db, consumer: 'crash', table });
    const child = spawnNode(childScript, { kind: 'sqlite', table, effects, messageId: 'crash-1', dbPath });
    await child.waitForLine(/^written$/);
    await child.kill('SIGKILL');
    expect(count('crash-1')).toBe(0);
    const redeliver = () =>
      inbox.handle('crash-1', (database) => {
        database.prepare(`INSERT INTO ${effects} (message_id) VALUES (?)`).run('crash-1');
      });
    expect(redeliver().status).toBe('processed');
    expect(redeliver().status).toBe('duplicate');
    expect(count('crash-1')).toBe(1);
  });
});
