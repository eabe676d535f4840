/**
 * oncely/consumer/inbox on the real PostgreSQL (127.0.0.1:5432, db `test`),
 * MariaDB (3306, db `test`) and SQLite files, with SIGKILLed children. The
 * inbox is transactional mode: a message id is an idempotency record in the
 * store's table, completed in the handler's transaction.
 */
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import mysql from 'mysql2/promise';
import { ConfigError, InFlightError, RolledBackError } from 'oncely';
import { IdempotentConsumer, shouldAcknowledge } from 'oncely/consumer';
import { inbox as anyInbox, postgresInbox, sqliteInbox } from 'oncely/consumer/inbox';
import { memoryStore } from 'oncely/stores/memory';
import { migrateMysql, mysqlStore } from 'oncely/stores/mysql';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sleep, spawnNode, suffix } from './helpers.js';

const childScript = fileURLToPath(new URL('./inbox-child.ts', import.meta.url));

describe('postgres inbox (real PostgreSQL)', () => {
  let pool: pg.Pool;
  const s = suffix();
  const recordsTable = `oncely_inbox_records_${s}`;
  const legacyTable = `oncely_inbox_legacy_${s}`;
  const effects = `oncely_inbox_effects_${s}`;
  const uniques = `oncely_inbox_uniques_${s}`;
  const opened: Array<{ close(): Promise<void> }> = [];
  const open = (options: Omit<Parameters<typeof postgresInbox>[0], 'pool'>) => {
    const inbox = postgresInbox({ pool, recordsTable, ...options });
    opened.push(inbox);
    return inbox;
  };

  beforeAll(async () => {
    pool = new pg.Pool({ host: '127.0.0.1', user: 'postgres', database: 'test', max: 12 });
    await pool.query(`CREATE TABLE ${effects} (message_id text NOT NULL)`);
    await pool.query(`CREATE TABLE ${uniques} (id text PRIMARY KEY)`);
    await open({ consumer: 'migrate' }).migrate();
  });
  afterAll(async () => {
    for (const inbox of opened) await inbox.close();
    await pool.query(
      [recordsTable, `${recordsTable}_sessions`, legacyTable, effects, uniques].map((t) => `DROP TABLE IF EXISTS ${t}`).join('; '),
    );
    await pool.end();
  });

  const count = async (id: string) =>
    Number((await pool.query(`SELECT count(*) AS n FROM ${effects} WHERE message_id = $1`, [id])).rows[0].n);
  const recordState = async (inbox: ReturnType<typeof postgresInbox>, id: string) =>
    (await inbox.store.get(inbox.consumer.recordIdOf(id)))?.state ?? 'absent';

  it('applies a message delivered three times (sequentially, and concurrently: the copies wait) once', async () => {
    const inbox = open({ consumer: 'ledger' });
    let runs = 0;
    const apply = (id: string) =>
      inbox.handle(id, async (client) => {
        runs++;
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, [id]);
        await sleep(100); // hold the transaction open so that the copies overlap
        return 'ok';
      });
    const seq = [await apply('seq'), await apply('seq'), await apply('seq')];
    expect(seq).toEqual([{ status: 'processed', result: 'ok' }, { status: 'duplicate' }, { status: 'duplicate' }]);
    const con = await Promise.all([apply('con'), apply('con'), apply('con'), apply('con')]);
    expect(con.filter((r) => r.status === 'processed')).toHaveLength(1);
    expect(con.filter((r) => r.status === 'duplicate')).toHaveLength(3);
    expect(runs).toBe(2);
    expect(await count('seq')).toBe(1);
    expect(await count('con')).toBe(1);
    expect(await recordState(inbox, 'con')).toBe('completed');
    // Another consumer name is another inbox.
    const other = open({ consumer: 'audit' });
    expect(await other.handle('seq', () => 1)).toEqual({ status: 'processed', result: 1 });
  });

  it('a copy still in flight past `wait` rejects with an InFlightError, and writes nothing', async () => {
    const inbox = open({ consumer: 'ledger', wait: { timeoutMs: 150 } });
    let release!: () => void;
    const holding = inbox.handle('held', async (client) => {
      await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['held']);
      await new Promise<void>((resolve) => (release = resolve));
    });
    await sleep(100);
    await expect(inbox.handle('held', () => 'second')).rejects.toBeInstanceOf(InFlightError);
    release();
    expect((await holding).status).toBe('processed');
    expect(await count('held')).toBe(1);
  });

  it("rolls the handler's writes back and releases the id when the handler throws; the redelivery runs", async () => {
    const inbox = open({ consumer: 'ledger' });
    await expect(
      inbox.handle('fails', async (client) => {
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['fails']);
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await count('fails')).toBe(0);
    expect(await recordState(inbox, 'fails')).toBe('absent');
    expect(await inbox.handle('fails', () => 'second')).toEqual({ status: 'processed', result: 'second' });
  });

  it('rejects with a RolledBackError when a caught failed statement left the transaction aborted; the redelivery runs again', async () => {
    const inbox = open({ consumer: 'ledger' });
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
    await expect(swallowing).rejects.toBeInstanceOf(RolledBackError);
    expect(await recordState(inbox, 'swallowed')).toBe('absent');
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
  });

  it("a process killed (SIGKILL) between the handler's write and COMMIT leaves neither; the redelivery takes over within seconds and applies it once", async () => {
    const inbox = open({ consumer: 'crash' });
    const child = spawnNode(childScript, { kind: 'pg', recordsTable, effects, messageId: 'crash-1' });
    await child.waitForLine(/^written$/, 20_000);
    expect(await recordState(inbox, 'crash-1')).toBe('in_progress');
    await child.kill('SIGKILL');
    const killedAt = Date.now();
    expect(await count('crash-1')).toBe(0);
    const redeliver = () =>
      inbox.handle('crash-1', async (client, { takeover }) => {
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['crash-1']);
        return takeover;
      });
    // The dead process's session ends about a second after its last heartbeat (not the 30 s lease);
    // the redelivery waits for that, then takes the claim over.
    expect(await redeliver()).toEqual({ status: 'processed', result: true });
    expect(Date.now() - killedAt).toBeLessThan(10_000);
    expect((await redeliver()).status).toBe('duplicate');
    expect(await count('crash-1')).toBe(1);
    expect(await recordState(inbox, 'crash-1')).toBe('completed');
  });

  it('is one mechanism with the idempotent consumer: the same records, whichever handled the message first', async () => {
    const inbox = open({ consumer: 'orders' });
    const consumer = new IdempotentConsumer<{ id: string }>({
      name: 'orders',
      store: inbox.store,
      handler: async ({ message, transaction }) => {
        const client = await transaction<pg.PoolClient>();
        await client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, [message.id]);
      },
    });
    try {
      // The consumer in transactional mode first, then the inbox: a duplicate.
      expect(shouldAcknowledge(await consumer.handle({ id: 'o1' }, 'o1'))).toBe(true);
      expect(await inbox.handle('o1', () => 'again')).toEqual({ status: 'duplicate' });
      // The inbox first, then the consumer: a duplicate too.
      await inbox.handle('o2', (client) => client.query(`INSERT INTO ${effects} (message_id) VALUES ($1)`, ['o2']));
      expect((await consumer.handle({ id: 'o2' }, 'o2')).action).toBe('duplicate');
      expect(await count('o1')).toBe(1);
      expect(await count('o2')).toBe(1);
      expect(inbox.consumer.recordIdOf('o1')).toBe(consumer.recordIdOf('o1'));
    } finally {
      consumer.close();
    }
  });

  it('honours the ids an older inbox table holds (legacyTable), reading it inside the transaction', async () => {
    await pool.query(
      `CREATE TABLE ${legacyTable} (consumer text NOT NULL, message_id text NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer, message_id))`,
    );
    await pool.query(`INSERT INTO ${legacyTable} (consumer, message_id) VALUES ('ledger', 'old-1'), ('audit', 'old-2')`);
    const inbox = open({ consumer: 'ledger', legacyTable });
    let runs = 0;
    const apply = (id: string) => inbox.handle(id, () => ++runs);
    expect(await apply('old-1')).toEqual({ status: 'duplicate' });
    // The old id is now recorded here as well.
    expect(await recordState(inbox, 'old-1')).toBe('completed');
    expect(await apply('old-1')).toEqual({ status: 'duplicate' });
    // Another consumer's old id, and a new id, run.
    expect(await apply('old-2')).toEqual({ status: 'processed', result: 1 });
    expect(await apply('new-1')).toEqual({ status: 'processed', result: 2 });
    expect(runs).toBe(2);
    // Read, never written.
    expect(Number((await pool.query(`SELECT count(*) AS n FROM ${legacyTable}`)).rows[0].n)).toBe(2);
  });

  it('refuses the old `table` option, a store without transactional mode, and bad ids, with a clear error and nothing written', async () => {
    expect(() => postgresInbox({ pool, consumer: 'x', table: 'oncely_inbox' } as never)).toThrow(/legacyTable/);
    expect(() => anyInbox({ store: memoryStore(), consumer: 'x' })).toThrow(ConfigError);
    // A single pg Client has no transactions to hand out (its connect() is not a pool's).
    expect(() => postgresInbox({ pool: new pg.Client({ host: '127.0.0.1' }), consumer: 'x' })).toThrow(/transactional mode/);
    expect(() => postgresInbox({ pool, consumer: 'x', legacyTable: 'bad name' })).toThrow(ConfigError);
    const inbox = open({ consumer: 'ledger' });
    await expect(inbox.handle('', () => 1)).rejects.toBeInstanceOf(ConfigError);
    await expect(inbox.handle('x', undefined as never)).rejects.toBeInstanceOf(ConfigError);
  });
});

