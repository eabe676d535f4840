/**
 * The lifecycle matrix for the consumers: every row (the core, each broker
 * adapter against its real broker, Kafka through KafkaJS-shaped payloads,
 * the inboxes; see consumer-rows.ts) × every column (one fault injected at
 * one step of a message's life). Each cell checks, for every message:
 * - nothing acknowledged that did not commit: when the broker is told, the
 *   message's record is completed in the store (processed, or a duplicate of
 *   a completed one); in the inbox rows its effect row and inbox row exist;
 * - not left in flight: at most lease + a margin after the fault (the end of
 *   the first attempt) every message has been acknowledged, through the
 *   broker's own redelivery or another call;
 * - a message acknowledged is never run again, and a later copy of it is a
 *   duplicate: acknowledged, not run, its effect not repeated;
 * - no completion is refused as "fenced": nobody takes a message over from a
 *   live owner in these cells;
 * - the broker holds nothing unacknowledged once the consumer stopped;
 * - the column's own expectation: the target message's first verdict, and
 *   how many effects it had in all (an inbox commits exactly one), and that
 *   the fault did hit (the store operation was called while armed, the
 *   "still working" signal failed, the broker redelivered the stalled copy).
 *
 * The store is a real one (memory; SQLite in the SQLite inbox row) behind
 * faultStore's link, and behind a "late" link for operations that time out
 * and then land. Single-message rows deliver one message; batch rows three,
 * the fault aimed at the middle one (the target). Skipped cells say why in
 * their title (the reasons are in consumer-rows.ts and `skipped` below).
 */
import type { IdempotencyStore } from 'oncely';
import type { ConsumerAction } from 'oncely/consumer';
import { afterAll, describe, expect, it } from 'vitest';
import { sleep, suffix } from '../consumer/helpers.js';
import { type FaultKind, type FaultStore, faultStore, type StoreOp } from '../support/fault-store.js';
import { type ColumnKey, closeShared, type Fault, ROWS, type Row, type RowRun, type Setup } from './consumer-rows.js';

const LEASE_MS = 500;
/** How long after the fault (the end of the target's first attempt) every message may take to be acknowledged, beyond the lease. */
const MARGIN_MS = 1_000;
const STORE_TIMEOUT_MS = 100;
const POLL_MS = 50;
/**
 * A "late" store operation is carried out this long after it was sent: past
 * the store timeout (100 ms), before oncely's retry or the next redelivery
 * (50 ms after the timeout).
 */
const LATE_MS = 120;

/**
 * What faultStore's `hang` leaves out: a store that was slow, not gone. The
 * operation times out for oncely, then lands anyway (a claim nobody holds,
 * a release that frees the record after oncely gave up on it).
 */
function lateLink(inner: IdempotencyStore) {
  const armed = new Map<StoreOp, number>();
  const late =
    <A extends unknown[], R>(op: StoreOp, fn: (...args: A) => Promise<R>) =>
    async (...args: A): Promise<R> => {
      const left = armed.get(op) ?? 0;
      if (left > 0) {
        armed.set(op, left - 1);
        await sleep(LATE_MS);
      }
      return fn(...args);
    };
  const store: IdempotencyStore = {
    name: inner.name,
    capabilities: inner.capabilities,
    claim: late('claim', inner.claim.bind(inner)),
    renew: late('renew', inner.renew.bind(inner)),
    complete: late('complete', inner.complete.bind(inner)),
    release: late('release', inner.release.bind(inner)),
    get: inner.get.bind(inner),
    delete: inner.delete.bind(inner),
    purgeExpired: inner.purgeExpired.bind(inner),
    close: inner.close.bind(inner),
  };
  if (inner.claimMany) store.claimMany = late('claimMany', inner.claimMany.bind(inner));
  return {
    store,
    delay(op: StoreOp, times: number) {
      armed.set(op, times);
    },
    heal() {
      armed.clear();
    },
  };
}

