import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../engine/engine.js';
import { ConfigError, RolledBackError, StoreUnavailableError } from '../errors/index.js';
import { defineStoreConformance } from '../testing/index.js';
import { purgeExpiredRecords, type SqliteStore, sqliteStore } from './sqlite.js';

const dir = mkdtempSync(join(tmpdir(), 'oncely-sqlite-'));
const file = join(dir, 'conformance.db');
const opened: Database.Database[] = [];
const stores: SqliteStore[] = [];
const open = (path: string): Database.Database => {
  const db = new Database(path);
  opened.push(db);
  return db;
};
const make = (path: string, options: Partial<Parameters<typeof sqliteStore>[0]> = {}): SqliteStore => {
  const store = sqliteStore({ database: open(path), ...options });
  stores.push(store);
  return store;
};
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** Wait until `check` holds (polling), or fail after `ms`. */
async function until(check: () => boolean, ms = 5_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await sleep(10);
  }
}
/** Claim and complete `id` with a retention of `ttlMs`. */
async function completed(store: SqliteStore, id: string, ttlMs: number): Promise<void> {
  const claim = await store.claim(id, LONG);
  if (claim.status !== 'acquired') throw new Error('expected acquired');
  expect(await store.complete(id, claim.token, 'x', ttlMs)).toBe(true);
}
const newId = (): string => randomBytes(32).toString('hex');
const LONG = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };

afterAll(async () => {
  for (const store of stores) await store.close();
  for (const db of opened) if (db.open) db.close();
  rmSync(dir, { recursive: true, force: true });
});

const conformanceDb = open(file);
conformanceDb.exec('CREATE TABLE IF NOT EXISTS business (key TEXT PRIMARY KEY, amount INTEGER NOT NULL)');
defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  {
    name: 'sqlite',
    store: () => {
      const store = sqliteStore({ database: conformanceDb, purge: false });
      stores.push(store);
      return store;
    },
    anotherClient: () => make(file, { purge: false }),
    transactionWrites: {
      write: (client, key) => {
        (client as Database.Database).prepare('INSERT INTO business (key, amount) VALUES (?, 1)').run(key);
      },
      exists: (key) => conformanceDb.prepare('SELECT 1 FROM business WHERE key = ?').get(key) !== undefined,
    },
  },
);

