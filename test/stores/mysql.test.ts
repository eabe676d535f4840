import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import mysql from 'mysql2/promise';
import {
  migrateMysql,
  type MysqlQueryable,
  type MysqlStore,
  type MysqlValue,
  mysqlSchemaSql,
  mysqlStore,
  purgeExpiredRecords,
} from 'oncely/stores/mysql';
import { Engine, RolledBackError, StoreUnavailableError } from 'oncely';
import { defineStoreConformance } from 'oncely/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const config = {
  host: process.env.MYSQL_HOST ?? '127.0.0.1',
  port: Number(process.env.MYSQL_PORT ?? 3306),
  user: process.env.MYSQL_USER ?? 'root',
  database: process.env.MYSQL_DATABASE ?? 'test',
  connectionLimit: 5,
};
const suffix = randomBytes(6).toString('hex');
const table = `oncely_test_${suffix}`;
const plainTable = `oncely_plain_${suffix}`;
const customTable = `custom_${suffix}`;
/** The business table of the transactional-mode cases. */
const business = `oncely_business_${suffix}`;
const pools: mysql.Pool[] = [];
const newPool = (): mysql.Pool => {
  const pool = mysql.createPool(config);
  pools.push(pool);
  return pool;
};
const admin = newPool();
const newId = (): string => randomBytes(32).toString('hex');
const LONG = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** Tables the purge tests create, dropped after the file. */
const purgeTables: string[] = [];

/** A fresh table of its own for one purge test. */
async function freshTable(): Promise<string> {
  const name = `oncely_purge_${randomBytes(6).toString('hex')}`;
  purgeTables.push(name);
  await migrateMysql(admin, { table: name });
  return name;
}
async function rows(name: string): Promise<number> {
  const [result] = await admin.query(`SELECT COUNT(*) AS n FROM \`${name}\``);
  return Number((result as Array<{ n: number }>)[0]!.n);
}
/** Wait until `check` holds (polling), or fail after `ms`. */
async function until(check: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await sleep(20);
  }
}
/** Claim and complete `id` with a retention of `ttlMs`. */
async function completed(store: MysqlStore, id: string, ttlMs: number): Promise<void> {
  const claim = await store.claim(id, LONG);
  if (claim.status !== 'acquired') throw new Error('expected acquired');
  expect(await store.complete(id, claim.token, 'x', ttlMs)).toBe(true);
}
/** Insert `n` records that expired a minute ago, 20 sharing each of 1000 deadlines (a backlog). */
async function backlog(name: string, n: number): Promise<void> {
  const base = Date.now() - 60_000;
  for (let start = 0; start < n; start += 1000) {
    const count = Math.min(1000, n - start);
    const values: MysqlValue[] = [];
    for (let i = start; i < start + count; i++) values.push(`expired-${i}`, base + (i % 1000));
    await admin.query(
      `INSERT INTO \`${name}\` (id, state, lease_until, expires_at, outcome) VALUES ${Array.from({ length: count }, () => "(?, 1, 0, ?, '{}')").join(', ')}`,
      values,
    );
  }
}

/** Wrap a pool so that every statement sent (`execute` and `query`) is counted. Stores over it run no background purge, whose statements would count too. */
function counted(pool: MysqlQueryable): MysqlQueryable & { count: number } {
  const wrapper = {
    count: 0,
    execute(sql: string, values?: MysqlValue[]) {
      wrapper.count++;
      return pool.execute(sql, values);
    },
    query(sql: string, values?: MysqlValue[]) {
      wrapper.count++;
      return pool.query(sql, values);
    },
  };
  return wrapper;
}

beforeAll(async () => {
  await migrateMysql(admin, { table });
  await migrateMysql(admin, { table: plainTable });
  await admin.query(`CREATE TABLE \`${business}\` (\`key\` VARCHAR(64) PRIMARY KEY, amount INT NOT NULL) ENGINE = InnoDB`);
});

afterAll(async () => {
  for (const name of [table, plainTable, customTable, business, ...purgeTables]) {
    await admin.query(`DROP TABLE IF EXISTS \`${name}\``);
    await admin.query(`DROP TABLE IF EXISTS \`${name}_sessions\``);
  }
  await Promise.all(pools.map((pool) => pool.end()));
});

