/**
 * `npm run storm`: the story of oncely in one command.
 *
 * Starts the reference system (`reference/main.ts`, a child process on a temp
 * SQLite store, loopback) behind the fault proxy, and fires a few hundred
 * logical payments and orders at it with `oncely/client`: double clicks (the
 * same operation sent twice at once), dropped responses, answers held past
 * the client's timeout, 503s, and a proxy that retries upstream on its own
 * (NGINX `proxy_next_upstream`). Twice: once with oncely, once with
 * `IDEMPOTENCY=off`. Then it counts, from the server's own lists, how many
 * payments were made and how much was charged.
 *
 * Environment: `STORM_OPS` (300), `STORM_CONCURRENCY` (20), `STORM_SEED` (7),
 * `STORM_MAX_SECONDS` per run (40).
 *
 * @module
 */

import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createClient } from 'oncely/client';
import { type FaultProxy, startFaultProxy } from 'oncely/testing';
import { renderTable } from '../src/cli/table.js';
import { mulberry32 as prng } from '../src/testing/random.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const ACCOUNT = 'storm';

function envInt(name: string, fallback: number, min: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) {
    console.error(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return n;
}

const OPS = envInt('STORM_OPS', 300, 1);
const CONCURRENCY = envInt('STORM_CONCURRENCY', 20, 1);
const SEED = envInt('STORM_SEED', 7, 0);
const MAX_MS = envInt('STORM_MAX_SECONDS', 40, 1) * 1000;

/** Share of logical operations sent twice at once (a double click). */
const DOUBLE_CLICK = 0.2;
/** What the proxy does to each request it receives. */
const FAULTS = { 'drop-response': 0.08, delay: 0.06, 'fail-503': 0.06, 'retry-upstream': 0.1 } as const;
/** The client gives up on an attempt after this long; the proxy's `delay` holds answers longer. */
const ATTEMPT_TIMEOUT_MS = 800;
const DELAY_MS = 1_200;

/** One logical operation: what the user meant to do, once. */
interface Operation {
  n: number;
  kind: 'payment' | 'order';
  /** What it should charge, minor units. */
  amount: number;
  path: string;
  body: string;
  doubleClick: boolean;
}

interface RunResult {
  label: string;
  ops: number;
  doubleClicks: number;
  succeeded: number;
  failed: number;
  requests: number;
  retries: number;
  replayed: number;
  forwarded: number;
  faults: Record<keyof typeof FAULTS, number>;
  payments: number;
  orders: number;
  duplicatePayments: number;
  duplicateOrders: number;
  charged: number;
  expected: number;
  seconds: number;
}

function operations(): Operation[] {
  const random = prng(SEED);
  return Array.from({ length: OPS }, (_, n) => {
    const doubleClick = random() < DOUBLE_CLICK;
    if (n % 3 === 2) {
      const quantity = 1 + Math.floor(random() * 3);
      const price = 100 + Math.floor(random() * 900);
      // The sku names the operation, so its order (and that order's payment) can be found afterwards.
      const body = JSON.stringify({ currency: 'EUR', items: [{ sku: `op-${n}`, quantity, price }] });
      return { n, kind: 'order', amount: quantity * price, path: '/orders', body, doubleClick };
    }
    const amount = 100 + Math.floor(random() * 4900);
    const body = JSON.stringify({ amount, currency: 'EUR', customer: `op-${n}` });
    return { n, kind: 'payment', amount, path: '/payments', body, doubleClick };
  });
}

/** Starts `reference/main.ts` on a free loopback port; resolves once it prints `listening on`. */
async function startServer(dir: string, idempotency: boolean): Promise<{ url: string; child: ChildProcess }> {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', 'reference/main.ts'], {
    cwd: ROOT,
    env: {
      ...process.env,
      PORT: '0',
      HOST: '127.0.0.1',
      STORE_URL: `sqlite:${join(dir, 'oncely.db')}`,
      DATA_DIR: dir,
      IDEMPOTENCY: idempotency ? 'on' : 'off',
      // A payment provider that takes a moment: double clicks overlap, as they do for real.
      PAYMENT_DELAY_MS: '20',
      LOG: '',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  child.once('exit', () => children.delete(child));
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the reference system did not start within 30 s:\n${stderr}`)), 30_000);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const match = /listening on (http:\/\/\S+)/.exec(line);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]!);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the reference system exited with ${code}:\n${stderr}`));
    });
  });
  return { url, child };
}

