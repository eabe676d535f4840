/**
 * Transactional mode against plain mode (issue 11), and DBOS Transact for the
 * same guarantee, side by side in one run.
 *
 * Every request is the same two-step payment: insert a payment row, insert a
 * ledger row, answer `{ id, amount, currency }`.
 *
 * - oncely, plain: `engine.begin` (the claim), then the handler writes through
 *   the pool in a transaction of its own (BEGIN, two INSERTs, COMMIT), then the
 *   engine completes the record: three commits, and a crash between the
 *   business COMMIT and the completion runs the payment again on a retry.
 * - oncely, transactional: `engine.begin`, then the two INSERTs through
 *   `claim.transaction()`'s client; the completion is written inside that
 *   transaction and commits with it (two commits; both or neither).
 * - DBOS Transact (bench/dbos/worker.ts, a child process with its own
 *   node_modules): a workflow whose workflow id is the idempotency key, the
 *   two INSERTs in one transaction step (`DrizzleDataSource` over a `pg`
 *   Pool), whose checkpoint commits with them: the same guarantee.
 *
 * Engine-direct, not through an HTTP front door: both oncely modes and DBOS
 * then pay for the same things (the idempotency machinery and the database),
 * and the framework's own cost, the same for all, does not dilute the
 * difference. CONCURRENCY requests in flight at a time (a closed loop), each
 * a new key (miss) or the same primed key (replay). Each round runs every
 * contestant of a store back to back, in rotating order, and ratios are taken
 * per round.
 *
 * Figures: requests/s; client CPU, the user + system time of the process that
 * runs the contestant (this one for oncely, the DBOS child for DBOS) per
 * request, which on SQLite includes the database itself; PostgreSQL CPU, the
 * time of the server backends serving the contestant's connections (found by
 * `application_name`, read from /proc) per request; round trips (PostgreSQL:
 * every `query` on a `pg` client) or statements (SQLite) per request, and
 * commits of a write transaction per request (each one a WAL flush on
 * PostgreSQL with `synchronous_commit = on`); p50 and p99 latency.
 *
 *   npm run bench:transactional
 *   (npm ci --prefix bench/dbos --no-audit --no-fund, then node --conditions=source --import tsx bench/transactional.ts)
 *   ROUNDS=3 DURATION=3 WARMUP=1 CONCURRENCY=20 DBOS=1 STORES=postgres,sqlite WRITE_DOC=1 (the defaults: about 2 minutes)
 *   DBOS=0 leaves DBOS out (and needs no bench/dbos install).
 *
 * PostgreSQL on 127.0.0.1:5432, db `test` (PGHOST, PGUSER, PGDATABASE), as the
 * tests use it: every table has a random name and is dropped at the end,
 * DBOS's system tables and checkpoints go in a schema of their own, dropped
 * too. SQLite: a file in a temporary directory, removed at the end. Bounded:
 * fixed durations, and a watchdog ends the run after 10 minutes. Writes the
 * table into docs/benchmarks.md (section "transactional"; WRITE_DOC=0 only
 * prints). Not a test.
 */
