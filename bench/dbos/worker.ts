/**
 * DBOS Transact in a child process of bench/transactional.ts: the same
 * two-step payment as a workflow whose workflow id is the idempotency key,
 * the two INSERTs one transaction step whose checkpoint commits with them.
 *
 * Its own node_modules (bench/dbos/package.json): never a dependency of
 * oncely. The load loop and the counting are bench/transactional.ts's, so
 * that both sides are measured by the same code. Talks to the parent over
 * IPC (see `ToWorker` / `FromWorker` there); started by it, never by hand.
 *
 * SDK 4.27.6, not 5.x: the PostgreSQL datasources published on npm
 * (drizzle, knex, postgres.js) import helpers that SDK 5.x no longer
 * exports (`checkSchemaInstallationPG`, `createTransactionCompletionSchemaPG`),
 * so no datasource runs on 5.x; 4.27.6 is the release of the newest one.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { DBOS } from '@dbos-inc/dbos-sdk';
import { DrizzleDataSource } from '@dbos-inc/drizzle-datasource';
import { createRequire } from 'node:module';
import pg from 'pg';
import {
  ACCOUNT,
  AMOUNT,
  type Counts,
  CURRENCY,
  countingPool,
  drive,
  type FromWorker,
  idleCpu,
  paymentTablesSql,
  pgConnection,
  type ToWorker,
} from '../transactional.js';

// The datasource is CommonJS: take drizzle-orm's CommonJS build too, so that the SQL it is
// handed comes from the same copy of drizzle-orm as the one that runs it.
const { sql } = createRequire(import.meta.url)('drizzle-orm') as typeof import('drizzle-orm', { with: { 'resolution-mode': 'require' } });

const RUN = process.env.RUN ?? 'dev';
const POOL = Number(process.env.POOL ?? 21);
const SCHEMA = `oncely_bench_dbos_${RUN}`;
const PREFIX = `oncely_bench_tx_${RUN}_dbos`;
const SYSTEM_APP = `oncely-bench-dbos-sys-${RUN}`;
const DATA_APP = `oncely-bench-dbos-app-${RUN}`;

const send = (message: FromWorker): void => {
  process.send?.(message);
};
const version = (name: string): string =>
  (JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), 'utf8')) as { version: string }).version;

async function main(): Promise<void> {
  const connection = pgConnection();
  const system: Counts = { statements: 0, commits: 0 };
  const data: Counts = { statements: 0, commits: 0 };
  const counts = (): Counts => ({ statements: system.statements + data.statements, commits: system.commits + data.commits });
  // Pools of the same size as oncely's; named, so that the parent finds their backends.
  const systemPool = countingPool(pg, { ...connection, max: POOL, idleTimeoutMillis: 0, application_name: SYSTEM_APP }, system);
  const dataPool = countingPool(pg, { ...connection, max: POOL, idleTimeoutMillis: 0, application_name: DATA_APP }, data);
  systemPool.on('error', () => {});
  dataPool.on('error', () => {});
  await dataPool.query(`CREATE SCHEMA IF NOT EXISTS "${SCHEMA}";\n${paymentTablesSql(PREFIX)}`);

  const payments = sql.identifier(`${PREFIX}_payments`);
  const ledger = sql.identifier(`${PREFIX}_ledger`);
  const dataSource = new DrizzleDataSource('payments', dataPool, {}, SCHEMA);
  const pay = dataSource.registerTransaction(
    async (key: string) => {
      const id = randomUUID();
      await dataSource.client.execute(
        sql`INSERT INTO ${payments} (id, idempotency_key, account, amount, currency) VALUES (${id}, ${key}, ${ACCOUNT}, ${AMOUNT}, ${CURRENCY})`,
      );
      await dataSource.client.execute(sql`INSERT INTO ${ledger} (payment_id, account, delta) VALUES (${id}, ${ACCOUNT}, ${-AMOUNT})`);
      return { id, amount: AMOUNT, currency: CURRENCY };
    },
    { name: 'pay' },
  );
  const payment = DBOS.registerWorkflow(async (key: string) => pay(key), { name: 'payment' });

  const url = `postgresql://${connection.user}@${connection.host}:${connection.port}/${connection.database}?application_name=${SYSTEM_APP}`;
  DBOS.setConfig({
    name: `oncely-bench-${RUN}`,
    systemDatabaseUrl: url,
    systemDatabasePool: systemPool,
    systemDatabaseSchemaName: SCHEMA,
    logLevel: 'error',
  });
  await DBOS.launch();

  let made = 0;
  let seq = 0;
  // The workflow id is the idempotency key (scoped to the account, as oncely's record id is).
  const request = async (key: string): Promise<void> => {
    const handle = await DBOS.startWorkflow(payment, { workflowID: `${ACCOUNT}:${key}` })(key);
    await handle.getResult();
  };

  let edgeAck: (() => void) | undefined;
  // Statements of each pool at the window's edges: where the round trips go.
  const at: Record<'start' | 'end', { system: number; data: number }> = { start: { system: 0, data: 0 }, end: { system: 0, data: 0 } };
  // Taken where drive() reads its own counts: just after the start edge, just before the end edge.
  const snapshot = (which: 'start' | 'end'): void => {
    at[which] = { system: system.statements, data: data.statements };
  };
  const edge = (which: 'start' | 'end'): Promise<void> =>
    new Promise((resolve) => {
      if (which === 'end') snapshot('end');
      edgeAck = () => {
        if (which === 'start') snapshot('start');
        resolve();
      };
      send({ ev: 'edge', edge: which });
    });

  const stop = async (): Promise<void> => {
    try {
      await DBOS.shutdown();
    } finally {
      await dataPool
        .query(`DROP SCHEMA IF EXISTS "${SCHEMA}" CASCADE; DROP TABLE IF EXISTS "${PREFIX}_payments", "${PREFIX}_ledger";`)
        .catch((error: unknown) => console.error('DBOS worker: cleanup failed:', error));
      await systemPool.end().catch(() => undefined);
      await dataPool.end().catch(() => undefined);
    }
  };

  process.on('message', (message: ToWorker) => {
    void (async () => {
      switch (message.cmd) {
        case 'edge-ack':
          edgeAck?.();
          edgeAck = undefined;
          return;
        case 'run': {
          const sample = await drive({
            request,
            key: () => (message.path === 'miss' ? `${RUN}-dbos-${seq++}` : message.replayKey),
            counts,
            concurrency: message.concurrency,
            warmupS: message.warmupS,
            durationS: message.durationS,
            window: { start: () => edge('start'), end: () => edge('end') },
          });
          if (message.path === 'miss') made += sample.succeeded;
          const per = (n: number): string => (sample.requests > 0 ? (n / sample.requests).toFixed(2) : '–');
          const detail = `${per(at.end.system - at.start.system)} system database + ${per(at.end.data - at.start.data)} datasource`;
          send({ ev: 'sample', sample: { ...sample, detail } });
          return;
        }
        case 'prime':
          await request(message.key);
          made++;
          send({ ev: 'primed' });
          return;
        case 'rows': {
          const { rows } = await dataPool.query<{ p: string; l: string }>(
            `SELECT (SELECT count(*) FROM "${PREFIX}_payments") AS p, (SELECT count(*) FROM "${PREFIX}_ledger") AS l`,
          );
          send({ ev: 'rows', payments: Number(rows[0]?.p), ledger: Number(rows[0]?.l), made });
          return;
        }
        case 'idle':
          send({ ev: 'idle', us: await idleCpu() });
          return;
        case 'stop':
          await stop();
          send({ ev: 'stopped' });
          process.exit(0);
      }
    })().catch((error: unknown) => send({ ev: 'failed', error: error instanceof Error ? (error.stack ?? error.message) : String(error) }));
  });
  // The parent gone: stop too.
  process.on('disconnect', () => void stop().finally(() => process.exit(0)));

  send({
    ev: 'ready',
    apps: [SYSTEM_APP, DATA_APP],
    versions: {
      '@dbos-inc/dbos-sdk': version('@dbos-inc/dbos-sdk'),
      '@dbos-inc/drizzle-datasource': version('@dbos-inc/drizzle-datasource'),
      'drizzle-orm': version('drizzle-orm'),
      pg: version('pg'),
    },
  });
}

main().catch((error: unknown) => {
  send({ ev: 'failed', error: error instanceof Error ? (error.stack ?? error.message) : String(error) });
  process.exit(1);
});