async function stopServer(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(timer);
}

const children = new Set<ChildProcess>();
process.on('SIGINT', () => {
  for (const child of children) child.kill('SIGKILL');
  process.exit(130);
});

/** What the progress line shows. */
interface Counts {
  done: number;
  requests: number;
  retries: number;
}

/**
 * A progress indicator: one line rewritten in place on a terminal (10 times
 * a second), a plain line every 2 s otherwise (CI logs). `stop` prints the final state.
 */
function progress(label: string, counts: () => Counts): { stop(): void } {
  const tty = process.stderr.isTTY === true;
  const render = (): string => {
    const { done, requests, retries } = counts();
    const width = 24;
    const filled = Math.round((done / OPS) * width);
    return `${label.padEnd(16)} ${'█'.repeat(filled)}${'░'.repeat(width - filled)} ${done}/${OPS} operations · ${requests} requests · ${retries} retries`;
  };
  const draw = (): void => {
    process.stderr.write(tty ? `\r${render()}\x1b[K` : `${render()}\n`);
  };
  const timer = setInterval(draw, tty ? 100 : 2_000);
  if (tty) draw();
  return {
    stop() {
      clearInterval(timer);
      draw();
      if (tty) process.stderr.write('\n');
    },
  };
}

async function storm(label: string, idempotency: boolean, ops: Operation[]): Promise<RunResult> {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-storm-'));
  const started = Date.now();
  const { url, child } = await startServer(dir, idempotency);
  let proxy: FaultProxy | undefined;
  try {
    proxy = await startFaultProxy({
      target: url,
      faults: { probabilities: FAULTS, seed: SEED },
      delayMs: DELAY_MS,
      retryAfter: 1,
    });
    let requests = 0;
    let retries = 0;
    let replayed = 0;
    let done = 0;
    let succeeded = 0;
    const client = createClient({
      // Counts every attempt as it is sent (a double click is two clicks, each with its retries).
      fetch: (input, init) => {
        requests++;
        return fetch(input, init);
      },
      attemptTimeoutMs: ATTEMPT_TIMEOUT_MS,
      retries: 8,
      minDelayMs: 50,
      maxDelayMs: 1_000,
      deadlineMs: 30_000,
      onRetry: () => {
        retries++;
      },
    });
    const stop = AbortSignal.timeout(MAX_MS);
    setMaxListeners(0, stop); // every request in flight listens to it
    const bar = progress(label, () => ({ done, requests, retries }));

    /** One click: the client retries it under the operation's key until it has an answer. */
    const click = async (op: Operation, key: string): Promise<boolean> => {
      try {
        const res = await client.fetch(
          proxy!.url + op.path,
          {
            method: 'POST',
            headers: { authorization: `Bearer ${ACCOUNT}`, 'content-type': 'application/json' },
            body: op.body,
            signal: stop,
          },
          { key },
        );
        if (res.replayed) replayed++;
        await res.arrayBuffer();
        return res.status === 201;
      } catch {
        return false; // gave up (deadline) or the run was stopped: counted as not answered
      }
    };

    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < ops.length && !stop.aborted) {
        const op = ops[next++]!;
        // The key is made when the form is shown: both clicks of a double click carry it.
        const key = randomUUID();
        const clicks = op.doubleClick ? [click(op, key), click(op, key)] : [click(op, key)];
        const answers = await Promise.all(clicks);
        if (answers.some(Boolean)) succeeded++;
        done++;
      }
    };
    try {
      await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    } finally {
      bar.stop();
    }

    // Count from the server's own records, straight from the server (not through the proxy).
    const get = async <T>(path: string): Promise<T[]> => {
      const res = await fetch(url + path, { headers: { authorization: `Bearer ${ACCOUNT}` } });
      if (!res.ok) throw new Error(`GET ${path}: ${res.status}`);
      return ((await res.json()) as { data: T[] }).data;
    };
    const payments = await get<{ id: string; amount: number; customer?: string }>('/payments');
    const orders = await get<{ id: string; payment: string; items: Array<{ sku: string }> }>('/orders');
    const opOf = new Map<string, number>(); // payment id → operation
    for (const order of orders) opOf.set(order.payment, Number(order.items[0]!.sku.slice(3)));
    const chargedOps = new Set<number>();
    for (const payment of payments) {
      const n = payment.customer?.startsWith('op-') ? Number(payment.customer.slice(3)) : opOf.get(payment.id);
      if (n !== undefined) chargedOps.add(n);
    }
    const orderOps = new Set(orders.map((o) => o.items[0]!.sku));
    return {
      label,
      ops: ops.length,
      doubleClicks: ops.filter((o) => o.doubleClick).length,
      succeeded,
      failed: ops.length - succeeded,
      requests,
      retries,
      replayed,
      forwarded: proxy.stats.forwarded,
      faults: {
        'drop-response': proxy.stats['drop-response'],
        delay: proxy.stats.delay,
        'fail-503': proxy.stats['fail-503'],
        'retry-upstream': proxy.stats['retry-upstream'],
      },
      payments: payments.length,
      orders: orders.length,
      // Every payment beyond the first of its operation (an unattributable one counts too).
      duplicatePayments: payments.length - chargedOps.size,
      duplicateOrders: orders.length - orderOps.size,
      charged: payments.reduce((sum, p) => sum + p.amount, 0),
      expected: ops.reduce((sum, o) => sum + o.amount, 0),
      seconds: (Date.now() - started) / 1000,
    };
  } finally {
    await proxy?.close();
    await stopServer(child);
    rmSync(dir, { recursive: true, force: true });
  }
}

