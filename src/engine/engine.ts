import {
  ConfigError,
  FingerprintMismatchError,
  InFlightError,
  isOncelyError,
  LeaseLostError,
  StoreUnavailableError,
} from '../errors/index.js';
import { type Disposable, OncelyEmitter, type OncelyEventName, type OncelyHooks, type OncelyListener } from './events.js';
import type { ClaimInput, ClaimResult, CompletedRecord, IdempotencyStore } from './store.js';

/** How long to wait for a duplicate that is still running before answering "in flight". */
export interface WaitOptions {
  /** The longest wait, in ms. */
  timeoutMs: number;
  /** How often to look again, in ms. Default 50, growing to 500. */
  pollMs?: number;
}

/** Options of the engine, shared by every front door. */
export interface EngineOptions {
  /** Where records live. */
  store: IdempotencyStore;
  /** Lease length in ms; renewed while the operation runs. Default 30 000. */
  leaseMs?: number;
  /** Retention of completed records in ms. Default 24 h. */
  ttlMs?: number;
  /** Longest wait for any one store operation, in ms; past it the store counts as down. Default 2 000. */
  storeTimeoutMs?: number;
  /** Wait for an in-flight duplicate to finish and replay its outcome, instead of answering at once. Default off. */
  wait?: WaitOptions | false;
  /**
   * When the store is down, run the operation without idempotency instead of
   * refusing it. Default `false` (fail closed): with it on, a retry during an
   * outage can run twice.
   */
  failOpen?: boolean;
  /** Event listeners, one per event name. */
  hooks?: OncelyHooks;
}

/** What {@link Engine.begin} needs to know about one operation. */
export interface BeginInput {
  /** Record id (see `recordId`). */
  id: string;
  /** Request fingerprint, or `null` to skip the check. */
  fingerprint: string | null;
  /** Per-call lease override, ms. */
  leaseMs?: number;
  /** Per-call retention override, ms (used when completing). */
  ttlMs?: number;
  /** Per-call wait override. */
  wait?: WaitOptions | false;
}

/** The outcome of {@link Engine.begin}. */
export type Begin =
  /** The operation completed before: replay this outcome. */
  | { kind: 'replay'; record: CompletedRecord }
  /** This caller won the claim and must run the operation, then complete or release it. */
  | { kind: 'run'; claim: Claim }
  /** The store is down and `failOpen` is set: run without idempotency. */
  | { kind: 'bypass'; error: StoreUnavailableError };

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The engine: claim → run → complete or release, with leases renewed while
 * the operation runs and every write fenced by the claim's token. Front doors
 * (HTTP, functions, consumers) are thin translations onto it.
 *
 * @example
 * ```ts
 * import { Engine, recordId } from 'oncely';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const engine = new Engine({ store: memoryStore() });
 * const begun = await engine.begin({ id: recordId('order-42', 'acct_1'), fingerprint: null });
 * if (begun.kind === 'run') {
 *   const receipt = JSON.stringify({ shipped: true });
 *   await begun.claim.complete(receipt);
 * }
 * ```
 */
export class Engine {
  /** The store records live in. */
  readonly store: IdempotencyStore;
  /** Default lease, ms. */
  readonly leaseMs: number;
  /** Default retention, ms. */
  readonly ttlMs: number;
  /** Store timeout, ms. */
  readonly storeTimeoutMs: number;
  /** Default wait for in-flight duplicates. */
  readonly wait: WaitOptions | false;
  /** Whether to run without idempotency when the store is down. */
  readonly failOpen: boolean;
  readonly #events: OncelyEmitter;
  readonly #synchronous: boolean;

  constructor(options: EngineOptions) {
    const { store, leaseMs = 30_000, ttlMs = 24 * 60 * 60 * 1000, storeTimeoutMs = 2_000, wait = false } = options;
    if (!store || typeof store.claim !== 'function') throw new ConfigError('oncely needs a store (see oncely/stores/*).');
    for (const [name, value] of [
      ['leaseMs', leaseMs],
      ['ttlMs', ttlMs],
      ['storeTimeoutMs', storeTimeoutMs],
    ] as const) {
      if (!Number.isFinite(value) || value <= 0) throw new ConfigError(`${name} must be a positive number of ms.`);
    }
    if (ttlMs < leaseMs) throw new ConfigError('ttlMs must be at least leaseMs.');
    this.store = store;
    this.leaseMs = leaseMs;
    this.ttlMs = ttlMs;
    this.storeTimeoutMs = storeTimeoutMs;
    this.wait = wait;
    this.failOpen = options.failOpen ?? false;
    this.#events = new OncelyEmitter(options.hooks);
    this.#synchronous = store.capabilities?.synchronous === true;
  }

