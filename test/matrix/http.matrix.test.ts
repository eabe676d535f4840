/**
 * The lifecycle matrix for the HTTP front doors: every row (a front door in
 * a setup users really have) × every column (one fault injected at one step
 * of the claim's life). Each cell checks, at most lease + a margin after
 * the fault:
 * - the key either replays or runs again, never answers "in flight";
 * - an answer that reached the client as 2xx is never run again;
 * - the column's own expectation (a stored answer replays; a failure runs again).
 *
 * docs/lifecycle.md shows the matrix.
 */
import type { IdempotencyStore } from 'oncely';
import { memoryStore } from 'oncely/stores/memory';
import { describe, expect, it } from 'vitest';
import { type FaultKind, faultStore, type StoreOp } from '../support/fault-store.js';
import { type HandlerFault, MAX_STORED, ROWS, type Row } from './http-rows.js';

const LEASE_MS = 600;
/** How long after the fault a cell may take to settle, beyond the lease. */
const MARGIN_MS = 900;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What the retry after the fault must find. */
type Expect =
  /** The stored answer, handler not run again. */
  | 'replay'
  /** The handler runs again and answers 201. */
  | 'rerun'
  /** Never run again (a replay or the completed-not-replayable answer). */
  | 'never-again'
  /** Only the invariants: not in flight; a 2xx seen is never run again. */
  | 'settled'
  /**
   * The stored answer if the first attempt's handler ran; if the client gave
   * up before the request was even claimed (a loaded machine), a fresh run.
   */
  | 'replay-if-ran';

interface Column {
  name: string;
  handler: HandlerFault;
  /** The client gives up after this many ms. */
  abortAfterMs?: number;
  store?: { op: StoreOp; kind: FaultKind; times?: number };
  expect: Expect;
  /** The first answer's status, when the column decides it. */
  firstStatus?: number;
}

const COLUMNS: readonly Column[] = [
  { name: 'no fault', handler: 'none', expect: 'replay', firstStatus: 201 },
  { name: 'throw before the effect', handler: 'throw-before', expect: 'rerun', firstStatus: 500 },
  { name: 'throw after the effect', handler: 'throw-after', expect: 'rerun', firstStatus: 500 },
  { name: 'unserialisable result', handler: 'unserialisable', expect: 'rerun', firstStatus: 500 },
  { name: 'body stream error', handler: 'stream-error', expect: 'never-again' },
  { name: 'client abort', handler: 'abort', abortAfterMs: 100, expect: 'replay-if-ran' },
  { name: 'socket destroyed', handler: 'destroy', expect: 'settled' },
  { name: 'handler never answers', handler: 'never', abortAfterMs: 200, expect: 'settled' },
  { name: '5xx answer', handler: 'status-500', expect: 'rerun', firstStatus: 500 },
  { name: 'claim fails', handler: 'none', store: { op: 'claim', kind: 'fail' }, expect: 'rerun', firstStatus: 503 },
  { name: 'claim times out', handler: 'none', store: { op: 'claim', kind: 'hang' }, expect: 'rerun', firstStatus: 503 },
  { name: 'renew fails', handler: 'slow', store: { op: 'renew', kind: 'fail', times: Infinity }, expect: 'replay', firstStatus: 201 },
  { name: 'renew times out', handler: 'slow', store: { op: 'renew', kind: 'hang', times: Infinity }, expect: 'replay', firstStatus: 201 },
  { name: 'complete fails', handler: 'none', store: { op: 'complete', kind: 'fail', times: 2 }, expect: 'replay', firstStatus: 201 },
  { name: 'complete times out', handler: 'none', store: { op: 'complete', kind: 'hang' }, expect: 'replay', firstStatus: 201 },
  { name: 'release fails', handler: 'status-500', store: { op: 'release', kind: 'fail' }, expect: 'rerun', firstStatus: 500 },
  { name: 'release times out', handler: 'status-500', store: { op: 'release', kind: 'hang' }, expect: 'rerun', firstStatus: 500 },
];