function pct(p: number): string {
  return `${Math.round(p * 100)}%`;
}

function money(minor: number): string {
  return `${(minor / 100).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 })} EUR`;
}

async function main(): Promise<void> {
  const ops = operations();
  const orders = ops.filter((o) => o.kind === 'order').length;
  console.log(
    [
      `oncely storm: ${OPS} logical operations (${OPS - orders} payments, ${orders} orders), ${CONCURRENCY} at a time, seed ${SEED}.`,
      `${Math.round(DOUBLE_CLICK * 100)}% are double clicks. Between the client (oncely/client) and the reference system, a proxy`,
      `drops ${pct(FAULTS['drop-response'])} of the answers, holds ${pct(FAULTS.delay)} past the client's ${ATTEMPT_TIMEOUT_MS} ms timeout,`,
      `answers 503 to ${pct(FAULTS['fail-503'])} and sends ${pct(FAULTS['retry-upstream'])} upstream twice (as NGINX does).`,
      'Run 1 with oncely, run 2 with IDEMPOTENCY=off: the same traffic, the same faults.',
      '',
    ].join('\n'),
  );
  const on = await storm('with oncely', true, ops);
  const off = await storm('IDEMPOTENCY=off', false, ops);
  const row = (name: string, f: (r: RunResult) => string | number): string[] => [name, String(f(on)), String(f(off))];
  console.log('');
  console.log(
    renderTable(
      ['', 'with oncely', 'IDEMPOTENCY=off'],
      [
        row('logical operations', (r) => r.ops),
        row('  of which double clicks', (r) => r.doubleClicks),
        row('  answered 201', (r) => r.succeeded),
        row('requests sent by the client', (r) => r.requests),
        row('  retries', (r) => r.retries),
        row('  answered with a replay', (r) => r.replayed),
        row('requests reaching the server', (r) => r.forwarded),
        row(
          'faults: dropped/held/503/re-sent',
          (r) => `${r.faults['drop-response']}/${r.faults.delay}/${r.faults['fail-503']}/${r.faults['retry-upstream']}`,
        ),
        row('payments created', (r) => r.payments),
        row('duplicates (payments)', (r) => r.duplicatePayments),
        row('orders created', (r) => r.orders),
        row('duplicates (orders)', (r) => r.duplicateOrders),
        row('total charged', (r) => money(r.charged)),
        row('expected', (r) => money(r.expected)),
        row('overcharged', (r) => money(r.charged - r.expected)),
        row('seconds', (r) => r.seconds.toFixed(1)),
      ],
      ['left', 'right', 'right'],
    ),
  );
  console.log('');
  const clean = on.duplicatePayments === 0 && on.duplicateOrders === 0 && on.charged === on.expected && on.failed === 0;
  console.log(
    clean
      ? `With oncely every operation was charged exactly once. Without it, the same traffic made ${off.duplicatePayments} duplicate payment(s): ${money(off.charged - off.expected)} charged too much.`
      : 'With oncely the counts do not match: see the table above (this is a bug worth reporting).',
  );
  process.exitCode = clean ? 0 : 1;
}

main().catch((error: unknown) => {
  console.error(error);
  for (const child of children) child.kill('SIGKILL');
  process.exit(1);
});
