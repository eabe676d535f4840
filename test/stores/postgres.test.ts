import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import {
  migratePostgres,
  type PgQueryable,
  type PostgresStore,
  postgresSchemaSql,
  postgresStore,
  purgeExpiredRecords,
} from 'oncely/stores/postgres';
import { Engine, RolledBackError, StoreUnavailableError } from 'oncely';
import { defineStoreConformance } from 'oncely/testing';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const config = {
  host: process.env.PGHOST ?? '127.0.0.1',
  port: Number(process.env.PGPORT ?? 5432),
  user: process.env.PGUSER ?? 'postgres',
  database: process.env.PGDATABASE ?? 'test',
  max: 5,
};
const suffix = randomBytes(6).toString('hex');
const table = `oncely_test_${suffix}`;
/** The business table of the transactional-mode cases. */
const business = `oncely_business_${suffix}`;
const schema = `oncely_schema_${suffix}`;
const pools: pg.Pool[] = [];
const newPool = (): pg.Pool => {
  const pool = new pg.Pool(config);
  pool.on('error', () => {});
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
  await migratePostgres(admin, { table: name });
  return name;
}
async function rows(name: string): Promise<number> {
  return (await admin.query(`SELECT count(*)::int AS n FROM "${name}"`)).rows[0].n;
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
async function completed(store: PostgresStore, id: string, ttlMs: number): Promise<void> {
  const claim = await store.claim(id, LONG);
  if (claim.status !== 'acquired') throw new Error('expected acquired');
  expect(await store.complete(id, claim.token, 'x', ttlMs)).toBe(true);
}
/** Insert `n` records that expired a minute ago, straight in SQL (a backlog). */
async function backlog(name: string, n: number): Promise<void> {
  await admin.query(
    `INSERT INTO "${name}" (id, state, token, fingerprint, lease_until, expires_at, outcome)
     SELECT 'expired-' || g, 1, NULL, NULL, 0, (extract(epoch FROM now()) * 1000)::bigint - 60000 + g % 1000,
            convert_to('{"status":201}', 'UTF8')
       FROM generate_series(1, $1::int) g`,
    [n],
  );
  await admin.query(`ANALYZE "${name}"`);
}

/** Wrap a pool so that every query (one round trip each: named statements are prepared on the same trip) is counted. Stores over it run no background purge, whose statements would count too. */
function counted(pool: PgQueryable): PgQueryable & { count: number } {
  const wrapper = {
    count: 0,
    query(query: Parameters<PgQueryable['query']>[0]) {
      wrapper.count++;
      return pool.query(query);
    },
  };
  return wrapper;
}

beforeAll(async () => {
  await migratePostgres(admin, { table });
  await admin.query(`CREATE TABLE "${business}" (key text PRIMARY KEY, amount int NOT NULL)`);
});

afterAll(async () => {
  for (const name of [table, business, ...purgeTables]) {
    await admin.query(`DROP TABLE IF EXISTS "${name}"`);
    await admin.query(`DROP TABLE IF EXISTS "${name}_sessions"`);
  }
  await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await Promise.all(pools.map((pool) => pool.end()));
});

defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  {
    name: 'postgres',
    store: () => postgresStore({ pool: newPool(), table, purge: false }),
    anotherClient: () => postgresStore({ pool: newPool(), table, purge: false }),
    transactionWrites: {
      async write(client, key) {
        await (client as pg.PoolClient).query(`INSERT INTO "${business}" (key, amount) VALUES ($1, 1)`, [key]);
      },
      async exists(key) {
        return (await admin.query(`SELECT 1 FROM "${business}" WHERE key = $1`, [key])).rowCount === 1;
      },
    },
  },
);