describe('sqlite store', () => {
  it('configures WAL, NORMAL sync, and no blocking busy handler on the connection (the store waits for locks itself)', () => {
    const db = open(join(dir, 'pragmas.db'));
    sqliteStore({ database: db });
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(db.pragma('synchronous', { simple: true })).toBe(1);
    expect(db.pragma('busy_timeout', { simple: true })).toBe(0);
  });

  it('uses the table option and indexes expires_at', async () => {
    const db = open(join(dir, 'table.db'));
    const store = sqliteStore({ database: db, table: 'my_keys', purgeIntervalMs: 0 });
    expect(store.table).toBe('my_keys');
    const id = newId();
    const claim = await store.claim(id, LONG);
    expect(claim.status).toBe('acquired');
    expect(db.prepare('SELECT count(*) AS n FROM my_keys WHERE id = ?').get(id)).toEqual({ n: 1 });
    const indexes = db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'my_keys'").all();
    expect(indexes).toContainEqual({ name: 'my_keys_expires_at' });
    expect(db.prepare("SELECT count(*) AS n FROM sqlite_master WHERE name = 'oncely_records'").get()).toEqual({ n: 0 });
  });

  it('rejects a table name that is not a plain identifier', () => {
    const db = open(join(dir, 'bad.db'));
    expect(() => sqliteStore({ database: db, table: 'x"; DROP TABLE y; --' })).toThrow(/table name/);
  });

  it('purges expired records in the background, without anyone calling purge; live and in-progress records stay', async () => {
    const db = open(join(dir, 'timer.db'));
    const store = sqliteStore({ database: db, purge: { intervalMs: 30, batch: 2 } });
    for (let i = 0; i < 5; i++) await completed(store, newId(), 20);
    const live = newId();
    await completed(store, live, 60_000);
    // Lease over, record retained: a crashed owner's record waits for a takeover, not for the purge.
    const stalled = newId();
    expect((await store.claim(stalled, { ...LONG, leaseMs: 10 })).status).toBe('acquired');
    const count = () => (db.prepare('SELECT count(*) AS n FROM oncely_records').get() as { n: number }).n;
    expect(count()).toBe(7);
    await until(() => count() === 2);
    expect(await store.get(live)).toMatchObject({ state: 'completed' });
    expect(await store.get(stalled)).toMatchObject({ state: 'in_progress' });
    await store.close();
    // Stopped: nothing is purged any more.
    await completed(store, newId(), 10);
    await sleep(150);
    expect(count()).toBe(3);
  });

  it('drains a backlog far beyond the old 10 batches per tick, in one drain, in index order', async () => {
    const db = open(join(dir, 'backlog.db'));
    const store = sqliteStore({ database: db, purge: false });
    const past = Date.now() - 60_000;
    const insert = db.prepare(
      'INSERT INTO oncely_records (id, state, token, fingerprint, lease_until, expires_at, outcome) VALUES (?, 1, NULL, NULL, ?, ?, ?)',
    );
    db.transaction(() => {
      for (let i = 0; i < 30_000; i++) insert.run(`expired-${i}`, past, past + (i % 1000), '{"status":201}');
    })();
    const live = newId();
    await completed(store, live, 60_000);
    const plan = db
      .prepare('EXPLAIN QUERY PLAN SELECT rowid FROM oncely_records WHERE expires_at <= ? ORDER BY expires_at LIMIT ?')
      .all(0, 1) as Array<{ detail: string }>;
    expect(plan.map((row) => row.detail).join('; ')).toMatch(/USING COVERING INDEX oncely_records_expires_at/);
    expect(plan.map((row) => row.detail).join('; ')).not.toMatch(/TEMP B-TREE/);
    const report = await purgeExpiredRecords(store, { batch: 1000 });
    expect(report).toMatchObject({ deleted: 30_000, batches: 31, done: true });
    expect(db.prepare('SELECT count(*) AS n FROM oncely_records').get()).toEqual({ n: 1 });
    expect(await store.get(live)).toMatchObject({ state: 'completed' });
  });

  it('yields to the event loop between purge batches', async () => {
    const db = open(join(dir, 'yield.db'));
    const store = sqliteStore({ database: db, purge: false });
    const past = Date.now() - 60_000;
    const insert = db.prepare(
      'INSERT INTO oncely_records (id, state, token, fingerprint, lease_until, expires_at, outcome) VALUES (?, 1, NULL, NULL, ?, ?, NULL)',
    );
    db.transaction(() => {
      for (let i = 0; i < 5_000; i++) insert.run(`expired-${i}`, past, past);
    })();
    // Other work (here a callback that re-queues itself) gets a turn between any two batches.
    let turns = 0;
    let draining = true;
    const other = (): void => {
      turns++;
      if (draining) setImmediate(other);
    };
    setImmediate(other);
    const report = await purgeExpiredRecords(store, { batch: 100 });
    draining = false;
    expect(report.batches).toBe(51);
    expect(turns).toBeGreaterThanOrEqual(50);
  });

  it('adds the expires_at index to a table created without it', () => {
    const db = open(join(dir, 'old.db'));
    db.exec(
      'CREATE TABLE oncely_records (id TEXT NOT NULL PRIMARY KEY, state INTEGER NOT NULL, token TEXT, fingerprint TEXT, lease_until INTEGER NOT NULL, expires_at INTEGER NOT NULL, outcome TEXT)',
    );
    sqliteStore({ database: db, purge: false });
    const indexes = db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'oncely_records'").all();
    expect(indexes).toContainEqual({ name: 'oncely_records_expires_at' });
  });

  it('still takes the older purgeIntervalMs and purgeBatch options', async () => {
    const db = open(join(dir, 'legacy.db'));
    const store = sqliteStore({ database: db, purgeIntervalMs: 30, purgeBatch: 1 });
    for (let i = 0; i < 3; i++) await completed(store, newId(), 10);
    await until(() => (db.prepare('SELECT count(*) AS n FROM oncely_records').get() as { n: number }).n === 0);
    await store.close();
    expect(() => sqliteStore({ database: db, purge: { batch: 0 } })).toThrow(/batch/);
  });

  it('leaves no open handle: a process with a purging store exits by itself, closed or not', async () => {
    const storeUrl = pathToFileURL(resolve('src/stores/sqlite.ts')).href;
    const sqliteUrl = pathToFileURL(resolve('node_modules/better-sqlite3/lib/index.js')).href;
    for (const closeIt of [true, false]) {
      const script = join(dir, `exit-${closeIt}.mjs`);
      writeFileSync(
        script,
        `import Database from ${JSON.stringify(sqliteUrl)};
import { sqliteStore } from ${JSON.stringify(storeUrl)};
const database = new Database(process.argv[2]);
const store = sqliteStore({ database, purge: { intervalMs: 20 } });
const claim = await store.claim('a', { fingerprint: null, leaseMs: 1000, ttlMs: 10 });
await store.complete('a', claim.token, 'x', 10);
await new Promise((r) => setTimeout(r, 100));
${closeIt ? 'await store.close();\ndatabase.close();' : ''}
process.stdout.write('done');
`,
      );
      const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', script, join(dir, `exit-${closeIt}.db`)], {
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
  }, 40_000);

  it('keeps records across reopening the file', async () => {
    const path = join(dir, 'reopen.db');
    const db = open(path);
    const store = sqliteStore({ database: db });
    const id = newId();
    const busy = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.complete(id, claim.token, '{"status":201}', 60_000)).toBe(true);
    const held = await store.claim(busy, LONG);
    if (held.status !== 'acquired') throw new Error('expected acquired');
    await store.close();
    db.close();

    const again = make(path);
    const replay = await again.claim(id, LONG);
    expect(replay).toMatchObject({ status: 'completed', record: { outcome: '{"status":201}' } });
    expect(await again.claim(busy, LONG)).toMatchObject({ status: 'in_progress', leaseUntil: held.leaseUntil });
    expect(await again.complete(busy, held.token, 'done', 60_000)).toBe(true);
  });

  it('runs a claim inside a transaction the caller already opened', async () => {
    const db = open(join(dir, 'inbox.db'));
    const store = sqliteStore({ database: db, purgeIntervalMs: 0 });
    const id = newId();
    db.exec('BEGIN');
    const claim = await store.claim(id, LONG);
    db.exec('ROLLBACK');
    expect(claim.status).toBe('acquired');
    expect(await store.get(id)).toBeNull();
  });

  it('gives exactly one winner per id among several processes claiming on one file', async () => {
    const path = join(dir, 'processes.db');
    make(path); // create the table before the children race
    const ids = Array.from({ length: 200 }, newId);
    const script = join(dir, 'child.mjs');
    const storeUrl = pathToFileURL(resolve('src/stores/sqlite.ts')).href;
    const sqliteUrl = pathToFileURL(resolve('node_modules/better-sqlite3/lib/index.js')).href;
    writeFileSync(
      script,
      `import Database from ${JSON.stringify(sqliteUrl)};
import { sqliteStore } from ${JSON.stringify(storeUrl)};
const store = sqliteStore({ database: new Database(process.argv[2]), purgeIntervalMs: 0 });
const ids = JSON.parse(process.argv[3]);
process.stdout.write('ready\\n');
process.stdin.once('data', async () => {
  const out = [];
  for (const id of ids) out.push((await store.claim(id, { fingerprint: 'fp', leaseMs: 30000, ttlMs: 60000 })).status);
  process.stdout.write(JSON.stringify(out) + '\\n');
  process.exit(0);
});
`,
    );
    const children = Array.from({ length: 6 }, () =>
      spawn(process.execPath, ['--conditions=source', '--import', 'tsx', script, path, JSON.stringify(ids)], {
        cwd: resolve('.'),
        stdio: ['pipe', 'pipe', 'inherit'],
      }),
    );
    const lines = children.map((child) => {
      let buffer = '';
      const waiters: Array<(line: string) => void> = [];
      const queue: string[] = [];
      child.stdout.on('data', (chunk: Buffer) => {
        buffer += chunk.toString();
        let nl = buffer.indexOf('\n');
        while (nl >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          const waiter = waiters.shift();
          if (waiter) waiter(line);
          else queue.push(line);
          nl = buffer.indexOf('\n');
        }
      });
      return (): Promise<string> =>
        new Promise((resolveLine) => {
          const line = queue.shift();
          if (line !== undefined) resolveLine(line);
          else waiters.push(resolveLine);
        });
    });
    expect(await Promise.all(lines.map((next) => next()))).toEqual(children.map(() => 'ready'));
    for (const child of children) child.stdin.write('go\n');
    const results = (await Promise.all(lines.map((next) => next()))).map((line) => JSON.parse(line) as string[]);
    for (let i = 0; i < ids.length; i++) {
      const statuses = results.map((r) => r[i]);
      expect(statuses.filter((s) => s === 'acquired'), `id ${i}: ${statuses.join(',')}`).toHaveLength(1);
      expect(statuses.filter((s) => s === 'in_progress')).toHaveLength(children.length - 1);
    }
  }, 60_000);
});