interface Column {
  name: string;
  key?: ColumnKey;
  /** What the target's first run does. */
  handler: Fault;
  /** `claim` is `claimMany` in the batch rows. */
  store?: { op: StoreOp; kind: FaultKind | 'late'; times?: number };
  /** The broker's "still working" signal (working(), heartbeat(), XCLAIM) fails during the first attempt. */
  working?: true;
  /** Only in the inbox rows. */
  inboxOnly?: true;
  /** The target's first verdict. */
  first: ConsumerAction;
  /** The target's effects in all (plain rows; an inbox commits exactly one). */
  effects: number;
  /** In a row that stops at the first break (Kafka eachBatch) when the fault breaks the batch before the target. */
  ordered?: { first: ConsumerAction; effects: number };
  /** Most effects of the other messages of a batch. Default 1. */
  othersMax?: number;
  /** A bug in src/ makes every row's cell fail: kept as `it.fails`, named here. */
  bug?: string;
}

const COLUMNS: readonly Column[] = [
  { name: 'no fault', handler: 'none', first: 'processed', effects: 1 },
  { name: 'handler throws before its effect', handler: 'throw-before', first: 'failed', effects: 1 },
  { name: 'handler throws after its effect', handler: 'throw-after', first: 'failed', effects: 2 },
  {
    name: 'claim fails',
    handler: 'none',
    store: { op: 'claim', kind: 'fail' },
    first: 'store_error',
    effects: 1,
    ordered: { first: 'skipped', effects: 1 },
  },
  {
    name: 'claim times out',
    handler: 'none',
    store: { op: 'claim', kind: 'hang' },
    first: 'store_error',
    effects: 1,
    ordered: { first: 'skipped', effects: 1 },
  },
  // The claim lands after oncely gave up on it: a record in progress that nobody holds, until its lease ends.
  {
    name: 'claim answers after the timeout',
    handler: 'none',
    store: { op: 'claim', kind: 'late' },
    first: 'store_error',
    effects: 1,
    ordered: { first: 'skipped', effects: 1 },
  },
  // The handler takes 0.8 lease: renewals are due at every third of it, and all fail.
  { name: 'renew fails', handler: 'slow', store: { op: 'renew', kind: 'fail', times: Infinity }, first: 'processed', effects: 1 },
  { name: 'renew times out', handler: 'slow', store: { op: 'renew', kind: 'hang', times: Infinity }, first: 'processed', effects: 1 },
  // Retried with the same token within the lease: stored.
  { name: 'complete fails', handler: 'none', store: { op: 'complete', kind: 'fail', times: 2 }, first: 'processed', effects: 1 },
  { name: 'complete times out', handler: 'none', store: { op: 'complete', kind: 'hang' }, first: 'processed', effects: 1 },
  // The completion lands after oncely gave up on it; oncely's retry (same token) then finds the record completed.
  {
    name: 'complete answers after the timeout',
    handler: 'none',
    store: { op: 'complete', kind: 'late' },
    first: 'processed',
    effects: 1,
    // The engine recognises its own outcome in the record (was a bug: it settled 'fenced').
  },
  // Down until the lease deadline: not recorded, never acknowledged; the redelivery after the lease runs again.
  {
    name: 'complete fails until the lease ends',
    handler: 'none',
    store: { op: 'complete', kind: 'fail', times: Infinity },
    first: 'store_error',
    effects: 2,
    ordered: { first: 'skipped', effects: 1 },
    othersMax: 2,
  },
  // The record stays in progress until its lease ends; then a redelivery takes it over.
  { name: 'release fails', handler: 'throw-after', store: { op: 'release', kind: 'fail' }, first: 'failed', effects: 2 },
  { name: 'release times out', handler: 'throw-after', store: { op: 'release', kind: 'hang' }, first: 'failed', effects: 2 },
  // Given up on, then carried out: the record is freed before its lease ends.
  { name: 'release answers after the timeout', handler: 'throw-after', store: { op: 'release', kind: 'late' }, first: 'failed', effects: 2 },
  // Kafka eachBatch: the heartbeat throws from the second on, as in a rebalance (mid-batch).
  { name: 'working() / heartbeat fails', key: 'working', handler: 'slow', working: true, first: 'processed', effects: 1 },
  // The inbox's transaction rolls back at COMMIT although the handler returned.
  { name: 'commit rolls back', key: 'rollback', handler: 'rollback', inboxOnly: true, first: 'failed', effects: 1 },
];