interface Answer {
  status: number;
  type: string | undefined;
  replayed: boolean;
  /** The status line (and so the head) reached the client. */
  headSeen: boolean;
  error?: unknown;
}

let seq = 0;

async function send(row: Row, url: string, key: string, fault: HandlerFault, abortAfterMs?: number): Promise<Answer> {
  const controller = new AbortController();
  const timer = abortAfterMs === undefined ? undefined : setTimeout(() => controller.abort(), abortAfterMs);
  let status = 0;
  let headers: Headers | undefined;
  try {
    const res = await fetch(`${url}/payments`, {
      method: 'POST',
      headers: {
        'content-type': row.form ? 'application/x-www-form-urlencoded' : 'application/json',
        'idempotency-key': key,
        'x-fault': fault,
      },
      body: row.form ? 'amount=2500&currency=EUR' : JSON.stringify({ amount: 2500, currency: 'EUR' }),
      signal: controller.signal,
    });
    status = res.status;
    headers = res.headers;
    const text = await res.text();
    const type = res.headers.get('content-type')?.includes('problem') ? (JSON.parse(text) as { type?: string }).type : undefined;
    return { status, type, replayed: res.headers.get('idempotent-replayed') === 'true', headSeen: true };
  } catch (error) {
    return { status, type: undefined, replayed: headers?.get('idempotent-replayed') === 'true', headSeen: status > 0, error };
  } finally {
    clearTimeout(timer);
  }
}

const inFlight = (a: Answer) => a.status === 409 && (a.type ?? '').endsWith('/in-flight');

async function runCell(row: Row, column: Column, inner: IdempotencyStore): Promise<void> {
  const faults = faultStore(inner);
  const app = await row.start({
    store: faults.store,
    scope: false,
    leaseMs: LEASE_MS,
    storeTimeoutMs: 150,
    maxStoredBytes: MAX_STORED,
  } as never);
  try {
    const key = `matrix-${Date.now()}-${++seq}`;
    if (column.store) faults.inject(column.store.op, column.store.kind, column.store.times ?? 1);
    const faultAt = Date.now();
    const first = await send(row, app.url, key, column.handler, column.abortAfterMs);
    if (column.firstStatus !== undefined) expect(first.status, 'first answer').toBe(column.firstStatus);
    if (column.handler === 'abort') await sleep(300); // let the abandoned handler finish
    faults.heal();
    const ranBeforeRetry = app.executions();

    let retry = await send(row, app.url, key, 'none');
    while (inFlight(retry) && Date.now() < faultAt + LEASE_MS + MARGIN_MS) {
      await sleep(100);
      retry = await send(row, app.url, key, 'none');
    }
    expect(inFlight(retry), `still in flight ${Date.now() - faultAt} ms after the fault`).toBe(false);
    const ranAgain = app.executions() > ranBeforeRetry;
    if (first.headSeen && first.status >= 200 && first.status < 300) {
      expect(ranAgain, 'a 2xx that reached the client ran again').toBe(false);
    }
    let expected: Expect = column.expect === 'replay' && row.unstorable ? 'never-again' : column.expect;
    if (expected === 'replay-if-ran') expected = ranBeforeRetry === 0 ? 'rerun' : row.unstorable ? 'never-again' : 'replay';
    switch (expected) {
      case 'replay':
        expect(retry).toMatchObject({ status: first.status || 201, replayed: true });
        expect(ranAgain).toBe(false);
        break;
      case 'rerun':
        expect(retry.status).toBe(201);
        expect(ranAgain).toBe(true);
        break;
      case 'never-again':
        expect(ranAgain).toBe(false);
        expect(retry.replayed || (retry.type ?? '').endsWith('/completed-not-replayable')).toBe(true);
        break;
      case 'settled':
        break;
    }
  } finally {
    faults.heal();
    await app.close();
  }
}

for (const row of ROWS) {
  describe.concurrent(`HTTP matrix: ${row.name}`, () => {
    for (const column of COLUMNS) {
      if (row.skip?.includes(column.handler)) continue;
      it(column.name, () => runCell(row, column, memoryStore()));
    }
  });
}