/** Business writes of the transactional-mode conformance cases. */
const transactionWrites = {
  async write(client: unknown, key: string) {
    await (client as mysql.PoolConnection).execute(`INSERT INTO \`${business}\` (\`key\`, amount) VALUES (?, 1)`, [key]);
  },
  async exists(key: string) {
    const [found] = await admin.query(`SELECT 1 FROM \`${business}\` WHERE \`key\` = ?`, [key]);
    return (found as unknown[]).length === 1;
  },
};

defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  {
    name: 'mysql (MariaDB, RETURNING detected)',
    store: () => mysqlStore({ pool: newPool(), table, purge: false }),
    anotherClient: () => mysqlStore({ pool: newPool(), table, purge: false }),
    transactionWrites,
  },
);

// The MySQL form (no RETURNING), run on the same MariaDB server.
defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  {
    name: 'mysql (without RETURNING)',
    store: () => mysqlStore({ pool: newPool(), table: plainTable, returning: false, purge: false }),
    anotherClient: () => mysqlStore({ pool: newPool(), table: plainTable, returning: false, purge: false }),
    transactionWrites,
  },
);

describe('mysql store', () => {
  it('detects RETURNING once, then uses one statement per operation (MariaDB)', async () => {
    const pool = counted(newPool());
    const store = mysqlStore({ pool, table, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(pool.count).toBe(2); // SELECT VERSION() once per store, then the claim
    pool.count = 0;
    expect(await store.claim(newId(), LONG)).toMatchObject({ status: 'acquired' });
    expect(pool.count).toBe(1);
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'in_progress' });
    expect(pool.count).toBe(2);
    expect(await store.renew(id, claim.token, 30_000)).toBe(true);
    expect(pool.count).toBe(3);
    expect(await store.complete(id, claim.token, 'done', 60_000)).toBe(true);
    expect(pool.count).toBe(4);
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'completed', record: { outcome: 'done' } });
    expect(pool.count).toBe(5);
    expect(await store.get(id)).toMatchObject({ state: 'completed' });
    expect(pool.count).toBe(6);
  });

  it('without RETURNING: a won claim is one statement, a lost one two', async () => {
    const pool = counted(newPool());
    const store = mysqlStore({ pool, table: plainTable, returning: false, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(pool.count).toBe(1);
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'in_progress' });
    expect(pool.count).toBe(3);
    expect(await store.complete(id, claim.token, 'done', 60_000)).toBe(true);
    expect(pool.count).toBe(4);
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'completed', record: { outcome: 'done' } });
    expect(pool.count).toBe(6);
  });

  it('reads deadlines from the server clock, in both forms', async () => {
    for (const [name, returning] of [
      [table, true],
      [plainTable, false],
    ] as const) {
      const store = mysqlStore({ pool: admin, table: name, returning });
      const [rows] = await admin.query(
        "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(3)) DIV 1000 AS ms",
      );
      const before = Number((rows as Array<{ ms: number }>)[0]!.ms);
      const claim = await store.claim(newId(), { ...LONG, leaseMs: 5000 });
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      expect(claim.leaseUntil).toBeGreaterThanOrEqual(before + 5000);
      expect(claim.leaseUntil).toBeLessThan(before + 5000 + 2000);
      const [stored] = await admin.query(`SELECT lease_until FROM \`${name}\` WHERE token = ?`, [claim.token]);
      expect(Number((stored as Array<{ lease_until: number }>)[0]!.lease_until)).toBe(claim.leaseUntil);
    }
  });

  it('settles 100 concurrent claims over 25 separate connections with one winner, in both forms', async () => {
    const connections = await Promise.all(Array.from({ length: 25 }, () => mysql.createConnection(config)));
    try {
      for (const [name, returning] of [
        [table, true],
        [plainTable, false],
      ] as const) {
        for (let round = 0; round < 3; round++) {
          const id = newId();
          const counters = connections.map((connection) => counted(connection));
          const stores = counters.map((pool) => mysqlStore({ pool, table: name, returning, purge: false }));
          const results = await Promise.all(
            Array.from({ length: 100 }, (_, i) => stores[i % stores.length]!.claim(id, LONG)),
          );
          expect(results.filter((r) => r.status === 'acquired')).toHaveLength(1);
          expect(results.filter((r) => r.status === 'in_progress')).toHaveLength(99);
          const trips = counters.reduce((sum, c) => sum + c.count, 0);
          console.log(`mysql (returning: ${returning}): 100 concurrent claims took ${trips} statements`);
        }
      }
    } finally {
      await Promise.all(connections.map((connection) => connection.end()));
    }
  });

  it('claims a batch in one statement on MariaDB, a repeated id once', async () => {
    for (const [name, returning, statements] of [
      [table, true, 1],
      [plainTable, false, 52],
    ] as const) {
      const pool = counted(newPool());
      const store = mysqlStore({ pool, table: name, returning, purge: false });
      const done = newId();
      const claimed = await store.claim(done, LONG);
      if (claimed.status !== 'acquired') throw new Error('expected acquired');
      await store.complete(done, claimed.token, 'done', 60_000);
      const fresh = Array.from({ length: 50 }, newId);
      pool.count = 0;
      const results = await store.claimMany!([...fresh, done, fresh[0]!], LONG);
      expect(pool.count).toBe(statements);
      expect(results.slice(0, 50).every((r) => r.status === 'acquired')).toBe(true);
      expect(results[50]).toMatchObject({ status: 'completed', record: { outcome: 'done' } });
      expect(results[51]).toMatchObject({ status: 'in_progress', fingerprint: LONG.fingerprint });
      const first = results[0]!;
      if (first.status !== 'acquired') throw new Error('expected acquired');
      expect(await store.complete(fresh[0]!, first.token, 'ok', 60_000)).toBe(true);
    }
  });

  it('gives one winner per id among concurrent overlapping batches in different orders', async () => {
    const ids = Array.from({ length: 30 }, newId);
    const stores = Array.from({ length: 4 }, () => mysqlStore({ pool: newPool(), table, returning: true }));
    const batches = Array.from({ length: 12 }, (_, i) => {
      const shuffled = [...ids].sort(() => Math.random() - 0.5);
      return i % 2 === 0 ? shuffled : shuffled.slice(0, 15);
    });
    const results = await Promise.all(batches.map((batch, i) => stores[i % stores.length]!.claimMany!(batch, LONG)));
    const wins = new Map<string, number>();
    results.forEach((batch, i) => {
      batch.forEach((r, j) => {
        if (r.status === 'acquired') wins.set(batches[i]![j]!, (wins.get(batches[i]![j]!) ?? 0) + 1);
      });
    });
    expect(wins.size).toBe(ids.length);
    expect([...wins.values()].every((n) => n === 1)).toBe(true);
  });

  it('honours the table option, also as database.table', async () => {
    await migrateMysql(admin, { table: `${config.database}.${customTable}` });
    await migrateMysql(admin, { table: customTable }); // idempotent
    const store = mysqlStore({ pool: admin, table: `${config.database}.${customTable}` });
    expect(store.table).toBe(`\`${config.database}\`.\`${customTable}\``);
    const id = newId();
    expect((await store.claim(id, LONG)).status).toBe('acquired');
    const [rows] = await admin.query(`SELECT COUNT(*) AS n FROM \`${customTable}\` WHERE id = ?`, [id]);
    expect(Number((rows as Array<{ n: number }>)[0]!.n)).toBe(1);
    const [indexes] = await admin.query(`SHOW INDEX FROM \`${customTable}\``);
    expect((indexes as Array<{ Key_name: string }>).map((r) => r.Key_name)).toContain(`${customTable}_expires_at`);
    expect((await mysqlStore({ pool: admin, table }).claim(id, LONG)).status).toBe('acquired');
  });

  it('refuses table names that are not plain identifiers', () => {
    expect(() => mysqlStore({ pool: admin, table: 'x`; drop table y; --' })).toThrow(/table name/);
    expect(() => mysqlSchemaSql({ table: 'a.b.c' })).toThrow(/table name/);
  });

  it('accepts durations that are not whole milliseconds', async () => {
    const store = mysqlStore({ pool: admin, table });
    const id = newId();
    const claim = await store.claim(id, { fingerprint: null, leaseMs: 1500.6, ttlMs: 60_000.4 });
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(Number.isInteger(claim.leaseUntil)).toBe(true);
    expect(await store.renew(id, claim.token, 2500.5)).toBe(true);
    expect(await store.complete(id, claim.token, 'ok', 1000.5)).toBe(true);
  });

  it('stores an outcome of several MiB', async () => {
    const store = mysqlStore({ pool: admin, table });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const outcome = `${'é'.repeat(2 * 1024 * 1024)}\u0000😀`;
    expect(await store.complete(id, claim.token, outcome, 60_000)).toBe(true);
    const replay = await store.claim(id, LONG);
    if (replay.status !== 'completed') throw new Error('expected completed');
    expect(replay.record.outcome === outcome).toBe(true);
  });

  it('purges expired records in the background, without anyone calling purge; live and in-progress records stay', async () => {
    const name = await freshTable();
    const store = mysqlStore({ pool: newPool(), table: name, purge: { intervalMs: 30, batch: 2 } });
    for (let i = 0; i < 5; i++) await completed(store, newId(), 20);
    const live = newId();
    await completed(store, live, 60_000);
    // Lease over, record retained: a crashed owner's record waits for a takeover, not for the purge.
    const stalled = newId();
    expect((await store.claim(stalled, { ...LONG, leaseMs: 10 })).status).toBe('acquired');
    await until(async () => (await rows(name)) === 2);
    expect(await store.get(live)).toMatchObject({ state: 'completed' });
    expect(await store.get(stalled)).toMatchObject({ state: 'in_progress' });
    await store.close();
    // Stopped: nothing is purged any more.
    await completed(store, newId(), 10);
    await sleep(200);
    expect(await rows(name)).toBe(3);
  });

  it('drains a backlog in batches, oldest first on the expires_at index, and keeps live records', async () => {
    const name = await freshTable();
    const store = mysqlStore({ pool: newPool(), table: name, purge: false });
    await backlog(name, 20_000);
    const live = newId();
    await completed(store, live, 60_000);
    const [plan] = await admin.query(`EXPLAIN DELETE FROM \`${name}\` WHERE expires_at <= 0 ORDER BY expires_at LIMIT 1000`);
    expect((plan as Array<{ key: string | null }>)[0]!.key).toBe(`${name}_expires_at`);
    const oldest = async (): Promise<number> => {
      const [result] = await admin.query(`SELECT MIN(expires_at) AS m FROM \`${name}\``);
      return Number((result as Array<{ m: number }>)[0]!.m);
    };
    const before = await oldest();
    expect(await store.purgeExpired(1000)).toBe(1000);
    expect(await oldest()).toBe(before + 50);
    const report = await purgeExpiredRecords(store, { batch: 1000 });
    expect(report).toMatchObject({ deleted: 19_000, batches: 20, done: true });
    expect(await rows(name)).toBe(1);
    expect(await store.get(live)).toMatchObject({ state: 'completed' });
  });

  it('lets several processes purge one table at once: every record deleted once', async () => {
    const name = await freshTable();
    await backlog(name, 10_000);
    const stores = Array.from({ length: 3 }, () => mysqlStore({ pool: newPool(), table: name, purge: false }));
    const reports = await Promise.all(stores.map((store) => purgeExpiredRecords(store, { batch: 500 })));
    expect(reports.reduce((sum, r) => sum + r.deleted, 0)).toBe(10_000);
    expect(await rows(name)).toBe(0);
  });

  it('adds the expires_at index to a table created without it', async () => {
    const name = `oncely_old_${randomBytes(6).toString('hex')}`;
    purgeTables.push(name);
    await admin.query(
      `CREATE TABLE \`${name}\` (id VARBINARY(128) NOT NULL, state TINYINT NOT NULL, token VARBINARY(64) NULL,
        fingerprint VARBINARY(1024) NULL, lease_until BIGINT NOT NULL, expires_at BIGINT NOT NULL,
        takeover TINYINT NOT NULL DEFAULT 0, outcome LONGTEXT NULL, PRIMARY KEY (id)) ENGINE = InnoDB`,
    );
    await Promise.all([migrateMysql(newPool(), { table: name }), migrateMysql(newPool(), { table: name })]);
    await migrateMysql(admin, { table: name }); // idempotent
    const [indexes] = await admin.query(`SHOW INDEX FROM \`${name}\` WHERE Column_name = 'expires_at'`);
    expect((indexes as Array<{ Key_name: string }>).map((r) => r.Key_name)).toEqual([`${name}_expires_at`]);
  });

  it('leaves no open handle: a process with a purging store exits by itself, closed or not', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'oncely-mysql-exit-'));
    try {
      const name = await freshTable();
      const storeUrl = pathToFileURL(resolve('src/stores/mysql.ts')).href;
      const mysqlUrl = pathToFileURL(resolve('node_modules/mysql2/promise.js')).href;
      for (const closeIt of [true, false]) {
        const script = join(dir, `exit-${closeIt}.mjs`);
        writeFileSync(
          script,
          `import mysql from ${JSON.stringify(mysqlUrl)};
import { mysqlStore } from ${JSON.stringify(storeUrl)};
const pool = mysql.createPool(${JSON.stringify({ ...config, connectionLimit: 2 })});
const store = mysqlStore({ pool, table: ${JSON.stringify(name)}, purge: { intervalMs: 20 } });
const claim = await store.claim('a-${closeIt}', { fingerprint: null, leaseMs: 1000, ttlMs: 10 });
await store.complete('a-${closeIt}', claim.token, 'x', 10);
await new Promise((r) => setTimeout(r, 150));
${closeIt ? 'await store.close();' : ''}
await pool.end();
process.stdout.write('done');
`,
        );
        const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', script], {
          cwd: resolve('.'),
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        let out = '';
        child.stdout.on('data', (chunk: Buffer) => {
          out += chunk.toString();
        });
        const code = await new Promise<number | null>((resolveExit, reject) => {
          const timer = setTimeout(() => {
            child.kill('SIGKILL');
            reject(new Error(`the process did not exit by itself (close: ${closeIt})`));
          }, 15_000);
          child.on('exit', (exitCode) => {
            clearTimeout(timer);
            resolveExit(exitCode);
          });
        });
        expect(code).toBe(0);
        expect(out).toBe('done');
      }
      expect(await rows(name)).toBe(0); // the children's background purge ran
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 40_000);
});

