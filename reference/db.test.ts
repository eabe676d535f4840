/**
 * The business database's data-access layer on each dialect, against the
 * real servers (each test on its own table prefix, dropped afterwards): the
 * same statements everywhere, insert-or-ignore, unique violations, our own
 * transactions, statements over a handle inside someone else's transaction
 * (as the store hands one out in transactional mode), and which URLs name
 * the same database.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mysql from 'mysql2/promise';
import pg from 'pg';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { type BusinessDb, databaseIdentity, dropTables, openBusinessDb, sameDatabase, toPostgres } from './db.js';

const POSTGRES_URL = process.env.REFERENCE_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const MYSQL_URL = process.env.REFERENCE_MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test';

const dirs: string[] = [];
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

type Kind = 'sqlite' | 'postgres' | 'mysql';

async function open(kind: Kind): Promise<BusinessDb> {
  const prefix = `u${randomBytes(4).toString('hex')}_`;
  if (kind === 'sqlite') {
    const dir = mkdtempSync(join(tmpdir(), 'oncely-refdb-'));
    dirs.push(dir);
    const db = await openBusinessDb({ url: `sqlite:${join(dir, 'business.db')}`, prefix });
    cleanups.push(() => db.close());
    return db;
  }
  const db = await openBusinessDb({ url: kind === 'postgres' ? POSTGRES_URL : MYSQL_URL, prefix });
  cleanups.push(async () => {
    await dropTables(db);
    await db.close();
  });
  return db;
}

describe('which URLs name the same database', () => {
  it('compares dialect, user, host, port and database; not passwords, parameters or spelling', () => {
    expect(sameDatabase('postgres://app:secret@localhost/shop', 'postgresql://app@127.0.0.1:5432/shop?sslmode=disable')).toBe(true);
    expect(sameDatabase('postgres://app@db:5432/shop', 'postgres://app@db:5433/shop')).toBe(false);
    expect(sameDatabase('postgres://app@db/shop', 'postgres://other@db/shop')).toBe(false);
    expect(sameDatabase('postgres://app@db/shop', 'postgres://app@db/shop2')).toBe(false);
    expect(sameDatabase('postgres://app@db', 'postgres://app@db/app')).toBe(true); // PostgreSQL's default database: the user's
    expect(sameDatabase('mysql://root@127.0.0.1:3306/test', 'mariadb://root:pw@localhost/test')).toBe(true);
    expect(sameDatabase('mysql://root@db/test', 'postgres://root@db/test')).toBe(false);
    expect(sameDatabase('sqlite:./data/app.db', `sqlite:${process.cwd()}/data/app.db`)).toBe(true);
    expect(sameDatabase('sqlite::memory:', 'sqlite::memory:')).toBe(false);
    expect(sameDatabase('memory:', 'memory:')).toBe(false);
    expect(sameDatabase('redis://127.0.0.1:6379', 'redis://127.0.0.1:6379')).toBe(false);
    expect(databaseIdentity('postgres://app:pw@DB.example:6000/shop')).toBe('postgres://app@db.example:6000/shop');
  });

  it('rewrites ? placeholders for PostgreSQL', () => {
    expect(toPostgres('SELECT a FROM t WHERE b = ? AND c = ? LIMIT 1')).toBe('SELECT a FROM t WHERE b = $1 AND c = $2 LIMIT 1');
  });

  it('refuses an unknown URL and a bad prefix', async () => {
    await expect(openBusinessDb({ url: 'mongodb://x' })).rejects.toThrow(/not supported/);
    await expect(openBusinessDb({ url: 'sqlite::memory:', prefix: 'x; DROP TABLE y' })).rejects.toThrow(/DATABASE_TABLE_PREFIX/);
  });

  it.each([
    ['postgres://postgres@127.0.0.1:1/test', /cannot reach PostgreSQL/],
    ['mysql://root@127.0.0.1:1/test', /cannot reach MySQL/],
  ])('%s fails fast and clearly', async (url, message) => {
    const started = Date.now();
    await expect(openBusinessDb({ url })).rejects.toThrow(message);
    expect(Date.now() - started).toBeLessThan(5_000);
  });
});

describe.each(['sqlite', 'postgres', 'mysql'] as const)('the business database on %s', (kind) => {
  it('runs the same statements, ignores a duplicate insert, and names a unique violation', async () => {
    const db = await open(kind);
    const { reservations, payments } = db.tables;
    const insert = db.insertIgnore(reservations, ['id', 'account', 'step_key', 'currency', 'items', 'total', 'status', 'created']);
    const row = (id: string) => [id, 'acct', 'step-1', 'EUR', '[]', 9_007_199_254_740_991, 'held', 'now'];
    expect(await db.run(insert, row('rsv_1'))).toBe(1);
    expect(await db.run(insert, row('rsv_2'))).toBe(0); // same (account, step_key): nothing
    const found = await db.all<{ id: string; total: number | string }>(`SELECT id, total FROM ${reservations} WHERE account = ?`, ['acct']);
    expect(found.map((r) => [r.id, Number(r.total)])).toEqual([['rsv_1', Number.MAX_SAFE_INTEGER]]);

    const pay = `INSERT INTO ${payments} (id, account, idempotency_id, amount, currency, status, created) VALUES (?, ?, ?, ?, ?, 'succeeded', ?)`;
    await db.run(pay, ['pay_1', 'acct', 'rec_1', 5, 'EUR', 'now']);
    const duplicate = await db.run(pay, ['pay_2', 'acct', 'rec_1', 5, 'EUR', 'now']).catch((error: unknown) => error);
    expect(db.isUniqueViolation(duplicate)).toBe(true);
    // Accounts compare exactly (MySQL's default collation would not).
    await db.run(pay, ['pay_3', 'ACCT', 'rec_1', 5, 'EUR', 'now']);
    expect(await db.get(`SELECT id FROM ${payments} WHERE account = ? AND idempotency_id = ?`, ['ACCT', 'rec_1'])).toEqual({ id: 'pay_3' });
  });

  it('a transaction commits all or nothing', async () => {
    const db = await open(kind);
    const { users } = db.tables;
    const insert = `INSERT INTO ${users} (account, id, name, email, updated) VALUES (?, ?, ?, ?, ?)`;
    await expect(
      db.transaction(async (tx) => {
        await tx.run(insert, ['a', 'u1', 'Ada', 'ada@x', 'now']);
        throw new Error('changed my mind');
      }),
    ).rejects.toThrow('changed my mind');
    expect(await db.all(`SELECT id FROM ${users}`)).toEqual([]);
    await db.transaction(async (tx) => {
      await tx.run(insert, ['a', 'u1', 'Ada', 'ada@x', 'now']);
      await tx.run(insert, ['a', 'u2', 'Bob', 'bob@x', 'now']);
    });
    expect((await db.all<{ id: string }>(`SELECT id FROM ${users} ORDER BY id`)).map((r) => r.id)).toEqual(['u1', 'u2']);
  });
});

describe('statements over a handle inside another owner\'s transaction (transactional mode)', () => {
  it('PostgreSQL: a pg client in BEGIN: rolled back with it, committed with it', async () => {
    const db = await open('postgres');
    const pool = new pg.Pool({ connectionString: POSTGRES_URL, max: 1 });
    cleanups.push(() => pool.end());
    const insert = `INSERT INTO ${db.tables.users} (account, id, name, email, updated) VALUES (?, ?, ?, ?, ?)`;
    for (const ending of ['ROLLBACK', 'COMMIT'] as const) {
      const client = await pool.connect();
      await client.query('BEGIN');
      await db.over(client).run(insert, ['a', ending, 'N', 'n@x', 'now']);
      expect(await db.get(`SELECT id FROM ${db.tables.users} WHERE id = ?`, [ending])).toBeUndefined(); // not yet visible
      await client.query(ending);
      client.release();
    }
    expect(await db.all(`SELECT id FROM ${db.tables.users}`)).toEqual([{ id: 'COMMIT' }]);
  });

  it('MySQL: a mysql2 connection in a transaction, promise or callback API', async () => {
    const db = await open('mysql');
    const pool = mysql.createPool({ uri: MYSQL_URL, connectionLimit: 1 });
    cleanups.push(() => pool.end());
    const insert = `INSERT INTO ${db.tables.users} (account, id, name, email, updated) VALUES (?, ?, ?, ?, ?)`;
    for (const ending of ['rollback', 'commit'] as const) {
      const connection = await pool.getConnection();
      await connection.beginTransaction();
      // The promise connection, and the callback one it wraps (which answers promise()).
      await db.over(connection).run(insert, ['a', `${ending}-promise`, 'N', 'n@x', 'now']);
      await db.over(connection.connection).run(insert, ['a', `${ending}-callback`, 'N', 'n@x', 'now']);
      expect(await db.all(`SELECT id FROM ${db.tables.users}`)).toEqual([]);
      await connection[ending]();
      connection.release();
    }
    expect((await db.all<{ id: string }>(`SELECT id FROM ${db.tables.users} ORDER BY id`)).map((r) => r.id)).toEqual([
      'commit-callback',
      'commit-promise',
    ]);
  });
});

describe('SQLite, one connection', () => {
  it('statements on the pool wait for an open transaction instead of joining it', async () => {
    const db = await open('sqlite');
    const { users } = db.tables;
    const insert = `INSERT INTO ${users} (account, id, name, email, updated) VALUES (?, ?, ?, ?, ?)`;
    let release!: () => void;
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    const transaction = db
      .transaction(async (tx) => {
        await tx.run(insert, ['a', 'inside', 'N', 'n@x', 'now']);
        await held;
        throw new Error('rolled back');
      })
      .catch((error: unknown) => error);
    const outside = db.run(insert, ['a', 'outside', 'N', 'n@x', 'now']);
    await new Promise((r) => setTimeout(r, 50));
    release();
    expect(await transaction).toBeInstanceOf(Error);
    await outside;
    // The outside write was not swept into the rolled-back transaction.
    expect(await db.all(`SELECT id FROM ${users}`)).toEqual([{ id: 'outside' }]);
  });
});