  /** Subscribe to an engine event (for logs and metrics); dispose the result to stop. */
  on<E extends OncelyEventName>(name: E, listener: OncelyListener<E>): Disposable {
    return this.#events.on(name, listener);
  }

  /** @internal Emit an event; used by front doors for events they observe. */
  emit<E extends OncelyEventName>(name: E, event: Parameters<OncelyListener<E>>[0]): void {
    this.#events.emit(name, event);
  }

  /**
   * Run one store operation under the store timeout. Any failure becomes a
   * {@link StoreUnavailableError} (except oncely's own errors, such as a full store).
   * @internal
   */
  storeCall<T>(id: string | undefined, operation: string, call: () => Promise<T>): Promise<T> {
    if (this.#synchronous) {
      let pending: Promise<T>;
      try {
        pending = call();
      } catch (error) {
        return Promise.reject(this.#storeFailed(id, operation, error));
      }
      return pending.catch((error: unknown) => {
        throw this.#storeFailed(id, operation, error);
      });
    }
    return new Promise<T>((resolve, reject) => {
      let settled = false;
      const fail = (error: unknown): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        reject(this.#storeFailed(id, operation, error));
      };
      const timer = setTimeout(
        () => fail(new Error(`${this.store.name} store did not answer ${operation} within ${this.storeTimeoutMs} ms`)),
        this.storeTimeoutMs,
      );
      let pending: Promise<T>;
      try {
        pending = call();
      } catch (error) {
        fail(error);
        return;
      }
      pending.then((value) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(value);
      }, fail);
    });
  }

  #storeFailed(id: string | undefined, operation: string, error: unknown): unknown {
    this.#events.emit('storeError', { id, operation, error });
    return isOncelyError(error) ? error : new StoreUnavailableError(undefined, { cause: error });
  }

  /**
   * Decide who runs the operation named by `input.id`: replay a completed
   * outcome, hand back a {@link Claim} to run it, or throw.
   *
   * @throws {@link FingerprintMismatchError} the key was used for another request.
   * @throws {@link InFlightError} a duplicate is still running (after the optional wait).
   * @throws {@link StoreUnavailableError} the store is down (unless `failOpen`).
   */
  async begin(input: BeginInput): Promise<Begin> {
    const leaseMs = input.leaseMs ?? this.leaseMs;
    const ttlMs = input.ttlMs ?? this.ttlMs;
    const claimInput: ClaimInput = { fingerprint: input.fingerprint, leaseMs, ttlMs: Math.max(ttlMs, leaseMs) };
    const wait = input.wait ?? this.wait;
    const waitUntil = wait ? Date.now() + wait.timeoutMs : 0;
    let poll = wait ? (wait.pollMs ?? 50) : 0;
    for (;;) {
      let result: ClaimResult;
      try {
        result = await this.storeCall(input.id, 'claim', () => this.store.claim(input.id, claimInput));
      } catch (error) {
        if (this.failOpen && error instanceof StoreUnavailableError) return { kind: 'bypass', error };
        throw error;
      }
      switch (result.status) {
        case 'acquired':
          this.#events.emit('acquired', { id: input.id, takeover: result.takeover });
          return { kind: 'run', claim: new Claim(this, input.id, result.token, result.takeover, leaseMs, ttlMs) };
        case 'completed':
          if (input.fingerprint !== null && result.record.fingerprint !== null && result.record.fingerprint !== input.fingerprint) {
            this.#events.emit('mismatch', { id: input.id });
            throw new FingerprintMismatchError();
          }
          this.#events.emit('replayed', { id: input.id });
          return { kind: 'replay', record: result.record };
        case 'in_progress': {
          if (input.fingerprint !== null && result.fingerprint !== null && result.fingerprint !== input.fingerprint) {
            this.#events.emit('mismatch', { id: input.id });
            throw new FingerprintMismatchError();
          }
          const remaining = waitUntil - Date.now();
          if (remaining <= 0) {
            this.#events.emit('conflict', { id: input.id, leaseUntil: result.leaseUntil });
            throw new InFlightError(result.leaseUntil, 1);
          }
          // Never sleep past the point where the lease could be taken over.
          const untilLease = Math.max(1, result.leaseUntil - result.now + 1);
          await sleep(Math.min(poll, remaining, untilLease));
          poll = Math.min(poll * 2, 500);
        }
      }
    }
  }
}

/**
 * A won claim: this worker owns the operation until it completes, releases,
 * or loses its lease. The lease is renewed in the background at a third of
 * its length; when renewal is refused (taken over) or the lease runs out
 * while the store is unreachable, {@link Claim.signal} aborts with a
 * {@link LeaseLostError}.
 */
