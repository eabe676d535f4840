/**
 * A process that runs one operation through the engine on a SQL store, for
 * the crash tests of process sessions and transactional mode. Run it with
 * `node --conditions=source --import tsx test/support/store-child.ts`
 * (see `spawnStoreChild` in store-children.ts). Settings come from the
 * environment:
 *
 * - `STORE`: `postgres`, `mysql` or `sqlite`; `TABLE`: the records table;
 *   `BUSINESS`: the business table (`record_id`, `amount`, no unique
 *   constraint: a second run would show as a second row); `SQLITE_FILE`.
 * - `ID`: the record id; `LEASE_MS` (default 30 000, the engine's default);
 *   `WAIT_MS`: wait that long for a claim in progress elsewhere (a takeover
 *   once its owner's session has died) instead of giving up at once.
 * - `MODE`: `transaction` writes one business row through the claim's
 *   transaction; `hold` holds the claim for `HOLD_MS`, then completes.
 * - `FAULT` (the fault hook): `after-claim` SIGKILLs the process once the
 *   claim is won, `before-commit` between the business write and the
 *   commit, `after-commit` once the commit returned; `none` runs through.
 *
 * It prints one line per step: `claimed <takeover>`, `written`,
 * `done <settled>`, or `busy <kind>` when it did not win the claim.
 */
import { Engine, type IdempotencyStore } from 'oncely';

const env = (name: string, fallback?: string): string => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`store-child: ${name} is not set`);
  return value;
};
const say = (line: string): void => {
  process.stdout.write(`${line}\n`);
};
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const die = (): never => {
  process.kill(process.pid, 'SIGKILL');
  throw new Error('unreachable');
};

const kind = env('STORE');
const table = env('TABLE');
const business = env('BUSINESS');
const id = env('ID');
const mode = env('MODE', 'transaction');
const fault = env('FAULT', 'none');
const holdMs = Number(env('HOLD_MS', '0'));
const leaseMs = Number(env('LEASE_MS', '30000'));
const waitMs = Number(env('WAIT_MS', '0'));

interface Opened {
  store: IdempotencyStore;
  /** Write one business row through the driver handle of the open transaction. */
  write(client: unknown): Promise<void>;
  close(): Promise<void>;
}

async function open(): Promise<Opened> {
  if (kind === 'postgres') {
    const [{ default: pg }, { postgresStore }] = await Promise.all([import('pg'), import('oncely/stores/postgres')]);
    const pool = new pg.Pool({
      host: process.env.PGHOST ?? '127.0.0.1',
      port: Number(process.env.PGPORT ?? 5432),
      user: process.env.PGUSER ?? 'postgres',
      database: process.env.PGDATABASE ?? 'test',
      max: 4,
    });
    pool.on('error', () => {});
    const store = postgresStore({ pool, table, purge: false });
    return {
      store,
      async write(client) {
        await (client as import('pg').PoolClient).query(`INSERT INTO "${business}" (record_id, amount) VALUES ($1, 42)`, [id]);
      },
      async close() {
        await store.close();
        await pool.end();
      },
    };
  }
  if (kind === 'mysql') {
    const [{ default: mysql }, { mysqlStore }] = await Promise.all([import('mysql2/promise'), import('oncely/stores/mysql')]);
    const pool = mysql.createPool({
      host: process.env.MYSQL_HOST ?? '127.0.0.1',
      port: Number(process.env.MYSQL_PORT ?? 3306),
      user: process.env.MYSQL_USER ?? 'root',
      database: process.env.MYSQL_DATABASE ?? 'test',
      connectionLimit: 4,
    });
    const store = mysqlStore({ pool, table, purge: false });
    return {
      store,
      async write(client) {
        await (client as import('mysql2/promise').PoolConnection).execute(
          `INSERT INTO \`${business}\` (record_id, amount) VALUES (?, 42)`,
          [id],
        );
      },
      async close() {
        await store.close();
        await pool.end();
      },
    };
  }
  if (kind === 'sqlite') {
    const [{ default: Database }, { sqliteStore }] = await Promise.all([import('better-sqlite3'), import('oncely/stores/sqlite')]);
    const database = new Database(env('SQLITE_FILE'));
    const store = sqliteStore({ database, table, purge: false });
    return {
      store,
      async write(client) {
        (client as import('better-sqlite3').Database).prepare(`INSERT INTO "${business}" (record_id, amount) VALUES (?, 42)`).run(id);
      },
      async close() {
        await store.close();
        database.close();
      },
    };
  }
  throw new Error(`store-child: unknown STORE ${kind}`);
}

const opened = await open();
const engine = new Engine({ store: opened.store, leaseMs });
const begun = await engine.begin({ id, fingerprint: 'v1:store-child', wait: waitMs > 0 ? { timeoutMs: waitMs } : false });
if (begun.kind !== 'run') {
  say(`busy ${begun.kind}`);
} else {
  say(`claimed ${begun.claim.takeover}`);
  if (fault === 'after-claim') die();
  const performed = await begun.claim.perform({
    run: async (claim) => {
      if (mode === 'hold') {
        await sleep(holdMs);
        return { held: true };
      }
      const client = await claim.transaction();
      await opened.write(client);
      say('written');
      if (fault === 'before-commit') die();
      return { paid: 42, by: process.pid };
    },
    settle: (value) => ({ kind: 'complete', outcome: JSON.stringify(value) }),
  });
  if (fault === 'after-commit') die();
  say(`done ${performed.settled}`);
}
await engine.close();
await opened.close();
