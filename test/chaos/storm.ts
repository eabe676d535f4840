/**
 * One chaos run (issue 11, "What must be shown"): three real reference
 * instances (`reference/main.ts` child processes) behind a private NGINX
 * that re-sends failed POSTs to the next instance, `oncely/client` with its
 * default retry policy sending logical payments and orders, and a SIGKILL
 * of a random instance every 2-4 s, restarted at once on the same port.
 *
 * Everything counted comes from the databases, not from the client:
 * payments and orders from the business database, records and process
 * sessions from the idempotency store (see probes.ts).
 *
 * Kill → takeover: right after each kill, the records in progress are read
 * with their owner session; 1.2 s later (past the 1 s session TTL, before
 * the next kill) the owners whose session is no longer alive are the
 * killed instance's (sessions are per process, and only this run's
 * processes use this run's store). Each of those claims is then polled
 * every 50 ms until another instance has completed it: the time from the
 * SIGKILL to that completion is one sample. A claim whose completion was
 * already on its way when the process died (PostgreSQL committed what it
 * had received; the record still names the dead owner) is counted apart:
 * nothing was taken over.
 */
import { loadavg } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { ClientRequestError, createClient } from 'oncely/client';
import { openBusinessDb } from '../../reference/db.js';
import { kill9, killAllServers, type Server, startServer } from '../support/reference-process.js';
import { nginxStatuses, resentRequests, startNginx, upstreamErrors } from './nginx.js';
import type { StoreProbe } from './probes.js';

/** One configuration of the run. */
export interface ChaosConfig {
  /** Label in the table. */
  name: string;
  /** STORE_URL of every instance. */
  storeUrl: string;
  /** DATABASE_URL of every instance. */
  databaseUrl: string;
  /** DATABASE_TABLE_PREFIX of every instance (a fresh one per run). */
  tablePrefix: string;
  /** Reads the store named by `storeUrl`. */
  probe: StoreProbe;
  /** A directory of this run: DATA_DIR, NGINX's prefix. */
  dir: string;
  /** The nginx binary. */
  nginx: string;
  /** Loopback ports: NGINX first, then one per instance. */
  ports: readonly number[];
  /** The account (idempotency scope) of every operation. */
  account: string;
  payments: number;
  orders: number;
  /** Client operations running at once. */
  concurrency: number;
  /** The operations start evenly over this long, ms. */
  stormMs: number;
  /** Kill interval bounds, ms. */
  killEveryMs: readonly [number, number];
  /** More environment for every instance (delays, WAIT_MS…). */
  env: Record<string, string>;
  /** Progress lines. */
  log: (line: string) => void;
}

/** What a run measured. */
export interface ChaosResult {
  name: string;
  payments: number;
  orders: number;
  kills: number;
  restartFailures: string[];
  /** Claims in progress on an instance when it was killed, that another instance had to take over. */
  killedClaims: number;
  /** Claims of a killed instance whose own completion reached the store after the SIGKILL (not takeovers). */
  finishedByKilled: number;
  /** Per killed claim: ms from the SIGKILL to its completion by another instance. */
  takeoverMs: number[];
  /** Per killed claim: ms from the SIGKILL until another instance was seen holding it (the takeover's claim itself). */
  claimedMs: number[];
  /** Killed claims no other instance completed within the tracking window. */
  notTakenOver: number;
  duplicatePayments: number;
  ordersChargedTwice: number;
  duplicateOrders: number;
  /** 2xx answers the client got whose row is not in the database. */
  lost: number;
  /** Operations that never got a 2xx, not even on the re-send after the storm. */
  unanswered: number;
  /** Payment and order rows whose record is not completed. */
  rowsWithoutRecord: number;
  /** Records in progress 10 s after the storm. */
  inFlightAfter10s: number;
  /** Re-sending every key after that: 409 answers, other non-201 answers, 201s that differ from the first one. */
  resend409: number;
  resendOther: number;
  answersChanged: number;
  /** Operations whose first call (the client's default retries) ended without a 2xx. */
  beyondFirstCall: number;
  /** HTTP attempts the client made in all (its own retries included). */
  attempts: number;
  /** Client requests NGINX sent to more than one instance. */
  nginxResends: number;
  stormSeconds: number;
  /** How busy the machine was: the 1-minute load average at the start and the end, and an instance's start time (p50, ms). */
  load: { start: number; end: number; instanceStartMs: number };
  /** Notes for failures: unanswered operations, claims not taken over. */
  notes: string[];
}