describe('sqlite store: process sessions', () => {
  const sessionId = (): string => `s-${randomBytes(8).toString('hex')}`;

  it("refuses takeoverFrom while the owner's session is alive, checked under the write lock", async () => {
    const store = make(join(dir, 'sessions.db'), { purge: false });
    const owner = sessionId();
    await store.sessions.heartbeat(owner, 60_000);
    const id = newId();
    const held = await store.claim(id, { ...LONG, owner });
    if (held.status !== 'acquired') throw new Error('expected acquired');
    expect(await store.claim(id, { ...LONG, owner: sessionId(), takeoverFrom: owner })).toMatchObject({ status: 'in_progress', owner });
    await store.sessions.end(owner);
    expect(await store.claim(id, { ...LONG, owner: sessionId(), takeoverFrom: owner })).toMatchObject({ status: 'acquired', takeover: true });
    expect(await store.complete(id, held.token, 'stale', 60_000)).toBe(false);
  });

  it("keeps session deadlines on this process's clock, and purges the ended ones with the expired records", async () => {
    let clock = 1_000_000;
    const db = open(join(dir, 'session-clock.db'));
    const store = sqliteStore({ database: db, purge: false, now: () => clock });
    expect(store.sessionsTable).toBe('oncely_records_sessions');
    await store.sessions.heartbeat('gone', 1_000);
    await store.sessions.heartbeat('live', 60_000);
    expect(db.prepare('SELECT expires_at FROM oncely_records_sessions WHERE id = ?').get('gone')).toEqual({ expires_at: 1_001_000 });
    clock += 999;
    expect(await store.sessions.alive('gone')).toBe(true);
    clock += 1;
    expect(await store.sessions.alive('gone')).toBe(false);
    await purgeExpiredRecords(store);
    expect(db.prepare('SELECT id FROM oncely_records_sessions').all()).toEqual([{ id: 'live' }]);
  });

  it('adds the owner column and the sessions table to a table made before sessions; with migrate: false it says what to run', async () => {
    const db = open(join(dir, 'before-sessions.db'));
    db.exec(
      'CREATE TABLE oncely_records (id TEXT NOT NULL PRIMARY KEY, state INTEGER NOT NULL, token TEXT, fingerprint TEXT, lease_until INTEGER NOT NULL, expires_at INTEGER NOT NULL, outcome TEXT)',
    );
    expect(() => sqliteStore({ database: db, migrate: false, purge: false })).toThrow(ConfigError);
    expect(() => sqliteStore({ database: db, migrate: false, purge: false })).toThrow(/migrateSqlite/);
    const store = sqliteStore({ database: db, purge: false });
    const columns = db.prepare("SELECT name FROM pragma_table_info('oncely_records')").all() as Array<{ name: string }>;
    expect(columns.map((c) => c.name)).toContain('owner');
    sqliteStore({ database: db, purge: false }); // idempotent
    const id = newId();
    expect((await store.claim(id, { ...LONG, owner: 'me' })).status).toBe('acquired');
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'in_progress', owner: 'me' });
  });
});

