import { randomBytes } from 'node:crypto';
import { migratePostgres, type PgQueryable, postgresSchemaSql, postgresStore } from 'oncely/stores/postgres';
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

/** Wrap a pool so that every query (one round trip each: named statements are prepared on the same trip) is counted. */
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
});

afterAll(async () => {
  await admin.query(`DROP TABLE IF EXISTS "${table}"`);
  await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await Promise.all(pools.map((pool) => pool.end()));
});

defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  {
    name: 'postgres',
    store: () => postgresStore({ pool: newPool(), table }),
    anotherClient: () => postgresStore({ pool: newPool(), table }),
  },
);

describe('postgres store', () => {
  it('uses one round trip per operation', async () => {
    const pool = counted(newPool());
    const store = postgresStore({ pool, table });
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
        const stores = counters.map((c) => postgresStore({ pool: c, table }));
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
    const store = postgresStore({ pool, table });
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
});