import { type ChildProcess, execSync, spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import { type Claim, Engine, recordId } from 'oncely';
import { migratePostgres, type PgTransactionClient, postgresStore } from 'oncely/stores/postgres';
import { type SqliteDatabase, type SqliteStatement, sqliteStore } from 'oncely/stores/sqlite';
import pg from 'pg';
import { writeSection } from './lib/doc.js';
import { fmtRange, type Summary, summarise, table } from './lib/load.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const ROUNDS = Number(process.env.ROUNDS ?? 3);
const DURATION = Number(process.env.DURATION ?? 3);
const WARMUP = Number(process.env.WARMUP ?? 1);
const CONCURRENCY = Number(process.env.CONCURRENCY ?? 20);
const WITH_DBOS = process.env.DBOS !== '0';
const STORES = (process.env.STORES ?? 'postgres,sqlite').split(',');
const WRITE_DOC = process.env.WRITE_DOC !== '0';

/** The payment every contestant makes. */
export const ACCOUNT = 'acct_bench';
export const AMOUNT = 1250;
export const CURRENCY = 'EUR';
/** One request body, one fingerprint (the HTTP front doors hash the body; the engine only compares). */
const FP = 'v1:5a1b0c9d4e3f2a1b0c9d4e3f2a1b0c9d4e3f2a1b0c9d4e3f2a1b0c9d4e3f2a1b';

/** Connection settings of the PostgreSQL every contestant shares. */
export function pgConnection(): { host: string; port: number; user: string; database: string } {
  return {
    host: process.env.PGHOST ?? '127.0.0.1',
    port: Number(process.env.PGPORT ?? 5432),
    user: process.env.PGUSER ?? 'postgres',
    database: process.env.PGDATABASE ?? 'test',
  };
}

/** The two business tables of one contestant (same shape for all). */
export function paymentTablesSql(prefix: string): string {
  return `CREATE TABLE "${prefix}_payments" (id uuid PRIMARY KEY, idempotency_key text NOT NULL, account text NOT NULL,
  amount integer NOT NULL, currency text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE "${prefix}_ledger" (id bigserial PRIMARY KEY, payment_id uuid NOT NULL, account text NOT NULL,
  delta integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now());`;
}

// ---------------------------------------------------------------------------
// Counting round trips and commits

/** Statements (round trips on PostgreSQL) and commits of a write transaction, so far. */
export interface Counts {
  statements: number;
  commits: number;
}

/** Whether one connection is inside an explicit transaction. */
export interface TxState {
  open: boolean;
}

/**
 * Count one statement: a COMMIT of an explicit transaction, or a statement
 * other than a read outside of one (autocommit), is one commit.
 */
export function countStatement(counts: Counts, state: TxState, text: string): void {
  counts.statements++;
  const head = text.trimStart().slice(0, 24).toLowerCase();
  if (head.startsWith('begin') || head.startsWith('start transaction')) state.open = true;
  else if (head.startsWith('commit') || head.startsWith('end')) {
    if (state.open) counts.commits++;
    state.open = false;
  } else if (head.startsWith('rollback') && !head.startsWith('rollback to')) state.open = false;
  else if (!state.open && !head.startsWith('select') && !head.startsWith('show')) counts.commits++;
}

/**
 * A `pg` Pool whose clients count every `query` (one round trip each: `pg`
 * never pipelines). `pgModule` is passed in, so that the DBOS child counts
 * with its own copy of `pg`.
 */
export function countingPool(pgModule: typeof pg, config: pg.PoolConfig, counts: Counts): pg.Pool {
  const states = new WeakMap<object, TxState>();
  const query = pgModule.Client.prototype.query;
  class CountingClient extends pgModule.Client {}
  (CountingClient.prototype as { query: unknown }).query = function (this: object, ...args: unknown[]) {
    const first = args[0];
    const text = typeof first === 'string' ? first : ((first as { text?: string } | undefined)?.text ?? '');
    let state = states.get(this);
    if (state === undefined) {
      state = { open: false };
      states.set(this, state);
    }
    countStatement(counts, state, text);
    return (query as (...a: unknown[]) => unknown).apply(this, args);
  };
  return new pgModule.Pool({ ...config, Client: CountingClient });
}

/** A better-sqlite3 Database as the SQLite store sees it, counting every statement run. */
function countingSqlite(db: Database.Database, counts: Counts): SqliteDatabase {
  const state: TxState = { open: false };
  return {
    prepare(source: string): SqliteStatement {
      const statement = db.prepare(source);
      return {
        run: (...params: unknown[]) => {
          countStatement(counts, state, source);
          return statement.run(...params);
        },
        get: (...params: unknown[]) => {
          countStatement(counts, state, source);
          return statement.get(...params);
        },
      };
    },
    exec: (source: string) => db.exec(source),
    pragma: (source: string, options?: { simple?: boolean }) => db.pragma(source, options),
    get inTransaction() {
      return db.inTransaction;
    },
    get open() {
      return db.open;
    },
  };
}

// ---------------------------------------------------------------------------
// The load loop, shared with the DBOS child

/** Edges of the measured window: the PostgreSQL CPU is read at both. */
export interface Window {
  start(): Promise<void>;
  end(): Promise<void>;
}

export interface DriveOptions {
  /** One request; throws when it did not succeed. */
  request(key: string): Promise<void>;
  /** The key of the next request. */
  key(): string;
  /** Counts so far (all of this contestant's connections). */
  counts(): Counts;
  concurrency: number;
  warmupS: number;
  durationS: number;
  window?: Window;
}

/** What one contestant did in one measured window. */
export interface Sample {
  reqs: number;
  p50: number;
  p99: number;
  /** CPU of the process running the contestant, µs per request. */
  clientCpu: number;
  statements: number;
  commits: number;
  failures: number;
  firstError?: string;
  /** Successful requests in the whole run, warm-up included (for the row check). */
  succeeded: number;
  /** PostgreSQL backends' CPU, µs per request (filled in by the main process). */
  serverCpu?: number;
  /** Requests in the measured window. */
  requests: number;
  /** Where the statements went, when a contestant has more than one pool. */
  detail?: string;
  /** Event loop utilisation over the window (1: never idle). */
  elu: number;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const percentile = (sorted: number[], p: number): number => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? Number.NaN;

/** Run `concurrency` loops of requests for warm-up + duration; the figures of the measured part. */
export async function drive(o: DriveOptions): Promise<Sample> {
  let running = true;
  let measuring = false;
  const latencies: number[] = [];
  let failures = 0;
  let succeeded = 0;
  let firstError: string | undefined;
  const loop = async (): Promise<void> => {
    while (running) {
      const t = performance.now();
      try {
        await o.request(o.key());
        succeeded++;
        if (measuring) latencies.push(performance.now() - t);
      } catch (error) {
        if (measuring) failures++;
        firstError ??= error instanceof Error ? `${error.name}: ${error.message}` : String(error);
        await sleep(5); // a failing store must not turn the loop into a busy spin
      }
      // One turn of the event loop per request, as a server gets: SQLite answers within
      // microtasks, and without this the loops would starve the timers (and the end of the run).
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  };
  const loops = Array.from({ length: o.concurrency }, loop);
  await sleep(o.warmupS * 1000);
  await o.window?.start();
  const counts0 = { ...o.counts() };
  const cpu0 = process.cpuUsage();
  const elu0 = performance.eventLoopUtilization();
  const t0 = performance.now();
  measuring = true;
  await sleep(o.durationS * 1000);
  measuring = false;
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const elu = performance.eventLoopUtilization(elu0).utilization;
  const counts1 = { ...o.counts() };
  await o.window?.end();
  running = false;
  await Promise.all(loops);
  latencies.sort((a, b) => a - b);
  const n = latencies.length;
  return {
    reqs: n / seconds,
    p50: percentile(latencies, 0.5),
    p99: percentile(latencies, 0.99),
    clientCpu: n > 0 ? (cpu.user + cpu.system) / n : Number.NaN,
    statements: n > 0 ? (counts1.statements - counts0.statements) / n : Number.NaN,
    commits: n > 0 ? (counts1.commits - counts0.commits) / n : Number.NaN,
    failures,
    ...(firstError === undefined ? {} : { firstError }),
    succeeded,
    requests: n,
    elu,
  };
}

// ---------------------------------------------------------------------------
// PostgreSQL server CPU, per contestant

const CLK_TCK = (() => {
  try {
    return Number(execSync('getconf CLK_TCK', { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU ticks of one process, or undefined when it is gone or unreadable. */
function ticks(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[11]) + Number(fields[12]); // utime, stime
  } catch {
    return undefined;
  }
}

/** The CPU of the backends serving connections named `apps`, between two edges. */
class ServerCpu {
  #before = new Map<number, number>();
  #seconds = Number.NaN;
  constructor(private readonly monitor: pg.Client) {}

  async #snapshot(apps: string[]): Promise<Map<number, number>> {
    const { rows } = await this.monitor.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1)', [apps]);
    const snapshot = new Map<number, number>();
    for (const { pid } of rows) {
      const t = ticks(pid);
      if (t !== undefined) snapshot.set(pid, t);
    }
    return snapshot;
  }

  window(apps: string[]): Window {
    return {
      start: async () => {
        this.#before = await this.#snapshot(apps);
      },
      end: async () => {
        const after = await this.#snapshot(apps);
        let total = 0;
        // A backend that started inside the window counts whole; one that ended is lost (pools never close idle ones here).
        for (const [pid, t] of after) total += t - (this.#before.get(pid) ?? 0);
        this.#seconds = total / CLK_TCK;
      },
    };
  }

  /** CPU seconds of the last window. */
  get seconds(): number {
    return this.#seconds;
  }
}

// ---------------------------------------------------------------------------
// Contestants

type Path = 'miss' | 'replay';
type StoreName = 'PostgreSQL' | 'SQLite';

interface Contestant {
  id: string;
  name: string;
  store: StoreName;
  /** One run of `drive` on this path (replayKey primed); `durations` default to WARMUP and DURATION. */
  run(path: Path, replayKey: string, durations?: Durations): Promise<Sample>;
  prime(key: string): Promise<void>;
  /** Payment and ledger rows in its tables, and the successful miss requests made. */
  rows(): Promise<{ payments: number; ledger: number; made: number }>;
}

interface Durations {
  warmupS: number;
  durationS: number;
}

const DEFAULT_DURATIONS: Durations = { warmupS: WARMUP, durationS: DURATION };

interface Payment {
  id: string;
  amount: number;
  currency: string;
}

/** One request through the engine: begin, then run `handler` and complete with its answer, or read the replay. */
async function oncelyRequest(engine: Engine, key: string, handler: (claim: Claim) => Promise<Payment> | Payment): Promise<void> {
  const begun = await engine.begin({ id: recordId(key, ACCOUNT), fingerprint: FP });
  if (begun.kind === 'replay') {
    JSON.parse(begun.record.outcome);
    return;
  }
  if (begun.kind !== 'run') throw begun.error;
  const performed = await begun.claim.perform({
    run: () => handler(begun.claim),
    settle: (payment) => ({ kind: 'complete', outcome: JSON.stringify({ status: 201, body: payment }) }),
  });
  if (!performed.ok) throw performed.error;
  if (performed.settled !== 'stored') throw new Error(`settled: ${performed.settled}`);
}

interface PgSide {
  pool: pg.Pool;
  counts: Counts;
  engine: Engine;
  app: string;
  tables: string[];
}

async function postgresSide(run: string): Promise<PgSide> {
  const counts: Counts = { statements: 0, commits: 0 };
  const app = `oncely-bench-tx-${run}`;
  // One connection per request in flight, and one more for the session heartbeat.
  const pool = countingPool(pg, { ...pgConnection(), max: CONCURRENCY + 1, idleTimeoutMillis: 0, application_name: app }, counts);
  pool.on('error', () => {});
  const table = `oncely_bench_tx_${run}_records`;
  await migratePostgres(pool, { table });
  const store = postgresStore({ pool, table, purge: false });
  const engine = new Engine({ store });
  return { pool, counts, engine, app, tables: [table, `${table}_sessions`] };
}

function postgresContestant(side: PgSide, cpu: ServerCpu, mode: 'plain' | 'transactional', run: string): Contestant {
  const prefix = `oncely_bench_tx_${run}_${mode === 'plain' ? 'plain' : 'tx'}`;
  side.tables.push(`${prefix}_payments`, `${prefix}_ledger`);
  const insertPayment = `INSERT INTO "${prefix}_payments" (id, idempotency_key, account, amount, currency) VALUES ($1, $2, $3, $4, $5)`;
  const insertLedger = `INSERT INTO "${prefix}_ledger" (payment_id, account, delta) VALUES ($1, $2, $3)`;
  const write = async (client: PgTransactionClient, key: string): Promise<Payment> => {
    const id = randomUUID();
    await client.query({ text: insertPayment, values: [id, key, ACCOUNT, AMOUNT, CURRENCY] });
    await client.query({ text: insertLedger, values: [id, ACCOUNT, -AMOUNT] });
    return { id, amount: AMOUNT, currency: CURRENCY };
  };
  const handler =
    mode === 'plain'
      ? (key: string) => async (): Promise<Payment> => {
          // Plain mode: the handler's own transaction on a client of the pool.
          const client = await side.pool.connect();
          try {
            await client.query('BEGIN');
            const payment = await write(client, key);
            await client.query('COMMIT');
            return payment;
          } catch (error) {
            await client.query('ROLLBACK').catch(() => undefined);
            throw error;
          } finally {
            client.release();
          }
        }
      : (key: string) =>
          async (claim: Claim): Promise<Payment> =>
            write(await claim.transaction<PgTransactionClient>(), key);
  let made = 0;
  let seq = 0;
  const request = (key: string) => oncelyRequest(side.engine, key, handler(key));
  const ready = (async () => {
    await side.pool.query(paymentTablesSql(prefix));
  })();
  return {
    id: `pg-${mode}`,
    name: `oncely, ${mode}`,
    store: 'PostgreSQL',
    async run(path, replayKey, durations = DEFAULT_DURATIONS) {
      await ready;
      const sample = await drive({
        request,
        key: () => (path === 'miss' ? `${run}-${mode}-${seq++}` : replayKey),
        counts: () => side.counts,
        concurrency: CONCURRENCY,
        ...durations,
        window: cpu.window([side.app]),
      });
      if (path === 'miss') made += sample.succeeded;
      return { ...sample, serverCpu: sample.requests > 0 ? (cpu.seconds * 1e6) / sample.requests : Number.NaN };
    },
    async prime(key) {
      await ready;
      await request(key);
      made++;
    },
    async rows() {
      const { rows } = await side.pool.query<{ p: string; l: string }>(
        `SELECT (SELECT count(*) FROM "${prefix}_payments") AS p, (SELECT count(*) FROM "${prefix}_ledger") AS l`,
      );
      return { payments: Number(rows[0]?.p), ledger: Number(rows[0]?.l), made };
    },
  };
}

interface SqliteSide {
  db: Database.Database;
  counted: SqliteDatabase;
  counts: Counts;
  engine: Engine;
  dir: string;
}

function sqliteSide(): SqliteSide {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-bench-tx-'));
  const db = new Database(join(dir, 'bench.db'));
  const counts: Counts = { statements: 0, commits: 0 };
  const counted = countingSqlite(db, counts);
  const store = sqliteStore({ database: counted, table: 'oncely_records', purge: false });
  const engine = new Engine({ store });
  return { db, counted, counts, engine, dir };
}

function sqliteContestant(side: SqliteSide, mode: 'plain' | 'transactional', run: string): Contestant {
  const prefix = mode === 'plain' ? 'plain' : 'tx';
  side.db.exec(`CREATE TABLE ${prefix}_payments (id TEXT PRIMARY KEY, idempotency_key TEXT NOT NULL, account TEXT NOT NULL,
  amount INTEGER NOT NULL, currency TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE ${prefix}_ledger (id INTEGER PRIMARY KEY, payment_id TEXT NOT NULL, account TEXT NOT NULL, delta INTEGER NOT NULL,
  created_at INTEGER NOT NULL);`);
  const db = side.counted;
  const insertPayment = db.prepare(
    `INSERT INTO ${prefix}_payments (id, idempotency_key, account, amount, currency, created_at) VALUES (?, ?, ?, ?, ?, ?)`,
  );
  const insertLedger = db.prepare(`INSERT INTO ${prefix}_ledger (payment_id, account, delta, created_at) VALUES (?, ?, ?, ?)`);
  const begin = db.prepare('BEGIN');
  const commit = db.prepare('COMMIT');
  const rollback = db.prepare('ROLLBACK');
  const write = (key: string): Payment => {
    const id = randomUUID();
    const at = Date.now();
    insertPayment.run(id, key, ACCOUNT, AMOUNT, CURRENCY, at);
    insertLedger.run(id, ACCOUNT, -AMOUNT, at);
    return { id, amount: AMOUNT, currency: CURRENCY };
  };
  const handler =
    mode === 'plain'
      ? (key: string) => (): Payment => {
          // Plain mode: the handler's own transaction (what better-sqlite3's db.transaction() runs).
          begin.run();
          try {
            const payment = write(key);
            commit.run();
            return payment;
          } catch (error) {
            if (side.db.inTransaction) rollback.run();
            throw error;
          }
        }
      : (key: string) =>
          async (claim: Claim): Promise<Payment> => {
            await claim.transaction<SqliteDatabase>();
            return write(key);
          };
  let made = 0;
  let seq = 0;
  const request = (key: string) => oncelyRequest(side.engine, key, handler(key));
  return {
    id: `sqlite-${mode}`,
    name: `oncely, ${mode}`,
    store: 'SQLite',
    async run(path, replayKey, durations = DEFAULT_DURATIONS) {
      const sample = await drive({
        request,
        key: () => (path === 'miss' ? `${run}-${mode}-${seq++}` : replayKey),
        counts: () => side.counts,
        concurrency: CONCURRENCY,
        ...durations,
      });
      if (path === 'miss') made += sample.succeeded;
      return sample;
    },
    async prime(key) {
      await request(key);
      made++;
    },
    async rows() {
      const row = side.db.prepare(`SELECT (SELECT count(*) FROM ${prefix}_payments) AS p, (SELECT count(*) FROM ${prefix}_ledger) AS l`).get() as {
        p: number;
        l: number;
      };
      return { payments: row.p, ledger: row.l, made };
    },
  };
}

// ---------------------------------------------------------------------------
// DBOS Transact, in its child process

/** Messages of the DBOS child (bench/dbos/worker.ts). */
export type FromWorker =
  | { ev: 'ready'; apps: string[]; versions: Record<string, string> }
  | { ev: 'failed'; error: string }
  | { ev: 'edge'; edge: 'start' | 'end' }
  | { ev: 'sample'; sample: Sample }
  | { ev: 'primed' }
  | { ev: 'rows'; payments: number; ledger: number; made: number }
  | { ev: 'idle'; us: number }
  | { ev: 'stopped' };

export type ToWorker =
  | { cmd: 'run'; path: Path; replayKey: string; concurrency: number; warmupS: number; durationS: number }
  | { cmd: 'edge-ack' }
  | { cmd: 'prime'; key: string }
  | { cmd: 'rows' }
  | { cmd: 'idle' }
  | { cmd: 'stop' };

interface DbosSide {
  contestant: Contestant;
  versions: Record<string, string>;
  /** CPU the child uses doing nothing for a second, µs. */
  idle(): Promise<number>;
  stop(): Promise<void>;
}

function next(child: ChildProcess, ev: FromWorker['ev'], timeoutMs: number): Promise<FromWorker> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => done(new Error(`DBOS worker: no ${ev} within ${timeoutMs} ms`)), timeoutMs);
    const onMessage = (message: FromWorker): void => {
      if (message.ev === 'failed') done(new Error(`DBOS worker failed: ${message.error}`));
      else if (message.ev === ev) done(undefined, message);
    };
    const onExit = (code: number | null): void => done(new Error(`DBOS worker exited (${code}) while waiting for ${ev}`));
    const done = (error?: Error, message?: FromWorker): void => {
      clearTimeout(timer);
      child.off('message', onMessage);
      child.off('exit', onExit);
      if (error) reject(error);
      else resolve(message!);
    };
    child.on('message', onMessage);
    child.on('exit', onExit);
  });
}

async function dbosSide(run: string, cpu: ServerCpu): Promise<DbosSide> {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', join('bench', 'dbos', 'worker.ts')], {
    cwd: ROOT,
    env: { ...process.env, RUN: run, POOL: String(CONCURRENCY + 1) },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const send = (message: ToWorker): void => {
    child.send(message);
  };
  let ready: FromWorker;
  try {
    ready = await next(child, 'ready', 120_000);
  } catch (error) {
    child.kill('SIGKILL');
    throw error;
  }
  if (ready.ev !== 'ready') throw new Error('unreachable');
  const apps = ready.apps;
  const contestant: Contestant = {
    id: 'dbos',
    name: 'DBOS Transact, transaction step',
    store: 'PostgreSQL',
    async run(path, replayKey, durations = DEFAULT_DURATIONS) {
      const window = cpu.window(apps);
      const onEdge = (message: FromWorker): void => {
        if (message.ev !== 'edge') return;
        void (message.edge === 'start' ? window.start() : window.end()).finally(() => send({ cmd: 'edge-ack' }));
      };
      child.on('message', onEdge);
      try {
        const sampled = next(child, 'sample', (durations.warmupS + durations.durationS) * 1000 + 60_000);
        send({ cmd: 'run', path, replayKey, concurrency: CONCURRENCY, ...durations });
        const message = await sampled;
        if (message.ev !== 'sample') throw new Error('unreachable');
        const sample = message.sample;
        return { ...sample, serverCpu: sample.requests > 0 ? (cpu.seconds * 1e6) / sample.requests : Number.NaN };
      } finally {
        child.off('message', onEdge);
      }
    },
    async prime(key) {
      const primed = next(child, 'primed', 30_000);
      send({ cmd: 'prime', key });
      await primed;
    },
    async rows() {
      const answer = next(child, 'rows', 30_000);
      send({ cmd: 'rows' });
      const message = await answer;
      if (message.ev !== 'rows') throw new Error('unreachable');
      return { payments: message.payments, ledger: message.ledger, made: message.made };
    },
  };
  return {
    contestant,
    versions: ready.versions,
    async idle() {
      const answer = next(child, 'idle', 30_000);
      send({ cmd: 'idle' });
      const message = await answer;
      return message.ev === 'idle' ? message.us : Number.NaN;
    },
    async stop() {
      if (child.exitCode !== null) return;
      const stopped = next(child, 'stopped', 30_000).catch(() => undefined);
      send({ cmd: 'stop' });
      await stopped;
      if (child.exitCode === null) child.kill('SIGKILL');
    },
  };
}

// ---------------------------------------------------------------------------
// The run

interface Row {
  store: StoreName;
  path: Path;
  contestant: Contestant;
  samples: Sample[];
  /** Per round: req/s over the store's plain oncely. */
  ratios: number[];
  cpuRatios: number[];
  /** Per round, against transactional oncely (DBOS only). */
  vsTx: number[];
  cpuVsTx: number[];
}

/** Median ms of 20 durable single-row commits, one after another: what the disk makes a commit cost now. */
async function commitProbe(client: pg.Client, run: string): Promise<number> {
  const probe = `oncely_bench_tx_${run}_probe`;
  await client.query(`CREATE TABLE IF NOT EXISTS "${probe}" (id integer)`);
  const times: number[] = [];
  for (let i = 0; i < 20; i++) {
    const t = performance.now();
    await client.query(`INSERT INTO "${probe}" VALUES (${i})`);
    times.push(performance.now() - t);
  }
  await client.query(`DROP TABLE "${probe}"`);
  return summarise(times).median;
}

/** CPU this process uses doing nothing for a second (timers, session heartbeats), µs. */
export async function idleCpu(): Promise<number> {
  const cpu0 = process.cpuUsage();
  await sleep(1000);
  const cpu = process.cpuUsage(cpu0);
  return cpu.user + cpu.system;
}

const f0 = (n: number): string => (Number.isFinite(n) ? n.toFixed(0) : '–');
const f1 = (n: number): string => (Number.isFinite(n) ? n.toFixed(1) : '–');
const f2 = (n: number): string => (Number.isFinite(n) ? n.toFixed(2) : '–');
const med = (xs: number[]): Summary => summarise(xs.filter(Number.isFinite));

async function main(): Promise<void> {
  const started = Date.now();
  const load0 = loadavg();
  const run = randomBytes(4).toString('hex');
  const commit = `${execSync('git rev-parse --short HEAD', { cwd: ROOT, encoding: 'utf8' }).trim()}${
    execSync('git status --porcelain src', { cwd: ROOT, encoding: 'utf8' }).trim() ? ' plus uncommitted changes in src/' : ''
  }`;
  const cleanups: Array<() => Promise<void> | void> = [];
  const cleanup = async (): Promise<void> => {
    for (const step of cleanups.reverse()) {
      try {
        await step();
      } catch (error) {
        console.error('cleanup:', error);
      }
    }
    cleanups.length = 0;
  };
  const watchdog = setTimeout(() => {
    console.error('bench/transactional: watchdog after 10 minutes; stopping');
    void cleanup().finally(() => process.exit(2));
  }, 10 * 60_000);
  watchdog.unref();
  // Stopped by hand: drop the tables and stop the DBOS child all the same.
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      void cleanup().finally(() => process.exit(130));
    });
  }

  try {
    const monitor = new pg.Client({ ...pgConnection(), application_name: `oncely-bench-tx-monitor-${run}` });
    await monitor.connect();
    cleanups.push(() => monitor.end());
    const pgVersion = (await monitor.query<{ server_version: string }>('SHOW server_version')).rows[0]?.server_version ?? 'unknown';
    const commitMs0 = await commitProbe(monitor, run);
    const cpu = new ServerCpu(monitor);

    const pgSide = await postgresSide(run);
    cleanups.push(async () => {
      await pgSide.engine.close();
      await pgSide.pool.query(pgSide.tables.map((t) => `DROP TABLE IF EXISTS "${t}";`).join('\n'));
      await pgSide.pool.end();
    });
    const sqlite = sqliteSide();
    cleanups.push(async () => {
      await sqlite.engine.close();
      sqlite.db.close();
      rmSync(sqlite.dir, { recursive: true, force: true });
    });

    const pgPlain = postgresContestant(pgSide, cpu, 'plain', run);
    const pgTx = postgresContestant(pgSide, cpu, 'transactional', run);
    const sqlitePlain = sqliteContestant(sqlite, 'plain', run);
    const sqliteTx = sqliteContestant(sqlite, 'transactional', run);

    let dbos: DbosSide | undefined;
    let dbosSkipped: string | undefined;
    if (!WITH_DBOS) dbosSkipped = 'DBOS=0';
    else if (!existsSync(join(ROOT, 'bench', 'dbos', 'node_modules', '@dbos-inc', 'dbos-sdk'))) {
      dbosSkipped = 'bench/dbos is not installed (npm ci --prefix bench/dbos)';
    } else {
      try {
        dbos = await dbosSide(run, cpu);
        cleanups.push(() => dbos?.stop());
      } catch (error) {
        dbosSkipped = error instanceof Error ? error.message : String(error);
      }
    }
    if (dbosSkipped) console.log(`DBOS Transact left out: ${dbosSkipped}`);

    const replayKey = `${run}-replay`;
    // A replay never opens a transaction: it is the same path in both modes, measured once per store.
    const groups: Array<{ store: StoreName; path: Path; contestants: Contestant[] }> = [
      { store: 'PostgreSQL' as const, path: 'miss' as const, contestants: [pgPlain, pgTx, ...(dbos ? [dbos.contestant] : [])] },
      { store: 'PostgreSQL' as const, path: 'replay' as const, contestants: [pgTx, ...(dbos ? [dbos.contestant] : [])] },
      { store: 'SQLite' as const, path: 'miss' as const, contestants: [sqlitePlain, sqliteTx] },
      { store: 'SQLite' as const, path: 'replay' as const, contestants: [sqliteTx] },
    ].filter((g) => STORES.includes(g.store === 'PostgreSQL' ? 'postgres' : 'sqlite'));
    for (const c of [pgTx, sqliteTx, ...(dbos ? [dbos.contestant] : [])]) await c.prime(replayKey);
    // What each process spends with nothing to do (session heartbeats, DBOS's pollers), once everything is up.
    const idleMain = await idleCpu();
    const idleDbos = dbos ? await dbos.idle() : Number.NaN;

    const rows: Row[] = groups.flatMap((g) =>
      g.contestants.map((contestant) => ({
        store: g.store,
        path: g.path,
        contestant,
        samples: [],
        ratios: [],
        cpuRatios: [],
        vsTx: [],
        cpuVsTx: [],
      })),
    );
    // Every contestant once, unmeasured, before the rounds: the first one of round 1 would otherwise pay for the JIT alone.
    for (const g of groups) for (const c of g.contestants) await c.run(g.path, replayKey, { warmupS: 1, durationS: 0.5 });
    const rowOf = (g: (typeof groups)[number], c: Contestant): Row => rows.find((r) => r.store === g.store && r.path === g.path && r.contestant === c)!;
    for (let round = 0; round < ROUNDS; round++) {
      for (const g of groups) {
        const byId = new Map<string, Sample>();
        for (let i = 0; i < g.contestants.length; i++) {
          const c = g.contestants[(i + round) % g.contestants.length]!;
          const sample = await c.run(g.path, replayKey);
          byId.set(c.id, sample);
          rowOf(g, c).samples.push(sample);
          console.log(
            `round ${round + 1}: ${g.store} ${g.path} ${c.name}: ${sample.reqs.toFixed(0)} req/s, ` +
              `client CPU ${f0(sample.clientCpu)} µs/req, PostgreSQL CPU ${f0(sample.serverCpu ?? Number.NaN)} µs/req, ` +
              `${f2(sample.statements)} statements/req, ${f2(sample.commits)} commits/req, ` +
              `p50 ${f2(sample.p50)} ms, p99 ${f2(sample.p99)} ms, event loop ${f2(sample.elu)}, ${sample.failures} failed${sample.firstError ? ` (${sample.firstError})` : ''}`,
          );
        }
        // Ratios against plain oncely on the same store, measured in this round.
        const base = byId.get(g.store === 'PostgreSQL' ? (g.path === 'miss' ? 'pg-plain' : 'pg-transactional') : g.path === 'miss' ? 'sqlite-plain' : 'sqlite-transactional');
        const tx = byId.get(g.store === 'PostgreSQL' ? 'pg-transactional' : 'sqlite-transactional');
        const cpuOf = (x: Sample): number => x.clientCpu + (x.serverCpu ?? 0);
        for (const c of g.contestants) {
          const s = byId.get(c.id)!;
          if (base) {
            rowOf(g, c).ratios.push(s.reqs / base.reqs);
            rowOf(g, c).cpuRatios.push(cpuOf(s) / cpuOf(base));
          }
          if (tx && c.id === 'dbos') {
            rowOf(g, c).vsTx.push(s.reqs / tx.reqs);
            rowOf(g, c).cpuVsTx.push(cpuOf(s) / cpuOf(tx));
          }
        }
      }
    }

    // Ground truth: one payment and one ledger row for every successful new key.
    const checks: string[] = [];
    for (const c of [pgPlain, pgTx, sqlitePlain, sqliteTx, ...(dbos ? [dbos.contestant] : [])]) {
      const r = await c.rows();
      const ok = r.payments === r.made && r.ledger === r.made;
      checks.push(`${c.store}, ${c.name}: ${r.made} new keys answered, ${r.payments} payment rows, ${r.ledger} ledger rows${ok ? '' : ' **(mismatch)**'}`);
    }
    const commitMs1 = await commitProbe(monitor, run);
    const seconds = Math.round((Date.now() - started) / 1000);
    const load1 = loadavg();

    const head = [
      'store',
      'path',
      'contestant',
      'req/s median (range)',
      'ratio to plain',
      'client CPU µs/req',
      'PostgreSQL CPU µs/req',
      'CPU ratio to plain',
      'statements / req',
      'commits / req',
      'p50 ms',
      'p99 ms',
      'event loop busy',
      'failed',
    ];
    const body = rows.map((r) => {
      const s = (pick: (x: Sample) => number): Summary => med(r.samples.map(pick));
      const isPg = r.store === 'PostgreSQL';
      return [
        r.store,
        r.path,
        r.path === 'replay' && r.contestant.id !== 'dbos' ? 'oncely (either mode)' : r.contestant.name,
        fmtRange(s((x) => x.reqs)),
        r.ratios.length ? `${f2(med(r.ratios).median)} (${f2(med(r.ratios).min)}–${f2(med(r.ratios).max)})` : '–',
        fmtRange(s((x) => x.clientCpu)),
        isPg ? fmtRange(s((x) => x.serverCpu ?? Number.NaN)) : '– (in process)',
        r.cpuRatios.length ? `${f2(med(r.cpuRatios).median)} (${f2(med(r.cpuRatios).min)}–${f2(med(r.cpuRatios).max)})` : '–',
        `${f2(s((x) => x.statements).median)}${r.samples.at(-1)?.detail ? ` (${r.samples.at(-1)?.detail})` : ''}`,
        f2(s((x) => x.commits).median),
        fmtRange(s((x) => x.p50), 1),
        fmtRange(s((x) => x.p99), 1),
        f2(s((x) => x.elu).median),
        String(r.samples.reduce((n, x) => n + x.failures, 0)),
      ];
    });
    const median = (id: string, path: Path, pick: (x: Sample) => number): number =>
      med(rows.find((r) => r.contestant.id === id && r.path === path)?.samples.map(pick) ?? []).median;
    const range = (xs: number[]): string => {
      const m = med(xs);
      return `${f2(m.median)}× (rounds ${f2(m.min)}–${f2(m.max)})`;
    };
    const rowFor = (id: string, path: Path): Row | undefined => rows.find((r) => r.contestant.id === id && r.path === path);
    const cpuTotal = (id: string, path: Path): number => median(id, path, (x) => x.clientCpu + (x.serverCpu ?? 0));
    const pgTxRow = rowFor('pg-transactional', 'miss');
    const pgPlainRow = rowFor('pg-plain', 'miss');
    const dbosRow = rowFor('dbos', 'miss');
    const sqliteTxRow = rowFor('sqlite-transactional', 'miss');
    const meaning: string[] = [];
    if (pgTxRow && pgPlainRow) {
      meaning.push(
        `- **PostgreSQL, transactional mode against plain mode**, per request: client CPU ${f0(median('pg-transactional', 'miss', (x) => x.clientCpu))} against ${f0(median('pg-plain', 'miss', (x) => x.clientCpu))} µs, PostgreSQL CPU ${f0(median('pg-transactional', 'miss', (x) => x.serverCpu ?? Number.NaN))} against ${f0(median('pg-plain', 'miss', (x) => x.serverCpu ?? Number.NaN))} µs (medians; client + PostgreSQL CPU ${range(pgTxRow.cpuRatios)} plain mode's). ` +
          `The round trips are the same (${f2(median('pg-transactional', 'miss', (x) => x.statements))} against ${f2(median('pg-plain', 'miss', (x) => x.statements))}: the completion moves into the handler's transaction instead of following it), and there is one durable commit fewer (${f2(median('pg-transactional', 'miss', (x) => x.commits))} against ${f2(median('pg-plain', 'miss', (x) => x.commits))}). ` +
          `Throughput: ${range(pgTxRow.ratios)} plain mode's req/s${
            // A direction only when every round agrees: req/s swings with the load on this machine.
            med(pgTxRow.ratios).min > 1
              ? `, faster in every round: the commit saved shows, as every durable commit waits for the disk (${f1(commitMs0)} ms for one commit alone at the start of this run).`
              : med(pgTxRow.ratios).max < 1
                ? ', slower in every round although it does no more work.'
                : ': the rounds go both ways, so no difference shows through the noise of this machine; CPU per request, which moves far less, is the same too.'
          } ` +
          'What it does cost: the transaction stays open from `claim.transaction()` until the engine settles, so a handler that calls slow services after opening it holds a pool connection and its row locks that long, where plain mode can keep its own transaction short.',
      );
    }
    if (dbosRow && pgTxRow) {
      meaning.push(
        `- **DBOS Transact, same guarantee**: ${range(dbosRow.vsTx)} transactional oncely's req/s, and ${range(dbosRow.cpuVsTx)} its client + PostgreSQL CPU per request (${f0(cpuTotal('dbos', 'miss'))} against ${f0(cpuTotal('pg-transactional', 'miss'))} µs), measured in the same rounds. ` +
          `It makes ${f2(median('dbos', 'miss', (x) => x.statements))} round trips (${dbosRow.samples.at(-1)?.detail ?? ''}) and ${f2(median('dbos', 'miss', (x) => x.commits))} durable commits per payment against oncely's ${f2(median('pg-transactional', 'miss', (x) => x.statements))} and ${f2(median('pg-transactional', 'miss', (x) => x.commits))}: DBOS writes the workflow's status row when it starts (in a transaction of its own) and when it ends, the step's outcome and the workflow's executor in its system tables, and reads the status and the step's recorded outcome before running the step; its datasource looks for the step's checkpoint before the transaction and writes it inside. ` +
          `A replay (the same workflow id again): ${f0(median('dbos', 'replay', (x) => x.reqs))} against oncely's ${f0(median('pg-transactional', 'replay', (x) => x.reqs))} req/s (${range(rowFor('dbos', 'replay')?.ratios ?? [])}), ${f2(median('dbos', 'replay', (x) => x.statements))} round trips against ${f2(median('pg-transactional', 'replay', (x) => x.statements))}, ${f2(median('dbos', 'replay', (x) => x.commits))} commits against ${f2(median('pg-transactional', 'replay', (x) => x.commits))} (a replay inserts the status row in a transaction that it rolls back when the row is there, then reads the outcome; see the next point). ` +
          (med(dbosRow.cpuVsTx).median > 1
            ? "DBOS does more for its price (durable multi-step workflows, queues, recovery of the workflows a dead process was running); for one idempotent operation with its business writes, oncely's transactional mode reaches the same guarantee for less."
            : 'Here DBOS reached the same guarantee for no more CPU than oncely.'),
      );
    }
    const pgReplay = rowFor('pg-transactional', 'replay');
    if (pgReplay) {
      meaning.push(
        `- **oncely's replay on PostgreSQL** is one round trip, but a write (${f2(median('pg-transactional', 'replay', (x) => x.commits))} commits per request): the claim statement is an \`INSERT … ON CONFLICT DO UPDATE … WHERE\`, and PostgreSQL locks the conflicting row even when the WHERE leaves it unchanged. So every replay writes WAL and waits for its flush, and concurrent replays of one key take that row lock in turn${dbos ? `; DBOS answers a replay with reads (${f2(median('dbos', 'replay', (x) => x.commits))} commits) over more round trips` : ''}. The same in both modes: it is the claim, not the transaction.`,
      );
    }
    if (sqliteTxRow) {
      meaning.push(
        `- **SQLite**: transactional mode ran at ${range(sqliteTxRow.ratios)} plain mode's req/s, with ${f0(median('sqlite-transactional', 'miss', (x) => x.clientCpu))} against ${f0(median('sqlite-plain', 'miss', (x) => x.clientCpu))} µs of CPU per request (the database included), ${f2(median('sqlite-transactional', 'miss', (x) => x.statements))} against ${f2(median('sqlite-plain', 'miss', (x) => x.statements))} statements and one commit fewer (${f2(median('sqlite-transactional', 'miss', (x) => x.commits))} against ${f2(median('sqlite-plain', 'miss', (x) => x.commits))}). ` +
          `The event loop was busy ${f2(median('sqlite-transactional', 'miss', (x) => x.elu))} and ${f2(median('sqlite-plain', 'miss', (x) => x.elu))} of the time (it never sat waiting for work), so their req/s differ by the CPU this loaded machine gave the process and by the time it spent blocked in SQLite's synchronous file writes, both of which moved from round to round (see the ranges); CPU per request is the steadier figure. ` +
          "Transactions of concurrent requests take turns on the one connection (the store's gate) while a handler runs; this handler does not wait inside its transaction, so the turns cost nothing here, but one that awaits other I/O inside it holds every other request's writes for that long.",
      );
    }
    const lines = [
      '## Transactional mode',
      '',
      `The same two-step payment (insert a payment row, insert a ledger row, answer \`{ id, amount, currency }\`) per request, through the Engine directly (\`begin\`, then \`perform\`; no HTTP server, so that the framework's cost, the same for every contestant, does not dilute the difference), ${CONCURRENCY} requests in flight, each a new key (miss) or one primed key (replay). ${ROUNDS} rounds of ${DURATION} s after ${WARMUP} s of warm-up per contestant and path, every contestant of a store back to back in rotating order; medians (min–max) over the rounds, ratios taken per round against plain oncely on the same store (replay rows: against oncely's replay, the same path in both modes).`,
      '',
      '- **oncely, plain**: the handler writes through the pool in its own transaction (BEGIN, two INSERTs, COMMIT), then the engine completes the record: a crash between the two commits runs the payment again on a retry, unless the handler guards itself (a unique constraint).',
      '- **oncely, transactional**: the handler writes through `claim.transaction()`, whose transaction also completes the record: both commit, or neither.',
      dbos
        ? `- **DBOS Transact** ${dbos.versions['@dbos-inc/dbos-sdk']} (\`bench/dbos\`, a child process with its own node_modules): a workflow started with \`DBOS.startWorkflow(payment, { workflowID: key })\` and awaited with \`getResult()\`; the two INSERTs are one transaction step of \`DrizzleDataSource\` (${dbos.versions['@dbos-inc/drizzle-datasource']}, drizzle-orm ${dbos.versions['drizzle-orm']} over a \`pg\` ${dbos.versions.pg} Pool, raw SQL), whose checkpoint commits with them: the same guarantee as transactional mode. System tables and checkpoints in a schema of their own in the same database; pools of the same size as oncely's. SDK ${dbos.versions['@dbos-inc/dbos-sdk']}, not 5.x: every PostgreSQL datasource on npm imports helpers that SDK 5.x no longer exports, so no DBOS transaction step runs on 5.x; ${dbos.versions['@dbos-inc/dbos-sdk']} is the release of the newest datasource.`
        : `- DBOS Transact was left out of this run: ${dbosSkipped}.`,
      '',
      table(head, body),
      '',
      "- Client CPU: user + system time of the process running the contestant (this one for oncely, the DBOS child for DBOS) per request; on SQLite it includes the database. PostgreSQL CPU: the server backends serving that contestant's connections (by `application_name`, from /proc), per request; the WAL writer and checkpointer are not in it. CPU ratio: client + PostgreSQL CPU over plain oncely's, per round.",
      `- Idle: this process uses ${f0(idleMain)} µs of CPU a second with nothing to do (both engines' session heartbeats, timers)${dbos ? `, the DBOS child ${f0(idleDbos)} µs (its pollers)` : ''}; both are inside the client CPU above: at the miss rates that is ${f0(idleMain / median('pg-plain', 'miss', (x) => x.reqs))} µs per request for plain oncely on PostgreSQL${dbos ? ` and ${f0(idleDbos / median('dbos', 'miss', (x) => x.reqs))} µs for DBOS` : ''}.`,
      '- Event loop busy: the share of the window the process running the contestant had work to do (`performance.eventLoopUtilization()`); under 1, it was waiting for the database.',
      '- Statements: every `query` on a `pg` client (a round trip each; `pg` does not pipeline), or every SQLite statement run. Commits: an explicit COMMIT, or a write statement outside a transaction (whatever it ends up changing); on PostgreSQL each is a WAL flush (`fsync` and `synchronous_commit` on).',
      '- Ground truth after the run (one payment and one ledger row per new key answered, warm-up and priming included):',
      ...checks.map((c) => `  - ${c}`),
      '',
      'What it means:',
      '',
      ...meaning,
      '',
      'Machine:',
      '',
      `- CPU: ${cpus()[0]?.model ?? 'unknown'}, ${cpus().length} cores; memory ${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
      `- Node.js ${process.version}, PostgreSQL ${pgVersion} on 127.0.0.1:5432 (shared with other work), better-sqlite3 on a file in ${tmpdir()}; all over loopback on these cores`,
      `- one durable single-row commit alone took ${f1(commitMs0)} ms at the start and ${f1(commitMs1)} ms at the end (median of 20, one after another): the disk, shared with other work, sets the pace of every PostgreSQL row here`,
      `- load average (1, 5, 15 min) at start ${load0.map((l) => l.toFixed(1)).join(', ')}, at end ${load1.map((l) => l.toFixed(1)).join(', ')} on ${cpus().length} cores: other work shared the machine, which is why ratios are taken per round and CPU per request is given`,
      `- oncely at commit ${commit}, loaded from \`src/\` through tsx`,
      '',
      `Command: \`npm run bench:transactional\` (\`npm ci --prefix bench/dbos\`, then \`node --conditions=source --import tsx bench/transactional.ts\`; ROUNDS=${ROUNDS} DURATION=${DURATION} WARMUP=${WARMUP} CONCURRENCY=${CONCURRENCY}); ${seconds} s in all, ${new Date(started).toISOString().slice(0, 16)}Z.`,
    ].filter((line) => line !== undefined);
    const text = lines.join('\n').replace(/\n\n\n+/g, '\n\n');
    console.log(`\n${text}\n`);
    if (WRITE_DOC) writeSection('transactional', text);
  } finally {
    clearTimeout(watchdog);
    await cleanup();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().then(
    () => process.exit(0),
    (error: unknown) => {
      console.error(error);
      process.exit(1);
    },
  );
}