interface Operation {
  kind: 'payment' | 'order';
  key: string;
  path: string;
  body: string;
  /** The payment's amount, or the order's total (unique in the run: an order's payment is found by it). */
  amount: number;
}

interface Outcome {
  /** The id of the first 2xx answer. */
  id: string | undefined;
  calls: number;
  attempts: number;
  firstCallOk: boolean;
  last: string;
}

/** Longest wait for an instance's takeover-tracking, ms after the kill. */
const TRACK_MS = 20_000;
/** Client calls per operation: the first with the default policy, then "keep the key and retry later" (docs/client.md). */
const MAX_CALLS = 8;

function percentileOf(sorted: readonly number[], p: number): number | undefined {
  if (sorted.length === 0) return undefined;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

/** Nearest-rank percentile of `values` (undefined when empty). */
export function percentile(values: readonly number[], p: number): number | undefined {
  return percentileOf([...values].sort((a, b) => a - b), p);
}

function operations(config: ChaosConfig, run: string): Operation[] {
  const ops: Operation[] = [];
  for (let i = 0; i < config.payments; i++) {
    const key = `${run}-pay-${i}`;
    // The customer is the key: a payment row is found by it, duplicates too.
    const amount = 100 + i;
    ops.push({ kind: 'payment', key, path: '/payments', amount, body: JSON.stringify({ amount, currency: 'EUR', customer: key }) });
  }
  for (let i = 0; i < config.orders; i++) {
    const key = `${run}-ord-${i}`;
    // A total of its own: the order's payment (no customer) is found by its amount.
    const amount = 1_000_000 + i;
    ops.push({
      kind: 'order',
      key,
      path: '/orders',
      amount,
      body: JSON.stringify({ currency: 'EUR', items: [{ sku: key, quantity: 1, price: amount }] }),
    });
  }
  // Interleaved at random, so that kills meet both kinds.
  for (let i = ops.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [ops[i], ops[j]] = [ops[j]!, ops[i]!];
  }
  return ops;
}

/**
 * One loop for every kill's tracking: polls the records being watched every
 * 50 ms (one query for all) and notes when each was first seen completed.
 */
class CompletionWatch {
  readonly #watching = new Map<string, number>();
  readonly #completedAt = new Map<string, { at: number; owner: string | undefined }>();
  /** Every owner seen in progress on each record, with when it was first seen. */
  readonly #owners = new Map<string, Array<{ at: number; owner: string | undefined }>>();
  #running = true;
  readonly #loop: Promise<void>;

  constructor(probe: StoreProbe) {
    this.#loop = (async () => {
      while (this.#running) {
        const ids = [...this.#watching.keys()].filter((id) => !this.#completedAt.has(id));
        if (ids.length > 0) {
          try {
            const states = await probe.states(ids);
            const now = Date.now();
            for (const [id, state] of states) {
              if (state.state === 'completed') this.#completedAt.set(id, { at: now, owner: state.owner });
              if (state.state === 'in_progress') {
                const seen = this.#owners.get(id) ?? [];
                if (seen.at(-1)?.owner !== state.owner) seen.push({ at: now, owner: state.owner });
                this.#owners.set(id, seen);
              }
            }
          } catch {
            // a slow or failed read: the next round tries again
          }
        }
        await sleep(50);
      }
    })();
  }

  watch(ids: readonly string[]): void {
    for (const id of ids) this.#watching.set(id, (this.#watching.get(id) ?? 0) + 1);
  }

  unwatch(ids: readonly string[]): void {
    for (const id of ids) {
      const left = (this.#watching.get(id) ?? 1) - 1;
      if (left > 0) this.#watching.set(id, left);
      else this.#watching.delete(id);
    }
  }

  /**
   * When `id` was first seen completed (epoch ms), if it was, and the owner
   * the store still names then (PostgreSQL keeps it; Redis drops it).
   */
  completedAt(id: string): { at: number; owner: string | undefined } | undefined {
    return this.#completedAt.get(id);
  }

  /**
   * When another owner than `from` was first seen holding `id` (the
   * takeover's claim), or, if no such moment was seen between two polls,
   * when `id` was seen completed by another owner.
   */
  takenOverAt(id: string, from: string): number | undefined {
    const other = this.#owners.get(id)?.find((seen) => seen.owner !== from);
    const completed = this.#completedAt.get(id);
    const completedElsewhere = completed !== undefined && completed.owner !== from ? completed.at : undefined;
    if (other === undefined) return completedElsewhere;
    return completedElsewhere === undefined ? other.at : Math.min(other.at, completedElsewhere);
  }

  async stop(): Promise<void> {
    this.#running = false;
    await this.#loop;
  }
}

/** Run one configuration; every process it started is gone when it returns or throws. */
export async function runChaos(config: ChaosConfig): Promise<ChaosResult> {
  const { probe, log } = config;
  const loadAtStart = loadavg()[0]!;
  const run = config.tablePrefix.replace(/_$/, '');
  const [nginxPort, ...instancePorts] = config.ports;
  const nginxUrl = `http://127.0.0.1:${nginxPort}`;
  const env = {
    STORE_URL: config.storeUrl,
    DATABASE_URL: config.databaseUrl,
    DATABASE_TABLE_PREFIX: config.tablePrefix,
    PAYMENTS_URL: nginxUrl, // orders pay through NGINX too, so their payments meet the kills
    LEASE_MS: '', // the server's default (30 s): takeover must come from process sessions
    WAIT_MS: '',
    FAULT: '',
    ...config.env,
  };

  interface Slot {
    port: number;
    server: Server | undefined;
    restarting: Promise<void> | undefined;
  }
  const slots: Slot[] = instancePorts.map((port) => ({ port, server: undefined, restarting: undefined }));
  const restartFailures: string[] = [];
  const restartMs: number[] = [];
  const started: Server[] = [];
  const start = async (slot: Slot): Promise<void> => {
    const begun = Date.now();
    slot.server = await startServer(config.dir, { ...env, PORT: String(slot.port) });
    started.push(slot.server);
    restartMs.push(Date.now() - begun);
  };

  const nginx = await startNginx({ binary: config.nginx, dir: `${config.dir}/nginx`, port: nginxPort!, upstreams: instancePorts });
  let stormOver = false;
  const notes: string[] = [];
  const watch = new CompletionWatch(probe);
  try {
    await Promise.all(slots.map(start));
    log(`${config.name}: 3 instances on ${instancePorts.join(', ')} behind NGINX on ${nginxPort}`);

    // --- the storm -------------------------------------------------------
    const ops = operations(config, run);
    const outcomes: Outcome[] = new Array(ops.length);
    const client = createClient(); // its default retry policy (docs/client.md, docs/retry-budget.md)
    const headers = { authorization: `Bearer ${config.account}`, 'content-type': 'application/json' };

    const call = async (op: Operation): Promise<{ status: number; id?: string; attempts: number; last: string }> => {
      try {
        const res = await client.fetch(`${nginxUrl}${op.path}`, { method: 'POST', headers, body: op.body }, { key: op.key });
        const text = await res.text();
        if (res.status === 201) return { status: 201, id: (JSON.parse(text) as { id: string }).id, attempts: res.attempts, last: '201' };
        return { status: res.status, attempts: res.attempts, last: `${res.status} ${text.slice(0, 200)}` };
      } catch (error) {
        if (!(error instanceof ClientRequestError)) throw error;
        return { status: 0, attempts: error.attempts, last: `${error.reason}: ${String(error.cause ?? '')}` };
      }
    };
    const perform = async (op: Operation): Promise<Outcome> => {
      const outcome: Outcome = { id: undefined, calls: 0, attempts: 0, firstCallOk: false, last: '' };
      while (outcome.calls < MAX_CALLS) {
        outcome.calls++;
        const answer = await call(op);
        outcome.attempts += answer.attempts;
        outcome.last = answer.last;
        if (answer.id !== undefined) {
          outcome.id = answer.id;
          outcome.firstCallOk = outcome.calls === 1;
          return outcome;
        }
        // 409 in flight, 5xx, no answer: keep the key, retry later. Anything else is final.
        if (answer.status !== 0 && answer.status !== 409 && answer.status < 500) return outcome;
        await sleep(1_000);
      }
      return outcome;
    };

    // Kills, and the tracking of each killed instance's claims.
    const knownDead = new Set<string>();
    const trackers: Array<Promise<void>> = [];
    const takeoverMs: number[] = [];
    const claimedMs: number[] = [];
    let killedClaims = 0;
    let finishedByKilled = 0;
    let notTakenOver = 0;
    let kills = 0;
    const stormStart = Date.now();
    const track = async (n: number, port: number, t0: number, snapshot: Map<string, string | undefined>): Promise<void> => {
      const ids = [...snapshot.keys()];
      watch.watch(ids);
      try {
        // Past the session TTL (1 s), before the next kill: the owners no longer alive are the killed instance's.
        await sleep(Math.max(0, t0 + 1_200 - Date.now()));
        const owners = new Set([...snapshot.values()].filter((owner): owner is string => owner !== undefined && !knownDead.has(owner)));
        const dead = new Set<string>();
        for (const owner of owners) if (!(await probe.alive(owner))) dead.add(owner);
        for (const owner of dead) knownDead.add(owner);
        const killed = [...snapshot].filter(([, owner]) => owner !== undefined && dead.has(owner)).map(([id]) => id);
        while (Date.now() < t0 + TRACK_MS && killed.some((id) => watch.completedAt(id) === undefined)) await sleep(50);
        const times: number[] = [];
        for (const id of killed) {
          const completed = watch.completedAt(id);
          if (completed === undefined) {
            killedClaims++;
            notTakenOver++;
            notes.push(`kill ${n}: claim ${id} not completed ${TRACK_MS / 1000} s after the kill`);
          } else if (completed.owner !== undefined && completed.owner === snapshot.get(id)) {
            // Its completion was already on its way to the store when the process died (PostgreSQL
            // finished a COMMIT it had received): finished by the killed instance, nothing to take over.
            finishedByKilled++;
          } else {
            killedClaims++;
            times.push(completed.at - t0);
            claimedMs.push((watch.takenOverAt(id, snapshot.get(id)!) ?? completed.at) - t0);
          }
        }
        takeoverMs.push(...times);
        log(
          `  kill ${n} at +${((t0 - stormStart) / 1000).toFixed(1)} s (:${port}): ${snapshot.size} records in progress, ` +
            `${killed.length} of its own${times.length ? `, completed elsewhere after ${times.map((t) => (t / 1000).toFixed(2)).join(', ')} s` : ''}`,
        );
      } finally {
        watch.unwatch(ids);
      }
    };

    let wake: () => void = () => {};
    const over = new Promise<void>((resolve) => {
      wake = resolve;
    });
    const killLoop = async (): Promise<void> => {
      const [low, high] = config.killEveryMs;
      while (!stormOver) {
        await Promise.race([sleep(low + Math.random() * (high - low)), over]);
        if (stormOver) return;
        const up = slots.filter((slot) => slot.server !== undefined && slot.restarting === undefined);
        // Never the last one up: a total outage would time the restart, not the takeover.
        if (up.length < 2) continue;
        const slot = up[Math.floor(Math.random() * up.length)]!;
        const server = slot.server!;
        slot.server = undefined;
        const t0 = Date.now();
        await kill9(server);
        const n = ++kills;
        const snapshot = await probe.inProgress().catch(() => new Map<string, string | undefined>());
        trackers.push(
          track(n, slot.port, t0, snapshot).catch((error: unknown) => {
            notes.push(`kill ${n}: tracking failed: ${String(error)}`);
            notTakenOver++;
          }),
        );
        // Restarted at once on the same port, so that NGINX uses it again.
        slot.restarting = start(slot)
          .catch((error: unknown) => {
            restartFailures.push(String(error).slice(0, 500));
          })
          .finally(() => {
            slot.restarting = undefined;
          });
      }
    };

    const killing = killLoop();
    const spacing = config.stormMs / ops.length;
    let next = 0;
    const worker = async (): Promise<void> => {
      for (;;) {
        const i = next++;
        if (i >= ops.length) return;
        await sleep(Math.max(0, stormStart + i * spacing - Date.now()));
        outcomes[i] = await perform(ops[i]!);
      }
    };
    await Promise.all(Array.from({ length: config.concurrency }, worker));
    const stormEnd = Date.now();
    stormOver = true;
    wake();
    await killing;
    await Promise.all(slots.map((slot) => slot.restarting));
    await Promise.all(trackers);
    await watch.stop();
    log(`${config.name}: NGINX answers ${nginxStatuses(nginx.accessLog())}; upstream errors ${upstreamErrors(nginx.errorLog())}; instance starts p50 ${percentile(restartMs, 50)} ms, max ${percentile(restartMs, 100)} ms`);
    log(`${config.name}: storm over in ${((stormEnd - stormStart) / 1000).toFixed(1)} s, ${kills} kills`);

    // --- 10 s after the storm: nothing may still be in flight -------------
    await sleep(Math.max(0, stormEnd + 10_000 - Date.now()));
    const inFlightAfter10s = (await probe.inProgress()).size;

    // Every key once more: each must be a replay of the first answer, none in flight.
    for (const slot of slots) if (slot.server === undefined) await start(slot).catch((error: unknown) => restartFailures.push(String(error)));
    let resend409 = 0;
    let resendOther = 0;
    let answersChanged = 0;
    const resendIds: Array<string | undefined> = new Array(ops.length);
    let cursor = 0;
    await Promise.all(
      Array.from({ length: config.concurrency }, async () => {
        for (;;) {
          const i = cursor++;
          if (i >= ops.length) return;
          const answer = await call(ops[i]!);
          if (answer.status === 409) resend409++;
          else if (answer.id === undefined) resendOther++;
          resendIds[i] = answer.id;
          if (answer.id !== undefined && outcomes[i]!.id !== undefined && answer.id !== outcomes[i]!.id) answersChanged++;
        }
      }),
    );

    // --- ground truth from the business database ---------------------------
    const db = await openBusinessDb({ url: config.databaseUrl, dataDir: config.dir, prefix: config.tablePrefix });
    let payments: Array<{ id: string; customer: string | null; amount: number; idempotency_id: string | null }>;
    let orders: Array<{ id: string; items: string; payment: string; idempotency_id: string | null }>;
    try {
      payments = (
        await db.all<{ id: string; customer: string | null; amount: number | string; idempotency_id: string | null }>(
          `SELECT id, customer, amount, idempotency_id FROM ${db.tables.payments} WHERE account = ?`,
          [config.account],
        )
      ).map((row) => ({ ...row, amount: Number(row.amount) }));
      orders = await db.all(`SELECT id, items, payment, idempotency_id FROM ${db.tables.orders} WHERE account = ?`, [config.account]);
    } finally {
      await db.close();
    }
    const paymentsByCustomer = new Map<string, typeof payments>();
    const orderPaymentsByAmount = new Map<number, typeof payments>();
    for (const row of payments) {
      if (row.customer !== null) paymentsByCustomer.set(row.customer, [...(paymentsByCustomer.get(row.customer) ?? []), row]);
      else orderPaymentsByAmount.set(row.amount, [...(orderPaymentsByAmount.get(row.amount) ?? []), row]);
    }
    const ordersBySku = new Map<string, typeof orders>();
    for (const row of orders) {
      for (const item of JSON.parse(row.items) as Array<{ sku: string }>) ordersBySku.set(item.sku, [...(ordersBySku.get(item.sku) ?? []), row]);
    }
    const paymentIds = new Set(payments.map((row) => row.id));

    let duplicatePayments = 0;
    let ordersChargedTwice = 0;
    let duplicateOrders = 0;
    let lost = 0;
    let unanswered = 0;
    ops.forEach((op, i) => {
      const ids = [outcomes[i]!.id, resendIds[i]].filter((id): id is string => id !== undefined);
      if (ids.length === 0) {
        unanswered++;
        notes.push(`${op.key}: no 2xx (last: ${outcomes[i]!.last})`);
      }
      if (op.kind === 'payment') {
        const rows = paymentsByCustomer.get(op.key) ?? [];
        duplicatePayments += Math.max(0, rows.length - 1);
        for (const id of new Set(ids)) if (!rows.some((row) => row.id === id)) lost++;
      } else {
        const rows = ordersBySku.get(op.key) ?? [];
        duplicateOrders += Math.max(0, rows.length - 1);
        if ((orderPaymentsByAmount.get(op.amount) ?? []).length > 1) ordersChargedTwice++;
        for (const id of new Set(ids)) {
          const row = rows.find((r) => r.id === id);
          if (row === undefined || !paymentIds.has(row.payment)) lost++;
        }
      }
    });
    // The instances' own errors (a 5xx that is not oncely's is logged with its cause), and with
    // LOG=1 (CHAOS_LOG=1) their 5xx answers, for the notes.
    for (const server of started) {
      const output = server.output();
      for (const match of output.matchAll(/\[reference\] \S+ \S+ failed:/g)) {
        if (notes.length < 40) notes.push(`instance: ${output.slice(match.index, match.index + 800)}`);
      }
      for (const line of output.split('\n')) {
        if (/"statusCode":5\d\d|"level":50/.test(line) && notes.length < 40) notes.push(`instance: ${line.slice(0, 600)}`);
      }
    }
    const recordIds = [...payments, ...orders].map((row) => row.idempotency_id).filter((id): id is string => id !== null);
    const states = await probe.states(recordIds);
    const rowsWithoutRecord = [...states.values()].filter((state) => state.state !== 'completed').length;

    return {
      name: config.name,
      payments: config.payments,
      orders: config.orders,
      kills,
      restartFailures,
      killedClaims,
      finishedByKilled,
      takeoverMs,
      claimedMs,
      notTakenOver,
      duplicatePayments,
      ordersChargedTwice,
      duplicateOrders,
      lost,
      unanswered,
      rowsWithoutRecord,
      inFlightAfter10s,
      resend409,
      resendOther,
      answersChanged,
      beyondFirstCall: outcomes.filter((o) => !o.firstCallOk).length,
      attempts: outcomes.reduce((sum, o) => sum + o.attempts, 0),
      nginxResends: resentRequests(nginx.accessLog()),
      stormSeconds: (stormEnd - stormStart) / 1000,
      load: { start: loadAtStart, end: loadavg()[0]!, instanceStartMs: percentile(restartMs, 50) ?? 0 },
      notes,
    };
  } catch (error) {
    const logs = slots.map((slot) => slot.server?.output().slice(-2_000) ?? '').join('\n---\n');
    throw new Error(`${config.name}: ${(error as Error).stack ?? String(error)}\ninstances:\n${logs}\nnginx:\n${nginx.errorLog().slice(-2_000)}`);
  } finally {
    stormOver = true;
    await watch.stop();
    await nginx.stop();
    // Every instance this process started (this test file's own), then restarts still pending.
    killAllServers();
    await Promise.allSettled(slots.map((slot) => slot.restarting));
    killAllServers();
    await Promise.all(slots.map((slot) => (slot.server ? kill9(slot.server) : undefined)));
  }
}
