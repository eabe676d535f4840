/**
 * The lifecycle matrix for the function form, `idempotent()`: one fault
 * injected at each step of a call's life. Each cell checks, at most
 * lease + a margin after the fault, that the key replays or runs again and
 * is never left in flight, and that a call that returned is never run again.
 */
import { idempotent, type IdempotencyStore } from 'oncely';
import { memoryStore } from 'oncely/stores/memory';
import { sqliteStore } from 'oncely/stores/sqlite';
import Database from 'better-sqlite3';
import { describe, expect, it } from 'vitest';
import { type FaultKind, faultStore, type StoreOp } from '../support/fault-store.js';

const LEASE_MS = 500;
const MARGIN_MS = 800;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Behaviour = 'ok' | 'throw-before' | 'throw-after' | 'unserialisable' | 'slow';

interface Column {
  name: string;
  behaviour: Behaviour;
  store?: { op: StoreOp; kind: FaultKind; times?: number };
  /** What the first call does. */
  first: 'returns' | 'throws';
  /** What a later call with the same key finds. */
  retry: 'replay' | 'rerun' | 'not-replayable';
}

const COLUMNS: readonly Column[] = [
  { name: 'no fault', behaviour: 'ok', first: 'returns', retry: 'replay' },
  { name: 'throw before the effect', behaviour: 'throw-before', first: 'throws', retry: 'rerun' },
  { name: 'throw after the effect', behaviour: 'throw-after', first: 'throws', retry: 'rerun' },
  { name: 'unserialisable result', behaviour: 'unserialisable', first: 'returns', retry: 'not-replayable' },
  { name: 'claim fails', behaviour: 'ok', store: { op: 'claim', kind: 'fail' }, first: 'throws', retry: 'rerun' },
  { name: 'claim times out', behaviour: 'ok', store: { op: 'claim', kind: 'hang' }, first: 'throws', retry: 'rerun' },
  { name: 'renew fails', behaviour: 'slow', store: { op: 'renew', kind: 'fail', times: Infinity }, first: 'returns', retry: 'replay' },
  { name: 'renew times out', behaviour: 'slow', store: { op: 'renew', kind: 'hang', times: Infinity }, first: 'returns', retry: 'replay' },
  { name: 'complete fails', behaviour: 'ok', store: { op: 'complete', kind: 'fail', times: 2 }, first: 'returns', retry: 'replay' },
  { name: 'complete times out', behaviour: 'ok', store: { op: 'complete', kind: 'hang' }, first: 'returns', retry: 'replay' },
  { name: 'release fails', behaviour: 'throw-after', store: { op: 'release', kind: 'fail' }, first: 'throws', retry: 'rerun' },
  { name: 'release times out', behaviour: 'throw-after', store: { op: 'release', kind: 'hang' }, first: 'throws', retry: 'rerun' },
];

const STORES: Record<string, () => IdempotencyStore> = {
  memory: () => memoryStore(),
  sqlite: () => sqliteStore({ database: new Database(':memory:') }),
};

async function runCell(column: Column, inner: IdempotencyStore): Promise<void> {
  const faults = faultStore(inner);
  let effects = 0;
  let behaviour: Behaviour = column.behaviour;
  const charge = idempotent(
    async (order: { id: string; amount: number }) => {
      if (behaviour === 'throw-before') throw new Error('failed before the effect');
      if (behaviour === 'slow') await sleep(LEASE_MS * 0.8);
      effects++;
      if (behaviour === 'throw-after') throw new Error('failed after the effect');
      return behaviour === 'unserialisable' ? { charged: BigInt(order.amount) } : { charged: order.amount, run: effects };
    },
    { store: faults.store, namespace: 'matrix', key: (order) => order.id, leaseMs: LEASE_MS, storeTimeoutMs: 100 },
  );
  const order = { id: `fn-${Date.now()}-${Math.random()}`, amount: 2500 };
  if (column.store) faults.inject(column.store.op, column.store.kind, column.store.times ?? 1);
  const faultAt = Date.now();
  const first = await charge(order).then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );
  expect(first.ok ? 'returns' : 'throws').toBe(column.first);
  faults.heal();
  behaviour = 'ok';
  const before = effects;

  let retry = await charge(order).then(
    (value) => ({ ok: true as const, value, error: undefined }),
    (error: unknown) => ({ ok: false as const, error: error as { code?: string } }),
  );
  while (!retry.ok && retry.error?.code === 'ONCELY_IN_FLIGHT' && Date.now() < faultAt + LEASE_MS + MARGIN_MS) {
    await sleep(100);
    retry = await charge(order).then(
      (value) => ({ ok: true as const, value, error: undefined }),
      (error: unknown) => ({ ok: false as const, error: error as { code?: string } }),
    );
  }
  expect(retry.error?.code, `still in flight ${Date.now() - faultAt} ms after the fault`).not.toBe('ONCELY_IN_FLIGHT');
  if (first.ok) expect(effects, 'a call that returned ran again').toBe(before);
  switch (column.retry) {
    case 'replay':
      expect(retry).toMatchObject({ ok: true, value: { charged: 2500, run: 1 } });
      break;
    case 'rerun':
      expect(retry.ok).toBe(true);
      expect(effects).toBe(before + 1);
      break;
    case 'not-replayable':
      expect(retry.error?.code).toBe('ONCELY_NOT_REPLAYABLE');
      break;
  }
}

for (const [storeName, makeStore] of Object.entries(STORES)) {
  describe.concurrent(`function matrix: idempotent() on ${storeName}`, () => {
    for (const column of COLUMNS) it(column.name, () => runCell(column, makeStore()));
  });
}