describe('postgres store', () => {
  it('uses one round trip per operation', async () => {
    const pool = counted(newPool());
    const store = postgresStore({ pool, table, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(pool.count).toBe(1);
    expect(await store.renew(id, claim.token, 30_000)).toBe(true);
    expect(pool.count).toBe(2);
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'in_progress' });
    expect(pool.count).toBe(3);
    expect(await store.complete(id, claim.token, 'done', 60_000)).toBe(true);
    expect(pool.count).toBe(4);
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'completed', record: { outcome: 'done' } });
    expect(pool.count).toBe(5);
    expect(await store.get(id)).toMatchObject({ state: 'completed' });
    expect(pool.count).toBe(6);
    const other = newId();
    const second = await store.claim(other, LONG);
    if (second.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.release(other, second.token)).toBe(true);
    expect(pool.count).toBe(8);
  });

  it('answers a replay with a plain read: it neither waits for a row lock held on the record nor takes one', async () => {
    const store = postgresStore({ pool: newPool(), table, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(id, claim.token, 'done', 60_000)).toBe(true);
    // Another transaction holds the completed row locked (a purge, an operator's UPDATE, a long report).
    const holder = await admin.connect();
    try {
      await holder.query('BEGIN');
      await holder.query(`SELECT 1 FROM "${table}" WHERE id = $1 FOR UPDATE`, [id]);
      // An INSERT … ON CONFLICT DO UPDATE would lock the row, and so wait here until the holder ends.
      const replay = store.claim(id, LONG);
      const answered = await Promise.race([replay.then(() => 'answered'), sleep(1_000).then(() => 'waited')]);
      expect(answered).toBe('answered');
      expect(await replay).toMatchObject({ status: 'completed', record: { outcome: 'done' } });
      // And the replays of a batch too.
      expect(await store.claimMany!([id], LONG)).toMatchObject([{ status: 'completed' }]);
    } finally {
      await holder.query('ROLLBACK');
      holder.release();
    }
  });

  it('reads deadlines from the server clock', async () => {
    const store = postgresStore({ pool: admin, table });
    const { rows } = await admin.query('SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms');
    const before = Number(rows[0].ms);
    const claim = await store.claim(newId(), { ...LONG, leaseMs: 5000 });
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(claim.leaseUntil).toBeGreaterThanOrEqual(before + 5000);
    expect(claim.leaseUntil).toBeLessThan(before + 5000 + 2000);
  });

  it('settles 100 concurrent claims over 25 separate connections with one winner, and counts the re-runs', async () => {
    // 25, not 100: the shared server's max_connections serves the parallel test files too.
    const clients = await Promise.all(
      Array.from({ length: 25 }, async () => {
        const client = new pg.Client(config);
        client.on('error', () => {});
        await client.connect();
        return client;
      }),
    );
    try {
      for (let round = 0; round < 3; round++) {
        const id = newId();
        const counters = clients.map((client) => counted(client));
        const stores = counters.map((c) => postgresStore({ pool: c, table, purge: false }));
        const results = await Promise.all(Array.from({ length: 100 }, (_, i) => stores[i % stores.length]!.claim(id, LONG)));
        expect(results.filter((r) => r.status === 'acquired')).toHaveLength(1);
        expect(results.filter((r) => r.status === 'in_progress')).toHaveLength(99);
        const trips = counters.reduce((sum, c) => sum + c.count, 0);
        // One statement each, plus one re-run for each claim whose snapshot
        // predates the winner's commit.
        expect(trips).toBeLessThanOrEqual(200);
        console.log(`postgres: 100 concurrent claims took ${trips} statements`);
      }
    } finally {
      await Promise.all(clients.map((client) => client.end()));
    }
  });

  it('claims a batch in one round trip, a repeated id once', async () => {
    const pool = counted(newPool());
    const store = postgresStore({ pool, table, purge: false });
    const done = newId();
    const claimed = await store.claim(done, LONG);
    if (claimed.status !== 'acquired') throw new Error('expected acquired');
    await store.complete(done, claimed.token, 'done', 60_000);
    const fresh = Array.from({ length: 50 }, newId);
    pool.count = 0;
    const results = await store.claimMany!([...fresh, done, fresh[0]!], LONG);
    expect(pool.count).toBe(1);
    expect(results.slice(0, 50).every((r) => r.status === 'acquired')).toBe(true);
    expect(results[50]).toMatchObject({ status: 'completed', record: { outcome: 'done' } });
    expect(results[51]).toMatchObject({ status: 'in_progress', fingerprint: LONG.fingerprint });
    const first = results[0]!;
    if (first.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(fresh[0]!, first.token, 'ok', 60_000)).toBe(true);
  });

  it('gives one winner per id among concurrent overlapping batches in different orders', async () => {
    const ids = Array.from({ length: 30 }, newId);
    const stores = Array.from({ length: 4 }, () => postgresStore({ pool: newPool(), table }));
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

  it('honours the schema and table options', async () => {
    const custom = `custom_${suffix}`;
    await migratePostgres(admin, { schema, table: custom });
    await migratePostgres(admin, { schema, table: custom }); // idempotent
    const store = postgresStore({ pool: admin, schema, table: custom });
    expect(store.table).toBe(`"${schema}"."${custom}"`);
    const id = newId();
    const claim = await store.claim(id, LONG);
    expect(claim.status).toBe('acquired');
    const { rows } = await admin.query(`SELECT count(*)::int AS n FROM "${schema}"."${custom}" WHERE id = $1`, [id]);
    expect(rows[0].n).toBe(1);
    const index = await admin.query('SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = $2', [
      schema,
      custom,
    ]);
    expect(index.rows.map((r) => r.indexname)).toContain(`${custom}_expires_at_idx`);
    // The same id in another table is another record.
    const elsewhere = await postgresStore({ pool: admin, table }).claim(id, LONG);
    expect(elsewhere.status).toBe('acquired');
  });

  it('migrates safely from several processes at once', async () => {
    const racing = `racing_${suffix}`;
    const racers = Array.from({ length: 6 }, () => newPool());
    try {
      await Promise.all(racers.map((pool) => migratePostgres(pool, { schema, table: racing })));
      const { rows } = await admin.query('SELECT count(*)::int AS n FROM pg_tables WHERE schemaname = $1 AND tablename = $2', [
        schema,
        racing,
      ]);
      expect(rows[0].n).toBe(1);
    } finally {
      await admin.query(`DROP TABLE IF EXISTS "${schema}"."${racing}"`);
    }
  });

  it('refuses schema and table names that are not plain identifiers', () => {
    expect(() => postgresStore({ pool: admin, table: 'x"; drop table y; --' })).toThrow(/table name/);
    expect(() => postgresStore({ pool: admin, schema: 'a.b' })).toThrow(/schema name/);
    expect(() => postgresSchemaSql({ table: '' })).toThrow(/table name/);
  });

  it('accepts durations that are not whole milliseconds', async () => {
    const store = postgresStore({ pool: admin, table });
    const id = newId();
    const claim = await store.claim(id, { fingerprint: null, leaseMs: 1500.6, ttlMs: 60_000.4 });
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(Number.isInteger(claim.leaseUntil)).toBe(true);
    expect(await store.renew(id, claim.token, 2500.5)).toBe(true);
    expect(await store.complete(id, claim.token, 'ok', 1000.5)).toBe(true);
  });

  it('stores an outcome of several MiB', async () => {
    const store = postgresStore({ pool: admin, table });
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
    const store = postgresStore({ pool: newPool(), table: name, purge: { intervalMs: 30, batch: 2 } });
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
    const store = postgresStore({ pool: newPool(), table: name, purge: false });
    await backlog(name, 20_000);
    const live = newId();
    await completed(store, live, 60_000);
    const plan = await admin.query(
      `EXPLAIN SELECT id FROM "${name}" WHERE expires_at <= 0 ORDER BY expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED`,
    );
    expect(plan.rows.map((r) => r['QUERY PLAN']).join('\n')).toMatch(/Index Scan using "?oncely_purge_\w+_expires_at_idx/);
    // One batch deletes the oldest records first: 20 records share each of 1000 deadlines.
    const oldest = async (): Promise<number> => Number((await admin.query(`SELECT min(expires_at) AS m FROM "${name}"`)).rows[0].m);
    const before = await oldest();
    expect(await store.purgeExpired(1000)).toBe(1000);
    expect(await oldest()).toBe(before + 50);
    const report = await purgeExpiredRecords(store, { batch: 1000 });
    expect(report).toMatchObject({ deleted: 19_000, batches: 20, done: true });
    expect(await rows(name)).toBe(1);
    expect(await store.get(live)).toMatchObject({ state: 'completed' });
  });

  it('lets several processes purge one table at once: SKIP LOCKED, nobody waits, every record deleted once', async () => {
    const name = await freshTable();
    await backlog(name, 20_000);
    const stores = Array.from({ length: 4 }, () => postgresStore({ pool: newPool(), table: name, purge: false }));
    const reports = await Promise.all(stores.map((store) => purgeExpiredRecords(store, { batch: 500 })));
    expect(reports.reduce((sum, r) => sum + r.deleted, 0)).toBe(20_000);
    expect(await rows(name)).toBe(0);
  });

  it('adds the expires_at index to a table created without it', async () => {
    const name = `oncely_old_${randomBytes(6).toString('hex')}`;
    purgeTables.push(name);
    await admin.query(
      `CREATE TABLE "${name}" (id varchar(128) PRIMARY KEY, state smallint NOT NULL, token text, fingerprint text,
        lease_until bigint NOT NULL, expires_at bigint NOT NULL, takeover boolean NOT NULL DEFAULT false, outcome bytea)`,
    );
    await migratePostgres(admin, { table: name });
    const index = await admin.query("SELECT indexname FROM pg_indexes WHERE tablename = $1 AND indexdef LIKE '%(expires_at)'", [
      name,
    ]);
    expect(index.rows.map((r) => r.indexname)).toEqual([`${name}_expires_at_idx`]);
  });

  it('leaves no open handle: a process with a purging store exits by itself, closed or not', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'oncely-pg-exit-'));
    try {
      const name = await freshTable();
      const storeUrl = pathToFileURL(resolve('src/stores/postgres.ts')).href;
      const pgUrl = pathToFileURL(resolve('node_modules/pg/lib/index.js')).href;
      for (const closeIt of [true, false]) {
        const script = join(dir, `exit-${closeIt}.mjs`);
        writeFileSync(
          script,
          `import pg from ${JSON.stringify(pgUrl)};
import { postgresStore } from ${JSON.stringify(storeUrl)};
const pool = new pg.Pool(${JSON.stringify({ ...config, max: 2 })});
pool.on('error', () => {});
const store = postgresStore({ pool, table: ${JSON.stringify(name)}, purge: { intervalMs: 20 } });
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

  it('reports a failed drain to onError and goes on purging', async () => {
    const name = await freshTable();
    let failures = 0;
    let purges = 0;
    const real = newPool();
    // The first two purge statements fail, as a dropped connection would.
    const flaky: PgQueryable = {
      query(config) {
        if (config.name?.endsWith('purge') && ++purges <= 2) return Promise.reject(new Error('boom'));
        return real.query(config);
      },
    };
    const store = postgresStore({ pool: flaky, table: name, purge: { intervalMs: 20, onError: () => failures++ } });
    await completed(store, newId(), 10);
    await until(async () => (await rows(name)) === 0);
    expect(failures).toBe(2);
    await store.close();
  });
});

describe('postgres store: process sessions', () => {
  const LIVE = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };
  const sessionId = (): string => `s-${randomBytes(8).toString('hex')}`;

  it("refuses takeoverFrom while the owner's session is alive, checked in the claim statement itself", async () => {
    const store = postgresStore({ pool: admin, table, purge: false });
    const owner = sessionId();
    await store.sessions.heartbeat(owner, 60_000);
    const id = newId();
    const held = await store.claim(id, { ...LIVE, owner });
    if (held.status !== 'acquired') throw new Error('expected acquired');
    // The caller believed it dead (it looked before a heartbeat came back): refused.
    expect(await store.claim(id, { ...LIVE, owner: sessionId(), takeoverFrom: owner })).toMatchObject({ status: 'in_progress', owner });
    await store.sessions.end(owner);
    expect(await store.claim(id, { ...LIVE, owner: sessionId(), takeoverFrom: owner })).toMatchObject({ status: 'acquired', takeover: true });
    expect(await store.complete(id, held.token, 'stale', 60_000)).toBe(false);
  });

  it('heartbeat, alive and end are one round trip each, on the sessions table named after the records table', async () => {
    const pool = counted(newPool());
    const store = postgresStore({ pool, table, purge: false });
    expect(store.sessionsTable).toBe(`"${table}_sessions"`);
    const session = sessionId();
    await store.sessions.heartbeat(session, 5_000);
    expect(pool.count).toBe(1);
    expect(await store.sessions.alive(session)).toBe(true);
    expect(pool.count).toBe(2);
    await store.sessions.end(session);
    expect(pool.count).toBe(3);
    const { rows: left } = await admin.query(`SELECT count(*)::int AS n FROM "${table}_sessions" WHERE id = $1`, [session]);
    expect(left[0].n).toBe(0);
  });

  it('keeps session deadlines on the server clock', async () => {
    const store = postgresStore({ pool: admin, table, purge: false });
    const session = sessionId();
    const before = Number((await admin.query('SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms')).rows[0].ms);
    await store.sessions.heartbeat(session, 1_000);
    const { rows } = await admin.query(`SELECT expires_at FROM "${table}_sessions" WHERE id = $1`, [session]);
    expect(Number(rows[0].expires_at)).toBeGreaterThanOrEqual(before + 1_000);
    expect(Number(rows[0].expires_at)).toBeLessThan(before + 1_000 + 2_000);
    await store.sessions.end(session);
  });

  it('purges sessions that ended without end() along with the expired records', async () => {
    const name = await freshTable();
    const store = postgresStore({ pool: admin, table: name, purge: false });
    const gone = sessionId();
    const live = sessionId();
    await store.sessions.heartbeat(gone, 20);
    await store.sessions.heartbeat(live, 60_000);
    await sleep(100);
    await purgeExpiredRecords(store);
    const { rows } = await admin.query(`SELECT id FROM "${name}_sessions"`);
    expect(rows.map((r) => r.id)).toEqual([live]);
  });

  it('adds the owner column and the sessions table to a table made before sessions, from several processes at once', async () => {
    const name = `oncely_old_${randomBytes(6).toString('hex')}`;
    purgeTables.push(name);
    await admin.query(
      `CREATE TABLE "${name}" (id varchar(128) PRIMARY KEY, state smallint NOT NULL, token text, fingerprint text,
        lease_until bigint NOT NULL, expires_at bigint NOT NULL, takeover boolean NOT NULL DEFAULT false, outcome bytea)`,
    );
    const before = postgresStore({ pool: admin, table: name, purge: false });
    const refused = await before.claim(newId(), LIVE).catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(StoreUnavailableError);
    expect((refused as Error).message).toMatch(/run migratePostgres/);
    const racers = Array.from({ length: 4 }, () => newPool());
    await Promise.all(racers.map((pool) => migratePostgres(pool, { table: name })));
    await migratePostgres(admin, { table: name }); // idempotent
    const { rows } = await admin.query(
      "SELECT column_name FROM information_schema.columns WHERE table_name = $1 AND column_name = 'owner'",
      [name],
    );
    expect(rows).toHaveLength(1);
    const store = postgresStore({ pool: admin, table: name, purge: false });
    const owner = sessionId();
    await store.sessions.heartbeat(owner, 60_000);
    const id = newId();
    expect((await store.claim(id, { ...LIVE, owner })).status).toBe('acquired');
    expect(await store.claim(id, LIVE)).toMatchObject({ status: 'in_progress', owner });
  });
});

describe('postgres store: transactional mode', () => {
  const insert = (client: pg.PoolClient, key: string): Promise<unknown> =>
    client.query(`INSERT INTO "${business}" (key, amount) VALUES ($1, 7)`, [key]);
  const exists = async (key: string): Promise<boolean> =>
    (await admin.query(`SELECT 1 FROM "${business}" WHERE key = $1`, [key])).rowCount === 1;

  it('engine: the business write commits with the completion; a throw rolls it back and releases the claim', async () => {
    const pool = newPool();
    const engine = new Engine({ store: postgresStore({ pool, table, purge: false }) });
    try {
      const id = newId();
      const begun = await engine.begin({ id, fingerprint: null });
      if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
      const performed = await begun.claim.perform({
        run: async (claim) => {
          const client = await claim.transaction<pg.PoolClient>();
          expect(await claim.transaction<pg.PoolClient>()).toBe(client); // one transaction per claim
          await insert(client, id);
          return { ok: true };
        },
        settle: (value) => ({ kind: 'complete', outcome: JSON.stringify(value) }),
      });
      expect(performed).toMatchObject({ ok: true, settled: 'stored' });
      expect(await exists(id)).toBe(true);
      expect(await engine.begin({ id, fingerprint: null })).toMatchObject({ kind: 'replay' });

      const failing = newId();
      const again = await engine.begin({ id: failing, fingerprint: null });
      if (again.kind !== 'run') throw new Error('expected run');
      const failed = await again.claim.perform({
        run: async (claim) => {
          await insert(await claim.transaction<pg.PoolClient>(), failing);
          throw new Error('card declined');
        },
        settle: () => ({ kind: 'complete', outcome: 'never' }),
      });
      expect(failed).toMatchObject({ ok: false, settled: 'released' });
      expect(await exists(failing)).toBe(false);
      expect(await engine.begin({ id: failing, fingerprint: null })).toMatchObject({ kind: 'run' });
    } finally {
      await engine.close();
    }
    expect(pool.idleCount, 'every client went back to the pool').toBe(pool.totalCount);
  });

  it('a failed statement caught inside the handler aborts the transaction: the commit throws RolledBackError and the engine answers rolled_back', async () => {
    const store = postgresStore({ pool: newPool(), table, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const transaction = await store.transactions!.open(id, claim.token);
    const client = transaction.client as unknown as pg.PoolClient;
    await insert(client, id);
    await client.query('SELECT 1/0').catch(() => undefined); // caught, but the transaction is aborted
    const error = await transaction.commit('done', 60_000).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RolledBackError);
    expect(await exists(id)).toBe(false);
    expect((await store.get(id))?.state).toBe('in_progress');

    const engine = new Engine({ store });
    try {
      const other = newId();
      const begun = await engine.begin({ id: other, fingerprint: null });
      if (begun.kind !== 'run') throw new Error('expected run');
      const performed = await begun.claim.perform({
        run: async (c) => {
          const tx = await c.transaction<pg.PoolClient>();
          await insert(tx, other);
          await tx.query('SELECT 1/0').catch(() => undefined);
          return 'charged?';
        },
        settle: (value) => ({ kind: 'complete', outcome: value }),
      });
      expect(performed.settled).toBe('rolled_back');
      expect(await exists(other)).toBe(false);
      expect(await store.get(other), 'released: a retry runs').toBeNull();
    } finally {
      await engine.close();
    }
  });

  it('a renewal during the transaction does not disturb the completion (READ COMMITTED)', async () => {
    const store = postgresStore({ pool: newPool(), table, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const transaction = await store.transactions!.open(id, claim.token);
    const client = transaction.client as unknown as pg.PoolClient;
    await client.query(`SELECT count(*) FROM "${table}"`); // the transaction has read the record table
    await insert(client, id);
    expect(await store.renew(id, claim.token, 30_000)).toBe(true);
    expect(await transaction.commit('done', 60_000)).toBe(true);
    expect(await exists(id)).toBe(true);
  });

  it('under REPEATABLE READ chosen by the handler, a renewal after its snapshot makes the commit fail: nothing is stored', async () => {
    const store = postgresStore({ pool: newPool(), table, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const transaction = await store.transactions!.open(id, claim.token);
    const client = transaction.client as unknown as pg.PoolClient;
    await client.query('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ');
    await insert(client, id); // the snapshot is taken here
    expect(await store.renew(id, claim.token, 30_000)).toBe(true);
    const error = await transaction.commit('done', 60_000).catch((e: unknown) => e);
    expect((error as { code?: string }).code).toBe('40001'); // could not serialize access due to concurrent update
    expect(await exists(id)).toBe(false);
    expect((await store.get(id))?.state).toBe('in_progress');
  });

  it('a single pg.Client has no transactional mode; transactionPool gives it one, and the clients go back to that pool', async () => {
    const client = new pg.Client(config);
    client.on('error', () => {});
    await client.connect();
    const transactionPool = newPool();
    try {
      expect(postgresStore({ pool: client, table, purge: false }).transactions).toBeUndefined();
      const store = postgresStore({ pool: client, table, purge: false, transactionPool });
      for (let i = 0; i < 6; i++) {
        const id = newId();
        const claim = await store.claim(id, LONG);
        if (claim.status !== 'acquired') throw new Error('expected acquired');
        const transaction = await store.transactions!.open(id, claim.token);
        await insert(transaction.client as unknown as pg.PoolClient, id);
        if (i % 3 === 0) expect(await transaction.commit('ok', 60_000)).toBe(true);
        else if (i % 3 === 1) await transaction.rollback();
        else {
          expect(await store.release(id, claim.token)).toBe(true);
          expect(await transaction.commit('fenced', 60_000)).toBe(false);
        }
        expect(await exists(id)).toBe(i % 3 === 0);
      }
      expect(transactionPool.idleCount).toBe(transactionPool.totalCount);
      expect(transactionPool.totalCount).toBeGreaterThan(0);
    } finally {
      await client.end();
    }
  });
});