/** Why a cell cannot happen in a row, or undefined. */
function skipped(row: Row, column: Column): string | undefined {
  if (column.inboxOnly && !row.inbox) {
    return 'no transaction of its own: the store completion is the commit, and its failures are the complete columns';
  }
  return column.key ? row.skip?.[column.key] : undefined;
}

const bump = (counts: Map<string, number>, id: string): number => {
  const n = (counts.get(id) ?? 0) + 1;
  counts.set(id, n);
  return n;
};

async function runCell(row: Row, column: Column): Promise<void> {
  const tag = suffix();
  const ids = (row.batch ? [0, 1, 2] : [0]).map((i) => `msg-${tag}-${i}`);
  const target = row.batch ? ids[1]! : ids[0]!;
  const runs = new Map<string, number>();
  const effects = new Map<string, number>();
  const acks = new Map<string, number>();
  /** Handler runs of a message when it was first acknowledged. */
  const runsAtAck = new Map<string, number>();
  /** One promise per acknowledgement: a message of what was wrong, or undefined. */
  const ackChecks: Array<Promise<string | undefined>> = [];
  let faults: FaultStore | undefined;
  let late: ReturnType<typeof lateLink> | undefined;
  let run: RowRun | undefined;
  let firstVerdict: ConsumerAction | undefined;
  let healedAt: number | undefined;
  /** Calls of the faulty store operation while its fault was armed, and "still working" signals that failed. */
  let faultyCalls = 0;
  let signalFailures = 0;
  /** The target answered "in flight" (a broker's copy) before its first attempt ended; batches cut short by an error. */
  let inFlightDuringFirst = 0;
  /** Verdicts "fenced", of any message: in these cells nobody ever takes a message over from a live owner. */
  const fenced: string[] = [];
  let interruptions = 0;
  let op: StoreOp | undefined;
  const heal = () => {
    if (healedAt !== undefined) return;
    healedAt = Date.now();
    if (op && faults) faultyCalls = faults.calls[op];
    faults?.heal();
    late?.heal();
  };

  const checkAck = async (id: string): Promise<string | undefined> => {
    // Both read now, when the broker is told; awaited later.
    const record = faults!.inner.get(run!.recordIdOf(id));
    const committed = run!.committed?.(id);
    const found = await record;
    if (found?.state !== 'completed') return `${id} acknowledged while its record was ${found?.state ?? 'absent'}`;
    if (committed) {
      const rows = await committed;
      if (rows.effects < 1 || rows.inbox !== 1) return `${id} acknowledged with ${rows.effects} effect rows and ${rows.inbox} inbox rows`;
    }
    return undefined;
  };

  const setup: Setup = {
    name: `matrix-${tag}`,
    leaseMs: LEASE_MS,
    storeTimeoutMs: STORE_TIMEOUT_MS,
    link(inner) {
      late = lateLink(inner);
      faults = faultStore(late.store);
      return faults.store;
    },
    run: (id) => (bump(runs, id) === 1 && id === target ? column.handler : 'none'),
    effect: (id) => void bump(effects, id),
    acked(id) {
      bump(acks, id);
      if (!runsAtAck.has(id)) runsAtAck.set(id, runs.get(id) ?? 0);
      ackChecks.push(checkAck(id));
    },
    verdict(verdict) {
      if (verdict.action === 'fenced') fenced.push(verdict.id);
      if (verdict.id !== target || firstVerdict !== undefined) return;
      // A copy answered "in flight" while the first attempt still runs: the broker's own redelivery.
      if (verdict.action === 'in_flight') inFlightDuringFirst++;
      else firstVerdict = verdict.action;
    },
    ended(error) {
      if (error !== undefined) interruptions++;
      // The first attempt is over (its whole batch): the fault ends there.
      if (firstVerdict !== undefined || error !== undefined) heal();
    },
    workingFails() {
      const fails = column.working === true && healedAt === undefined;
      if (fails) signalFailures++;
      return fails;
    },
  };

  run = await row.start(setup);
  try {
    if (column.store) {
      op = column.store.op === 'claim' && row.batch ? 'claimMany' : column.store.op;
      const times = column.store.times ?? 1;
      if (column.store.kind === 'late') late!.delay(op, times);
      else faults!.inject(op, column.store.kind, times);
    }
    const faultAt = Date.now();
    const deadline = () => (healedAt ?? faultAt) + LEASE_MS + MARGIN_MS;
    const unacked = () => ids.filter((id) => !acks.has(id));

    await run.deliver(ids);
    while (unacked().length > 0 && Date.now() < deadline()) {
      await sleep(POLL_MS);
      await run.redeliver(unacked());
    }
    expect(unacked(), `not acknowledged ${Date.now() - (healedAt ?? faultAt)} ms after the fault`).toEqual([]);
    heal();

    // A later copy of every message: a duplicate, acknowledged, not run.
    const acksBefore = new Map(acks);
    await run.copy(ids);
    const until = Date.now() + LEASE_MS + MARGIN_MS;
    const copiesPending = () => ids.filter((id) => (acks.get(id) ?? 0) <= (acksBefore.get(id) ?? 0));
    while (copiesPending().length > 0 && Date.now() < until) await sleep(POLL_MS);
    expect(copiesPending(), 'copies not acknowledged').toEqual([]);
    const committed = run.committed ? await Promise.all(ids.map((id) => run!.committed!(id))) : undefined;
    const leftover = await run.close();
    run = undefined;
    if (leftover !== undefined) expect(leftover, 'messages the broker still holds unacknowledged').toBe(0);

    for (const problem of await Promise.all(ackChecks)) expect(problem).toBeUndefined();
    for (const id of ids) expect(runs.get(id) ?? 0, `${id} ran again after it was acknowledged`).toBe(runsAtAck.get(id));

    expect(fenced, 'completions refused as "fenced" although nobody took the message over').toEqual([]);
    // The fault did hit the first attempt.
    if (op) expect(faultyCalls, `${op} calls while the fault was armed`).toBeGreaterThan(0);
    if (column.working) {
      expect(signalFailures, '"still working" signals that failed').toBeGreaterThan(0);
      if (row.redeliversStalled) expect(inFlightDuringFirst, 'copies handed out by the broker while the first ran').toBeGreaterThan(0);
      if (row.interruptedByWorking) expect(interruptions, 'batches cut short by the heartbeat').toBeGreaterThan(0);
    }
    const expected = row.ordered && column.ordered ? column.ordered : column;
    expect(firstVerdict, "the target's first verdict").toBe(expected.first);
    if (committed) {
      for (const rows of committed) expect(rows).toEqual({ effects: 1, inbox: 1 });
    } else {
      expect(effects.get(target), "the target's effects").toBe(expected.effects);
      for (const id of ids) {
        if (id === target) continue;
        expect(effects.get(id) ?? 0).toBeGreaterThanOrEqual(1);
        expect(effects.get(id) ?? 0).toBeLessThanOrEqual(column.othersMax ?? 1);
      }
    }
  } finally {
    faults?.heal();
    await run?.close();
  }
}

afterAll(closeShared);

for (const row of ROWS) {
  describe.concurrent(`consumer matrix: ${row.name}`, () => {
    for (const column of COLUMNS) {
      const reason = skipped(row, column);
      if (reason) {
        it.skip(`${column.name} (cannot happen: ${reason})`, () => {});
        continue;
      }
      if (column.bug) it.fails(`${column.name} (bug: ${column.bug})`, () => runCell(row, column));
      else it(column.name, () => runCell(row, column));
    }
  });
}