describe('sqlite store: transactional mode', () => {
  const withBusiness = (db: Database.Database): Database.Database => {
    db.exec('CREATE TABLE IF NOT EXISTS payments (record_id TEXT NOT NULL, amount INTEGER NOT NULL)');
    return db;
  };
  const rows = (db: Database.Database, id: string): number =>
    (db.prepare('SELECT count(*) AS n FROM payments WHERE record_id = ?').get(id) as { n: number }).n;
  const pay = (db: Database.Database, id: string): void => {
    db.prepare('INSERT INTO payments (record_id, amount) VALUES (?, 42)').run(id);
  };

  it("holds the store's own writes until the open transaction ends, answers reads at once, and shares that with every store on the Database", async () => {
    const db = withBusiness(open(join(dir, 'gate.db')));
    const store = sqliteStore({ database: db, purge: false });
    const sibling = sqliteStore({ database: db, table: 'other_records', purge: false });
    const id = newId();
    const done = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    await completed(store, done, 60_000);
    const owner = 'gate-session';
    await store.sessions.heartbeat(owner, 60_000);
    const transaction = await store.transactions.open(id, claim.token);
    expect(transaction.client).toBe(db);
    expect(db.inTransaction).toBe(true);
    pay(db, id);
    const settled: string[] = [];
    const note = <T>(name: string, pending: Promise<T>): Promise<T> =>
      pending.then((value) => {
        settled.push(name);
        return value;
      });
    const writes = [
      note('claim', store.claim(newId(), LONG)),
      note('renew', store.renew(id, claim.token, 30_000)),
      note('heartbeat', store.sessions.heartbeat(owner, 60_000)),
      note('sibling claim', sibling.claim(newId(), LONG)),
    ];
    // Reads are answered at once, inside the open transaction.
    expect(await store.get(done)).toMatchObject({ state: 'completed' });
    expect(await store.claim(done, LONG)).toMatchObject({ status: 'completed' });
    expect(await store.claim(id, LONG)).toMatchObject({ status: 'in_progress' });
    expect(await store.sessions.alive(owner)).toBe(true);
    await sleep(50);
    expect(settled, 'no write ran inside the transaction').toEqual([]);
    expect(await transaction.commit('paid', 60_000)).toBe(true);
    await Promise.all(writes);
    expect(settled.sort()).toEqual(['claim', 'heartbeat', 'renew', 'sibling claim']);
    expect(rows(db, id)).toBe(1);
    expect(await store.get(id)).toMatchObject({ state: 'completed', outcome: 'paid' });
  });

  it('makes transactions take turns, and gives up on a turn (or a held write) after busyTimeoutMs', async () => {
    const db = withBusiness(open(join(dir, 'turns.db')));
    const store = sqliteStore({ database: db, purge: false, busyTimeoutMs: 300 });
    const ids = [newId(), newId(), newId()];
    const tokens: string[] = [];
    for (const id of ids) {
      const claim = await store.claim(id, LONG);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      tokens.push(claim.token);
    }
    const first = await store.transactions.open(ids[0]!, tokens[0]!);
    const second = store.transactions.open(ids[1]!, tokens[1]!);
    const heldWrite = store.renew(ids[2]!, tokens[2]!, 30_000);
    const waited = Date.now();
    await expect(second).rejects.toBeInstanceOf(StoreUnavailableError);
    await expect(heldWrite).rejects.toThrow(/busyTimeoutMs/);
    expect(Date.now() - waited).toBeGreaterThanOrEqual(250);
    const third = store.transactions.open(ids[2]!, tokens[2]!);
    pay(db, ids[0]!);
    await first.rollback();
    const next = await third;
    pay(db, ids[2]!);
    expect(await next.commit('third', 60_000)).toBe(true);
    expect(rows(db, ids[0]!)).toBe(0);
    expect(rows(db, ids[2]!)).toBe(1);
  });

  it('engine: concurrent operations with awaits inside their transactions each commit once, in turn', async () => {
    const db = withBusiness(open(join(dir, 'engine.db')));
    const engine = new Engine({ store: sqliteStore({ database: db, purge: false }) });
    try {
      const ids = Array.from({ length: 8 }, newId);
      const results = await Promise.all(
        ids.map(async (id, i) => {
          const begun = await engine.begin({ id, fingerprint: null });
          if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
          return begun.claim.perform({
            run: async (claim) => {
              const tx = await claim.transaction<Database.Database>();
              pay(tx, id);
              await sleep(5); // an await between two writes: the other operations wait their turn
              pay(tx, id);
              if (i === 3) throw new Error('declined');
              return i;
            },
            settle: (value) => ({ kind: 'complete', outcome: String(value) }),
          });
        }),
      );
      expect(results.map((r) => r.settled)).toEqual(ids.map((_, i) => (i === 3 ? 'released' : 'stored')));
      expect(ids.map((id) => rows(db, id))).toEqual(ids.map((_, i) => (i === 3 ? 0 : 2)));
      expect(await engine.begin({ id: ids[0]!, fingerprint: null })).toMatchObject({ kind: 'replay' });
      expect(db.inTransaction).toBe(false);
    } finally {
      await engine.close();
    }
  });

  it('refuses a transaction that the handler ended itself: the completion is not stored alone', async () => {
    const db = withBusiness(open(join(dir, 'ended.db')));
    const store = sqliteStore({ database: db, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const transaction = await store.transactions.open(id, claim.token);
    pay(db, id);
    db.exec('ROLLBACK');
    await expect(transaction.commit('done', 60_000)).rejects.toBeInstanceOf(RolledBackError);
    expect(await store.get(id)).toMatchObject({ state: 'in_progress' });
    expect(await store.renew(id, claim.token, 30_000), 'the gate is open again').toBe(true);
  });

  it("documents the limit: the user's own writes through the Database while a transaction is open belong to it", async () => {
    const db = withBusiness(open(join(dir, 'joined.db')));
    const store = sqliteStore({ database: db, purge: false });
    const id = newId();
    const claim = await store.claim(id, LONG);
    if (claim.status !== 'acquired') throw new Error('expected acquired');
    const transaction = await store.transactions.open(id, claim.token);
    pay(db, 'written-elsewhere'); // e.g. another request's plain handler, between two awaits
    await transaction.rollback();
    expect(rows(db, 'written-elsewhere')).toBe(0);
  });
});