describe('mysql store: process sessions', () => {
  const LIVE = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };
  const sessionId = (): string => `s-${randomBytes(8).toString('hex')}`;

  it("refuses takeoverFrom while the owner's session is alive, checked in the claim statement itself (both forms)", async () => {
    for (const [name, returning] of [
      [table, true],
      [plainTable, false],
    ] as const) {
      const store = mysqlStore({ pool: admin, table: name, returning, purge: false });
      const owner = sessionId();
      await store.sessions.heartbeat(owner, 60_000);
      const id = newId();
      const held = await store.claim(id, { ...LIVE, owner });
      if (held.status !== 'acquired') throw new Error('expected acquired');
      expect(await store.claim(id, { ...LIVE, owner: sessionId(), takeoverFrom: owner })).toMatchObject({ status: 'in_progress', owner });
      await store.sessions.end(owner);
      expect(await store.claim(id, { ...LIVE, owner: sessionId(), takeoverFrom: owner })).toMatchObject({ status: 'acquired', takeover: true });
      expect(await store.complete(id, held.token, 'stale', 60_000)).toBe(false);
    }
  });

  it('heartbeat, alive and end are one statement each, on the sessions table named after the records table, on the server clock', async () => {
    const pool = counted(newPool());
    const store = mysqlStore({ pool, table, returning: true, purge: false });
    expect(store.sessionsTable).toBe(`\`${table}_sessions\``);
    const session = sessionId();
    const [clock] = await admin.query("SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(3)) DIV 1000 AS ms");
    const before = Number((clock as Array<{ ms: number }>)[0]!.ms);
    await store.sessions.heartbeat(session, 1_000);
    expect(pool.count).toBe(1);
    const [rows] = await admin.query(`SELECT expires_at FROM \`${table}_sessions\` WHERE id = ?`, [session]);
    const expiresAt = Number((rows as Array<{ expires_at: number }>)[0]!.expires_at);
    expect(expiresAt).toBeGreaterThanOrEqual(before + 1_000);
    expect(expiresAt).toBeLessThan(before + 1_000 + 2_000);
    expect(await store.sessions.alive(session)).toBe(true);
    expect(pool.count).toBe(2);
    await store.sessions.end(session);
    expect(pool.count).toBe(3);
    expect(await store.sessions.alive(session)).toBe(false);
  });

  it('purges sessions that ended without end() along with the expired records', async () => {
    const name = await freshTable();
    const store = mysqlStore({ pool: admin, table: name, purge: false });
    const gone = sessionId();
    const live = sessionId();
    await store.sessions.heartbeat(gone, 20);
    await store.sessions.heartbeat(live, 60_000);
    await sleep(100);
    await purgeExpiredRecords(store);
    const [rows] = await admin.query(`SELECT CAST(id AS CHAR) AS id FROM \`${name}_sessions\``);
    expect((rows as Array<{ id: string }>).map((r) => r.id)).toEqual([live]);
  });

  it('adds the owner column and the sessions table to a table made before sessions, from several processes at once', async () => {
    const name = `oncely_old_${randomBytes(6).toString('hex')}`;
    purgeTables.push(name);
    await admin.query(
      `CREATE TABLE \`${name}\` (id VARBINARY(128) NOT NULL, state TINYINT NOT NULL, token VARBINARY(64) NULL,
        fingerprint VARBINARY(1024) NULL, lease_until BIGINT NOT NULL, expires_at BIGINT NOT NULL,
        takeover TINYINT NOT NULL DEFAULT 0, outcome LONGTEXT NULL, PRIMARY KEY (id), KEY (expires_at)) ENGINE = InnoDB`,
    );
    const before = mysqlStore({ pool: admin, table: name, purge: false });
    const refused = await before.claim(newId(), LIVE).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(StoreUnavailableError);
    expect((refused as Error).message).toMatch(/run migrateMysql/);
    await Promise.all(Array.from({ length: 3 }, () => migrateMysql(newPool(), { table: name })));
    await migrateMysql(admin, { table: name }); // idempotent
    const [columns] = await admin.query(`SHOW COLUMNS FROM \`${name}\` LIKE 'owner'`);
    expect(columns as unknown[]).toHaveLength(1);
    const store = mysqlStore({ pool: admin, table: name, purge: false });
    const owner = sessionId();
    await store.sessions.heartbeat(owner, 60_000);
    const id = newId();
    expect((await store.claim(id, { ...LIVE, owner })).status).toBe('acquired');
    expect(await store.claim(id, LIVE)).toMatchObject({ status: 'in_progress', owner });
  });
});

