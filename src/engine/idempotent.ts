import { AsyncLocalStorage } from 'node:async_hooks';
import { ConfigError, RolledBackError } from '../errors/index.js';
import { checkDuration, type Engine, type EngineOptions, engineFrom, type StepContext, type WaitOptions } from './engine.js';
import { fingerprintOf, type RecordIdSecret, recordIdFor } from './fingerprint.js';
import { decodeResult, encodeFinalError, encodeResult } from './result.js';

/** What a wrapped function can learn about its own run (the last argument is not touched; use {@link currentRun}). */
export interface RunContext {
  /** The idempotency key. */
  key: string;
  /** Record id. */
  id: string;
  /** True when an earlier attempt crashed or stalled and this run took over its lease. */
  takeover: boolean;
  /** Aborts when the lease is lost. */
  signal: AbortSignal;
  /**
   * Transactional mode (SQL stores): the driver's handle inside one
   * transaction opened for this call; writes through it commit together
   * with the stored result. If the commit fails, the call throws
   * `RolledBackError` and nothing happened.
   */
  transaction<C = unknown>(): Promise<C>;
  /** A recovery point (see `Claim.step`): `fn` runs once for this call's key; a retry resumes after it. */
  step<T>(name: string, fn: (step: StepContext) => T | Promise<T>): Promise<T>;
}

/** Options of {@link idempotent}. */
export interface IdempotentOptions<A extends unknown[]> extends Partial<EngineOptions> {
  /** An engine to share; otherwise one is made from these options (then `store` is required). */
  engine?: Engine;
  /** The idempotency key of a call, from its arguments. */
  key: (...args: A) => string;
  /** Who owns the key (account, tenant). */
  scope?: (...args: A) => string | undefined;
  /** Keyed record ids (see `HttpIdempotencyOptions.secret`): an HMAC-SHA-256 under this secret. */
  secret?: RecordIdSecret;
  /** Namespace separating this function's keys from others' in a shared store. Default: the function's name. */
  namespace?: string;
  /**
   * What identifies the request behind a key: by default all arguments, so
   * that the same key with other arguments is refused. A function picks the
   * fields that matter; `false` disables the check.
   */
  fingerprint?: ((...args: A) => unknown) | false;
  /** Per-call lease override. */
  leaseMs?: number;
  /** Retention of results, ms. */
  ttlMs?: number;
  /** Wait for a concurrent duplicate instead of throwing `InFlightError`. */
  wait?: WaitOptions | false;
  /**
   * True when a thrown error is final: stored and thrown again to every
   * duplicate, rather than released for a retry. Default: errors with
   * `final === true`.
   */
  isFinal?: (error: unknown) => boolean;
}


const runs = new AsyncLocalStorage<RunContext>();

/** Inside a function wrapped by {@link idempotent}: its run context (key, lease signal, takeover). */
export function currentRun(): RunContext | undefined {
  return runs.getStore();
}

/**
 * Make any async function idempotent: a call with a key that already
 * completed returns the stored result (or throws the stored final error)
 * without running again; a concurrent call with the same key waits or throws
 * `InFlightError`; a thrown error releases the key so that a retry runs.
 * Results are stored as JSON.
 *
 * @example
 * ```ts
 * import { idempotent } from 'oncely';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const charge = idempotent(
 *   async (req: { id: string; amount: number }) => ({ charged: req.amount }),
 *   { store: memoryStore(), key: (req) => req.id },
 * );
 * await charge({ id: 'evt_1', amount: 5 }); // runs
 * await charge({ id: 'evt_1', amount: 5 }); // replays { charged: 5 }
 * ```
 */
export function idempotent<A extends unknown[], R>(
  fn: (...args: A) => Promise<R>,
  options: IdempotentOptions<A>,
): (...args: A) => Promise<R> {
  if (typeof fn !== 'function') throw new ConfigError('idempotent() wraps a function.');
  if (typeof options?.key !== 'function') throw new ConfigError('idempotent() needs a `key` function.');
  // Lease, retention and wait are this wrapper's own settings (passed per call), so they go with an
  // `engine` too; the store-wide ones follow the one rule: an engine, or its options.
  const { leaseMs, ttlMs, wait, store, storeTimeoutMs, failOpen, hooks, sessions } = options;
  const engine = engineFrom({ engine: options.engine, store, storeTimeoutMs, failOpen, hooks, sessions }, 'idempotent()');
  checkDuration('leaseMs', leaseMs);
  checkDuration('ttlMs', ttlMs);
  // Two wrappers sharing a namespace share their keys: an empty name
  // (an inline arrow function) would put every such wrapper in one.
  if (options.namespace === undefined && !fn.name) {
    throw new ConfigError('idempotent() of an anonymous function needs a `namespace` (wrappers without one would share keys).');
  }
  const namespace = options.namespace ?? `fn:${fn.name}`;
  const idOf = recordIdFor(options.secret);
  const fingerprint = options.fingerprint;
  const isFinal = options.isFinal ?? ((error: unknown) => (error as { final?: unknown } | null)?.final === true);

  return async function idempotentCall(...args: A): Promise<R> {
    const key = options.key(...args);
    if (typeof key !== 'string' || key.length === 0) throw new ConfigError('The key function must return a non-empty string.');
    const scope = options.scope?.(...args) ?? '';
    const id = idOf(key, scope, namespace);
    const fp = fingerprint === false ? null : fingerprintOf(fingerprint ? fingerprint(...args) : args);
    const begun = await engine.begin({ id, fingerprint: fp, scope, leaseMs, ttlMs, wait });
    switch (begun.kind) {
      case 'replay':
        return decodeResult<R>(begun.record.outcome);
      case 'bypass':
        return fn(...args);
      case 'run':
        break;
      default:
        throw begun.error;
    }
    const { claim } = begun;
    const performed = await claim.perform<R>({
      run: () =>
        runs.run({ key, id, takeover: claim.takeover, signal: claim.signal, transaction: () => claim.transaction(), step: (name, stepFn) => claim.step(name, stepFn) }, () =>
          fn(...args),
        ),
      settle: (result) => ({ kind: 'complete', outcome: encodeResult(result) }),
      failure: (error) => (isFinal(error) ? { kind: 'complete', outcome: encodeFinalError(error) } : undefined),
    });
    // Transactional mode: a result whose writes did not commit never reaches the caller as if they had.
    if (claim.transactional && performed.ok && performed.settled !== 'stored') {
      throw new RolledBackError(`The call did not commit (${performed.settled}); nothing happened. Call again with the same key.`);
    }
    if (performed.ok) return performed.value;
    throw performed.error;
  };
}