describe('mysql inbox (real MariaDB, the generic inbox over mysqlStore)', () => {
  let pool: mysql.Pool;
  const s = suffix();
  const table = `oncely_inbox_records_${s}`;
  const effects = `oncely_inbox_effects_${s}`;
  let inbox: ReturnType<typeof anyInbox<mysql.PoolConnection>>;

  beforeAll(async () => {
    pool = mysql.createPool({ host: '127.0.0.1', user: 'root', database: 'test', connectionLimit: 12 });
    await pool.query(`CREATE TABLE ${effects} (message_id varchar(64) NOT NULL)`);
    await migrateMysql(pool, { table });
    inbox = anyInbox<mysql.PoolConnection>({ store: mysqlStore({ pool, table }), consumer: 'ledger' });
  });
  afterAll(async () => {
    await inbox.close();
    await pool.query(`DROP TABLE IF EXISTS ${table}, ${table}_sessions, ${effects}`);
    await pool.end();
  });
  const count = async (id: string) => {
    const [rows] = await pool.query(`SELECT count(*) AS n FROM ${effects} WHERE message_id = ?`, [id]);
    return Number((rows as Array<{ n: number }>)[0]!.n);
  };

  it('applies concurrent copies once, and rolls back a failing handler', async () => {
    const apply = (id: string) =>
      inbox.handle(id, async (db) => {
        await db.execute(`INSERT INTO ${effects} (message_id) VALUES (?)`, [id]);
        await sleep(100);
        return db.threadId > 0;
      });
    const results = await Promise.all([apply('m1'), apply('m1'), apply('m1')]);
    expect(results.filter((r) => r.status === 'processed')).toEqual([{ status: 'processed', result: true }]);
    expect(await count('m1')).toBe(1);
    await expect(
      inbox.handle('m2', async (db) => {
        await db.execute(`INSERT INTO ${effects} (message_id) VALUES (?)`, ['m2']);
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await count('m2')).toBe(0);
    expect((await apply('m2')).status).toBe('processed');
    expect(await count('m2')).toBe(1);
  });
});

describe('sqlite inbox (better-sqlite3 files)', () => {
  const dbPath = join(tmpdir(), `oncely-inbox-${suffix()}.db`);
  const recordsTable = 'inbox_records';
  const effects = 'effects_test';
  let db: Database.Database;
  const opened: Array<{ close(): Promise<void> }> = [];
  const open = (options: Omit<Parameters<typeof sqliteInbox>[0], 'database'>) => {
    const inbox = sqliteInbox({ database: db, recordsTable, ...options });
    opened.push(inbox);
    return inbox;
  };

  beforeAll(() => {
    db = new Database(dbPath);
    db.pragma('journal_mode = WAL');
    db.exec(`CREATE TABLE ${effects} (message_id TEXT NOT NULL)`);
  });
  afterAll(async () => {
    for (const inbox of opened) await inbox.close();
    db.close();
    for (const ext of ['', '-wal', '-shm']) rmSync(dbPath + ext, { force: true });
  });
  const count = (id: string) => (db.prepare(`SELECT count(*) AS n FROM ${effects} WHERE message_id = ?`).get(id) as { n: number }).n;

  it('applies a message delivered three times (and concurrently) once, with the handler inside the transaction, awaits allowed', async () => {
    const inbox = open({ consumer: 'ledger' });
    const apply = (id: string) =>
      inbox.handle(id, async (database) => {
        database.prepare(`INSERT INTO ${effects} (message_id) VALUES (?)`).run(id);
        await sleep(30);
        return database.inTransaction;
      });
    expect(await apply('m1')).toEqual({ status: 'processed', result: true });
    expect((await apply('m1')).status).toBe('duplicate');
    const con = await Promise.all([apply('m2'), apply('m2'), apply('m2')]);
    expect(con.filter((r) => r.status === 'processed')).toHaveLength(1);
    expect(count('m1')).toBe(1);
    expect(count('m2')).toBe(1);
  });

  it('rolls back on a throw; the redelivery runs', async () => {
    const inbox = open({ consumer: 'ledger' });
    await expect(
      inbox.handle('bad', (database) => {
        database.prepare(`INSERT INTO ${effects} (message_id) VALUES (?)`).run('bad');
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(count('bad')).toBe(0);
    expect(await inbox.handle('bad', () => 1)).toEqual({ status: 'processed', result: 1 });
  });

  it('honours the ids an older inbox table holds (legacyTable)', async () => {
    db.exec(`CREATE TABLE old_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, processed_at INTEGER NOT NULL, PRIMARY KEY (consumer, message_id))`);
    db.prepare('INSERT INTO old_inbox VALUES (?, ?, ?)').run('ledger', 'old-1', Date.now());
    const inbox = open({ consumer: 'ledger', legacyTable: 'old_inbox' });
    let runs = 0;
    expect(await inbox.handle('old-1', () => ++runs)).toEqual({ status: 'duplicate' });
    expect(await inbox.handle('new-1', () => ++runs)).toEqual({ status: 'processed', result: 1 });
    expect(runs).toBe(1);
  });

  it("a process killed (SIGKILL) between the handler's write and COMMIT leaves neither; the redelivery takes over and applies it once", async () => {
    const inbox = open({ consumer: 'crash' });
    const child = spawnNode(childScript, { kind: 'sqlite', recordsTable, effects, messageId: 'crash-1', dbPath });
    await child.waitForLine(/^written$/, 20_000);
    await child.kill('SIGKILL');
    expect(count('crash-1')).toBe(0);
    const redeliver = () =>
      inbox.handle('crash-1', (database, { takeover }) => {
        database.prepare(`INSERT INTO ${effects} (message_id) VALUES (?)`).run('crash-1');
        return takeover;
      });
    expect(await redeliver()).toEqual({ status: 'processed', result: true });
    expect((await redeliver()).status).toBe('duplicate');
    expect(count('crash-1')).toBe(1);
  });
});