describe('mysql store: transactional mode', () => {
  const insert = (connection: mysql.PoolConnection, key: string): Promise<unknown> =>
    connection.execute(`INSERT INTO \`${business}\` (\`key\`, amount) VALUES (?, 7)`, [key]);

  it('engine: the business write commits with the completion; a throw rolls it back and releases the claim', async () => {
    const engine = new Engine({ store: mysqlStore({ pool: newPool(), table, purge: false }) });
    try {
      const id = newId();
      const begun = await engine.begin({ id, fingerprint: null });
      if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
      const performed = await begun.claim.perform({
        run: async (claim) => {
          await insert(await claim.transaction<mysql.PoolConnection>(), id);
          return { ok: true };
        },
        settle: (value) => ({ kind: 'complete', outcome: JSON.stringify(value) }),
      });
      expect(performed).toMatchObject({ ok: true, settled: 'stored' });
      expect(await transactionWrites.exists(id)).toBe(true);
      expect(await engine.begin({ id, fingerprint: null })).toMatchObject({ kind: 'replay' });

      const failing = newId();
      const again = await engine.begin({ id: failing, fingerprint: null });
      if (again.kind !== 'run') throw new Error('expected run');
      const failed = await again.claim.perform({
        run: async (claim) => {
          await insert(await claim.transaction<mysql.PoolConnection>(), failing);
          throw new Error('card declined');
        },
        settle: () => ({ kind: 'complete', outcome: 'never' }),
      });
      expect(failed).toMatchObject({ ok: false, settled: 'released' });
      expect(await transactionWrites.exists(failing)).toBe(false);
    } finally {
      await engine.close();
    }
  });

  it('a transaction ended inside the handler (COMMIT, or a deadlock rolling it back) is refused: the completion is not stored alone', async () => {
    const store = mysqlStore({ pool: newPool(), table, purge: false });
    for (const ending of ['COMMIT', 'ROLLBACK']) {
      const id = newId();
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      const transaction = await store.transactions!.open(id, claim.token);
      const connection = transaction.client as unknown as mysql.PoolConnection;
      await connection.query(ending);
      await insert(connection, id); // autocommitted: the transaction is over
      const error = await transaction.commit('done', 60_000).catch((e: unknown) => e);
      expect(error, ending).toBeInstanceOf(RolledBackError);
      expect((await store.get(id))?.state, 'the record was not completed').toBe('in_progress');
    }
    const engine = new Engine({ store });
    try {
      const id = newId();
      const begun = await engine.begin({ id, fingerprint: null });
      if (begun.kind !== 'run') throw new Error('expected run');
      const performed = await begun.claim.perform({
        run: async (claim) => {
          const connection = await claim.transaction<mysql.PoolConnection>();
          await connection.query('ROLLBACK');
          return 'charged?';
        },
        settle: (value) => ({ kind: 'complete', outcome: value }),
      });
      expect(performed.settled).toBe('rolled_back');
      expect(await store.get(id)).toBeNull();
    } finally {
      await engine.close();
    }
  });

  it('under REPEATABLE READ (the default), the fenced completion reads the current record: a renewal after the snapshot is fine, a takeover after it fences', async () => {
    const store = mysqlStore({ pool: newPool(), table, purge: false });
    const other = mysqlStore({ pool: newPool(), table, purge: false });
    const renewed = newId();
    const claim = await store.claim(renewed, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const transaction = await store.transactions!.open(renewed, claim.token);
    const connection = transaction.client as unknown as mysql.PoolConnection;
    await connection.query(`SELECT COUNT(*) FROM \`${table}\``); // the snapshot
    await insert(connection, renewed);
    expect(await other.renew(renewed, claim.token, 30_000)).toBe(true);
    expect(await transaction.commit('done', 60_000)).toBe(true);
    expect(await transactionWrites.exists(renewed)).toBe(true);

    const taken = newId();
    const old = await store.claim(taken, { ...LONG, leaseMs: 100 });
    if (old.status !== 'acquired') throw new Error('expected acquired');
    const stale = await store.transactions!.open(taken, old.token);
    const staleConnection = stale.client as unknown as mysql.PoolConnection;
    await staleConnection.query(`SELECT token FROM \`${table}\` WHERE id = ?`, [taken]); // the snapshot still shows the old token
    await insert(staleConnection, taken);
    await sleep(250);
    expect((await other.claim(taken, LONG)).status).toBe('acquired');
    expect(await stale.commit('stale', 60_000)).toBe(false);
    expect(await transactionWrites.exists(taken)).toBe(false);
  });

  it('a single connection has no transactional mode; transactionPool gives it one, and every connection goes back to that pool', async () => {
    const connection = await mysql.createConnection(config);
    const transactionPool = mysql.createPool({ ...config, connectionLimit: 1 });
    pools.push(transactionPool);
    try {
      expect(mysqlStore({ pool: connection, table, purge: false }).transactions).toBeUndefined();
      const store = mysqlStore({ pool: connection, table, purge: false, transactionPool });
      // One connection in the pool: a transaction that kept it would hang the next one.
      for (let i = 0; i < 6; i++) {
        const id = newId();
        const claim = await store.claim(id, LONG);
        if (claim.status !== 'acquired') throw new Error('expected acquired');
        const transaction = await store.transactions!.open(id, claim.token);
        await insert(transaction.client as unknown as mysql.PoolConnection, id);
        if (i % 3 === 0) expect(await transaction.commit('ok', 60_000)).toBe(true);
        else if (i % 3 === 1) await transaction.rollback();
        else {
          expect(await store.release(id, claim.token)).toBe(true);
          expect(await transaction.commit('fenced', 60_000)).toBe(false);
        }
        expect(await transactionWrites.exists(id)).toBe(i % 3 === 0);
      }
    } finally {
      await connection.end();
    }
  });
});