export class Claim {
  /** Record id. */
  readonly id: string;
  /** Fencing token; every write presents it. */
  readonly token: string;
  /** True when this claim took over an expired lease (an earlier attempt crashed or stalled). */
  readonly takeover: boolean;
  /** Retention the outcome is stored with unless {@link Claim.complete} says otherwise, ms. */
  readonly ttlMs: number;
  readonly #engine: Engine;
  readonly #leaseMs: number;
  // Made on first use: most runs never look at their signal.
  #abort: AbortController | undefined;
  #lostReason: LeaseLostError | undefined;
  #timer: NodeJS.Timeout | undefined;
  #leaseUntil: number;
  #settled = false;

  /**
   * Made by {@link Engine.begin}, or by a front door that won a claim in a
   * batch (`claimMany`): it starts renewing the lease at once.
   */
  constructor(engine: Engine, id: string, token: string, takeover: boolean, leaseMs: number, ttlMs: number) {
    this.#engine = engine;
    this.id = id;
    this.token = token;
    this.takeover = takeover;
    this.ttlMs = ttlMs;
    this.#leaseMs = leaseMs;
    // Local estimate of the lease deadline, used only to decide when an
    // unreachable store means the lease must be presumed lost.
    this.#leaseUntil = Date.now() + leaseMs;
    this.#schedule();
  }

  /** Aborts when the lease is lost; pass it to the work so that it can stop early. */
  get signal(): AbortSignal {
    if (this.#abort === undefined) {
      this.#abort = new AbortController();
      if (this.#lostReason !== undefined) this.#abort.abort(this.#lostReason);
    }
    return this.#abort.signal;
  }

  /** True once the lease is known lost: the outcome will not be stored. */
  get lost(): boolean {
    return this.#lostReason !== undefined;
  }

  #markLost(): void {
    if (this.#lostReason !== undefined) return;
    this.#lostReason = new LeaseLostError();
    this.#abort?.abort(this.#lostReason);
  }

  #schedule(): void {
    this.#timer = setTimeout(() => void this.#renew(), Math.max(10, Math.floor(this.#leaseMs / 3)));
    this.#timer.unref();
  }

  async #renew(): Promise<void> {
    if (this.#settled) return;
    const started = Date.now();
    try {
      const ok = await this.#engine.storeCall(this.id, 'renew', () =>
        this.#engine.store.renew(this.id, this.token, this.#leaseMs),
      );
      if (this.#settled) return;
      if (!ok) {
        this.#engine.emit('fenced', { id: this.id, operation: 'renew' });
        this.#lose();
        return;
      }
      this.#leaseUntil = started + this.#leaseMs;
    } catch {
      if (this.#settled) return;
      if (Date.now() >= this.#leaseUntil) {
        this.#lose();
        return;
      }
    }
    this.#schedule();
  }

  #lose(): void {
    this.#stop();
    this.#markLost();
  }

  #stop(): void {
    this.#settled = true;
    clearTimeout(this.#timer);
  }

  /**
   * Store the outcome so that every duplicate gets it. Answers `false` when
   * this worker no longer owns the record (its lease was taken over): the
   * outcome is then not stored, and the new owner's record is untouched.
   *
   * @throws {@link StoreUnavailableError} when the store stays unreachable
   *   (after a few quick retries); the record then stays in progress until
   *   its lease ends.
   */
  async complete(outcome: string, ttlMs: number = this.ttlMs): Promise<boolean> {
    this.#stop();
    const { store } = this.#engine;
    let lastError: unknown;
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const ok = await this.#engine.storeCall(this.id, 'complete', () =>
          store.complete(this.id, this.token, outcome, ttlMs),
        );
        if (ok) this.#engine.emit('stored', { id: this.id, bytes: outcome.length });
        else {
          this.#engine.emit('fenced', { id: this.id, operation: 'complete' });
          this.#markLost();
        }
        return ok;
      } catch (error) {
        lastError = error;
        if (!(error instanceof StoreUnavailableError)) break;
        await sleep(50 * (attempt + 1));
      }
    }
    throw lastError;
  }

  /**
   * Delete the claim so that a retry runs the operation again (the outcome
   * was a retryable failure). Answers `false` when this worker no longer owns
   * the record. Never throws: a release that cannot reach the store is
   * reported as a `storeError` event, and the lease then ends by itself.
   */
  async release(reason = 'retryable failure'): Promise<boolean> {
    this.#stop();
    try {
      const ok = await this.#engine.storeCall(this.id, 'release', () => this.#engine.store.release(this.id, this.token));
      if (ok) this.#engine.emit('released', { id: this.id, reason });
      else this.#engine.emit('fenced', { id: this.id, operation: 'release' });
      return ok;
    } catch {
      return false;
    }
  }
}
