/**
 * A real store seen through a link whose operations can be made to fail or
 * hang, a given number of times or until healed: the fault injection of the
 * lifecycle matrix. The store behind it is real (memory or SQLite); only
 * the link misbehaves, as a network or a stalled server would.
 */
import type { IdempotencyStore } from 'oncely';

/** The store operations a fault can hit. */
export type StoreOp = 'claim' | 'claimMany' | 'renew' | 'complete' | 'release';

/** How an operation misbehaves: rejects at once, or never answers. */
export type FaultKind = 'fail' | 'hang';

export interface FaultStore {
  /** The store to hand to oncely. */
  store: IdempotencyStore;
  /** The real store behind the link, for looking at records. */
  inner: IdempotencyStore;
  /** Calls per operation so far. */
  calls: Record<StoreOp, number>;
  /** Make the next `times` calls of `op` misbehave (`Infinity` until {@link FaultStore.heal}). */
  inject(op: StoreOp, kind: FaultKind, times?: number): void;
  /** Remove every fault. */
  heal(): void;
}

export function faultStore(inner: IdempotencyStore): FaultStore {
  const calls: Record<StoreOp, number> = { claim: 0, claimMany: 0, renew: 0, complete: 0, release: 0 };
  const pending = new Map<StoreOp, { kind: FaultKind; left: number }>();
  const wrap =
    <A extends unknown[], R>(op: StoreOp, fn: (...args: A) => Promise<R>) =>
    (...args: A): Promise<R> => {
      calls[op]++;
      const fault = pending.get(op);
      if (fault && fault.left > 0) {
        fault.left--;
        if (fault.kind === 'hang') return new Promise<R>(() => {});
        return Promise.reject(new Error(`ECONNRESET (injected on ${op})`));
      }
      return fn(...args);
    };
  const store: IdempotencyStore = {
    name: `faulty-${inner.name}`,
    // Not synchronous: the engine must put its timeout around every call, as for a networked store.
    capabilities: { ...inner.capabilities, synchronous: false },
    claim: wrap('claim', inner.claim.bind(inner)),
    renew: wrap('renew', inner.renew.bind(inner)),
    complete: wrap('complete', inner.complete.bind(inner)),
    release: wrap('release', inner.release.bind(inner)),
    get: inner.get.bind(inner),
    delete: inner.delete.bind(inner),
    purgeExpired: inner.purgeExpired.bind(inner),
    close: inner.close.bind(inner),
  };
  if (inner.claimMany) store.claimMany = wrap('claimMany', inner.claimMany.bind(inner));
  return {
    store,
    inner,
    calls,
    inject(op, kind, times = 1) {
      pending.set(op, { kind, left: times });
    },
    heal() {
      pending.clear();
    },
  };
}
