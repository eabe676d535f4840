import {
  ConfigError,
  FingerprintMismatchError,
  InFlightError,
  isOncelyError,
  LeaseLostError,
  type OncelyError,
  StoreUnavailableError,
} from '../errors/index.js';
import { type Disposable, OncelyEmitter, type OncelyEventName, type OncelyHooks, type OncelyListener } from './events.js';
import { deriveKey } from '../client/derive.js';
import { recordId } from './fingerprint.js';
import { decodeResult, encodeResult } from './result.js';
import { DEFAULT_SESSION_TTL_MS, type ProcessSession, type SessionWatcher, sessionOf } from './session.js';
import type { ClaimAcquired, ClaimInput, ClaimResult, CompletedRecord, IdempotencyStore, StoreTransaction } from './store.js';

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
  /**
   * Process sessions, on stores that have them (SQL stores, Redis): one
   * heartbeat per process lets others take over a crashed process's claims
   * `ttlMs` after its last heartbeat instead of a whole lease. Default on,
   * with `ttlMs` 1 000. A process whose event loop stalls longer than that
   * loses its claims to others (its writes stay fenced): raise it for
   * workloads with long synchronous pauses. `false` turns sessions off.
   */
  sessions?: { ttlMs?: number } | false;
}

/** The names of {@link EngineOptions}: a front door given an `engine` must not also be given these. */
export const ENGINE_OPTION_NAMES = ['store', 'leaseMs', 'ttlMs', 'storeTimeoutMs', 'wait', 'failOpen', 'hooks', 'sessions'] as const;

/**
 * The one rule for engine settings in every front door: either an `engine`
 * or the engine's own options, never a mix (a mix would silently ignore the
 * options). Answers the engine to use.
 *
 * @throws {@link ConfigError} for a mix, or for neither.
 * @internal Shared by the front doors.
 */
export function engineFrom(options: Partial<EngineOptions> & { engine?: Engine }, who: string): Engine {
  if (options.engine !== undefined) {
    const mixed = ENGINE_OPTION_NAMES.filter((name) => options[name] !== undefined);
    if (mixed.length > 0) {
      throw new ConfigError(
        `${who} was given an \`engine\` and also ${mixed.map((n) => `\`${n}\``).join(', ')}: set those on the engine instead.`,
      );
    }
    if (!(options.engine instanceof Engine)) throw new ConfigError(`${who}: \`engine\` must be an oncely Engine.`);
    return options.engine;
  }
  if (!options.store) throw new ConfigError(`${who} needs a \`store\` (see oncely/stores/*) or an \`engine\`.`);
  return new Engine(options as EngineOptions);
}

/**
 * Check that a duration is a positive, finite number of ms (and at most
 * `max`, when given). `undefined` passes (the default applies).
 *
 * @throws {@link ConfigError} naming the setting.
 */
export function checkDuration(name: string, value: unknown, max = Number.MAX_SAFE_INTEGER): void {
  if (value === undefined) return;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > max) {
    throw new ConfigError(`${name} must be a positive number of ms${max < Number.MAX_SAFE_INTEGER ? ` up to ${max}` : ''}; got ${String(value)}.`);
  }
}

function checkWait(name: string, wait: WaitOptions | false | undefined): void {
  if (wait === undefined || wait === false) return;
  if (typeof wait !== 'object' || wait === null) throw new ConfigError(`${name} must be false or { timeoutMs, pollMs? }.`);
  checkDuration(`${name}.timeoutMs`, wait.timeoutMs);
  checkDuration(`${name}.pollMs`, wait.pollMs);
}

/** What {@link Engine.begin} needs to know about one operation. */
export interface BeginInput {
  /** Record id (see `recordId`). */
  id: string;
  /** Request fingerprint, or `null` to skip the check. */
  fingerprint: string | null;
  /** Who owns the key (account, tenant), for stores that bound each scope (see {@link ClaimInput.scope}). */
  scope?: string;
  /** Per-call lease override, ms. */
  leaseMs?: number;
  /** Per-call retention override, ms (used when completing). */
  ttlMs?: number;
  /** Per-call wait override. */
  wait?: WaitOptions | false;
}

/** A begun operation that will not run here, with the error that says why. */
export type Refused =
  /** A duplicate is still running (after the optional wait). */
  | { kind: 'in_flight'; error: InFlightError }
  /** The key was used before for another request. */
  | { kind: 'mismatch'; error: FingerprintMismatchError }
  /** The store is down, too slow, or full: nothing was done. */
  | { kind: 'unavailable'; error: OncelyError };

/**
 * The outcome of {@link Engine.begin}. Every expected situation is a result,
 * not an exception: only a programming error throws.
 */
export type Begun =
  /** The operation completed before: replay this outcome. */
  | { kind: 'replay'; record: CompletedRecord }
  /** This caller won the claim and must run the operation; the claim must then be settled. */
  | { kind: 'run'; claim: Claim }
  /** The store is down and `failOpen` is set: run without idempotency. */
  | { kind: 'bypass'; error: StoreUnavailableError }
  | Refused;

/**
 * How a claim ends: the outcome stored (replayed to every later copy), or
 * the claim released (a retry runs again).
 */
export type Settlement =
  | { kind: 'complete'; outcome: string; ttlMs?: number }
  | { kind: 'release'; reason: string };

/**
 * What settling did:
 * - `stored`: the outcome is stored (in transactional mode: committed with
 *   the business writes);
 * - `released`: the record was deleted, a retry runs again;
 * - `fenced`: another owner took the record over, nothing was written (in
 *   transactional mode the business writes were rolled back too);
 * - `unsettled`: the store stayed unreachable until the lease deadline; the
 *   record stays in progress until its lease ends, then may be taken over;
 * - `rolled_back`: transactional mode: the commit failed, the business
 *   writes are gone and the claim was released; the operation did not happen.
 */
export type Settled = 'stored' | 'released' | 'fenced' | 'unsettled' | 'rolled_back';

/**
 * One operation run under a claim by {@link Claim.perform}: the work, and
 * what to keep of its result.
 */
export interface Operation<T> {
  /** The work. The claim is held (and its lease renewed) while it runs. */
  run(claim: Claim): T | Promise<T>;
  /** What to keep of a result. Default: store nothing and release. */
  settle(result: T, claim: Claim): Settlement;
  /**
   * What to keep of a thrown error. Default (or when it answers
   * `undefined`): release, or the claim's marker when an answer already
   * went out (see {@link Claim.answered}).
   */
  failure?(error: unknown, claim: Claim): Settlement | undefined;
}

/** The result of {@link Claim.perform}. */
export type Performed<T> =
  | { ok: true; value: T; settled: Settled }
  | { ok: false; error: unknown; settled: Settled };

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The engine: claim → run → settle (complete or release), with leases
 * renewed while the operation runs and every write fenced by the claim's
 * token. It owns the lifecycle of every claim: front doors (HTTP, functions,
 * consumers) only translate their world onto {@link Engine.begin} and
 * {@link Claim.perform} or {@link Claim.settle}.
 *
 * @example
 * ```ts
 * import { Engine, recordId } from 'oncely';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const engine = new Engine({ store: memoryStore() });
 * const begun = await engine.begin({ id: recordId('order-42', 'acct_1'), fingerprint: null });
 * if (begun.kind === 'run') {
 *   await begun.claim.perform({
 *     run: async () => ({ shipped: true }),
 *     settle: (receipt) => ({ kind: 'complete', outcome: JSON.stringify(receipt) }),
 *   });
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
  /** This process's session in the store, when the store has sessions and they are on. @internal */
  readonly session: ProcessSession | undefined;

  /** @throws {@link ConfigError} for a missing store or a duration that is not a positive number of ms. */
  constructor(options: EngineOptions) {
    const { store, leaseMs = 30_000, ttlMs = 24 * 60 * 60 * 1000, storeTimeoutMs = 2_000, wait = false } = options;
    if (!store || typeof store.claim !== 'function') throw new ConfigError('oncely needs a store (see oncely/stores/*).');
    checkDuration('leaseMs', leaseMs);
    checkDuration('ttlMs', ttlMs);
    checkDuration('storeTimeoutMs', storeTimeoutMs);
    checkWait('wait', wait);
    if (ttlMs < leaseMs) throw new ConfigError('ttlMs must be at least leaseMs.');
    this.store = store;
    this.leaseMs = leaseMs;
    this.ttlMs = ttlMs;
    this.storeTimeoutMs = storeTimeoutMs;
    this.wait = wait;
    this.failOpen = options.failOpen ?? false;
    this.#events = new OncelyEmitter(options.hooks);
    this.#synchronous = store.capabilities?.synchronous === true;
    const sessions = options.sessions ?? {};
    if (sessions !== false) checkDuration('sessions.ttlMs', sessions.ttlMs);
    this.session =
      sessions === false
        ? undefined
        : sessionOf(store, sessions.ttlMs ?? DEFAULT_SESSION_TTL_MS, (operation, call) => this.storeCall(undefined, operation, call));
    this.session?.use();
  }

  /**
   * Stop using the store's process session: when no engine of this process
   * uses it any more, the session ends at once, so that claims still held
   * (there should be none after a graceful shutdown) can be taken over
   * without waiting. The store itself stays open.
   */
  async close(): Promise<void> {
    await this.session?.release();
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

  #storeFailed(id: string | undefined, operation: string, error: unknown): OncelyError {
    this.#events.emit('storeError', { id, operation, error });
    return isOncelyError(error) ? error : new StoreUnavailableError(undefined, { cause: error });
  }

  #unavailable(error: OncelyError): Begun {
    if (this.failOpen && error instanceof StoreUnavailableError) return { kind: 'bypass', error };
    return { kind: 'unavailable', error };
  }

  /**
   * Decide who runs the operation named by `input.id`: replay a completed
   * outcome, hand back a {@link Claim} to run it, or say why it will not run
   * here (in flight, fingerprint mismatch, store unavailable). Never rejects
   * for those; only a programming error (bad input) throws.
   */
  async begin(input: BeginInput): Promise<Begun> {
    const leaseMs = input.leaseMs ?? this.leaseMs;
    const ttlMs = input.ttlMs ?? this.ttlMs;
    checkDuration('leaseMs', leaseMs);
    checkDuration('ttlMs', ttlMs);
    const session = this.session;
    if (session !== undefined && session.until <= Date.now() + session.ttlMs / 2) {
      try {
        await session.ready();
      } catch (error) {
        return this.#unavailable(error as OncelyError);
      }
    }
    const claimInput: ClaimInput = {
      fingerprint: input.fingerprint,
      leaseMs,
      ttlMs: Math.max(ttlMs, leaseMs),
      scope: input.scope,
      owner: session?.id,
    };
    const wait = input.wait ?? this.wait;
    const waitUntil = wait ? Date.now() + wait.timeoutMs : 0;
    let poll = wait ? (wait.pollMs ?? 50) : 0;
    for (;;) {
      // The local lease deadline counts from before the claim was sent: never later than the store's.
      const sentAt = Date.now();
      let result: ClaimResult;
      try {
        result = await this.storeCall(input.id, 'claim', () => this.store.claim(input.id, claimInput));
        if (result.status === 'in_progress') result = await this.#takeoverFromDead(input.id, claimInput, result);
      } catch (error) {
        return this.#unavailable(error as OncelyError);
      }
      const begun = this.#decide(input.id, input.fingerprint, result, sentAt, leaseMs, ttlMs);
      if (begun.kind !== 'in_flight') return begun;
      const inProgress = result as Extract<ClaimResult, { status: 'in_progress' }>;
      const remaining = waitUntil - Date.now();
      if (remaining <= 0) {
        this.#events.emit('conflict', { id: input.id, leaseUntil: inProgress.leaseUntil });
        return begun;
      }
      // Never sleep past the point where the lease could be taken over.
      const untilLease = Math.max(1, inProgress.leaseUntil - inProgress.now + 1);
      await sleep(Math.min(poll, remaining, untilLease));
      poll = Math.min(poll * 2, 500);
    }
  }

  /**
   * Begin many operations in one store round trip (`claimMany` when the
   * store has it), for batches of messages. Answers in the order of `ids`;
   * every `run` must be settled (or released when the batch stops early).
   * Ids must be unique. In-flight duplicates are answered at once (no wait).
   *
   * @throws {@link ConfigError} for repeated ids.
   */
  async beginMany(ids: readonly string[], options: Omit<BeginInput, 'id' | 'wait'> = { fingerprint: null }): Promise<Begun[]> {
    if (ids.length === 0) return [];
    if (new Set(ids).size !== ids.length) throw new ConfigError('beginMany needs unique ids.');
    const leaseMs = options.leaseMs ?? this.leaseMs;
    const ttlMs = options.ttlMs ?? this.ttlMs;
    checkDuration('leaseMs', leaseMs);
    checkDuration('ttlMs', ttlMs);
    const session = this.session;
    const { store } = this;
    let results: ClaimResult[];
    let sentAt: number;
    try {
      if (session !== undefined && session.until <= Date.now() + session.ttlMs / 2) await session.ready();
      const claimInput: ClaimInput = {
        fingerprint: options.fingerprint,
        leaseMs,
        ttlMs: Math.max(ttlMs, leaseMs),
        scope: options.scope,
        owner: session?.id,
      };
      sentAt = Date.now();
      results = await this.storeCall(undefined, 'claimMany', () =>
        store.claimMany ? store.claimMany(ids, claimInput) : Promise.all(ids.map((id) => store.claim(id, claimInput))),
      );
      for (let i = 0; i < results.length; i++) {
        const result = results[i]!;
        if (result.status === 'in_progress') results[i] = await this.#takeoverFromDead(ids[i]!, claimInput, result);
      }
    } catch (error) {
      const refused = this.#unavailable(error as OncelyError);
      return ids.map(() => refused);
    }
    return ids.map((id, i) => {
      const begun = this.#decide(id, options.fingerprint, results[i]!, sentAt, leaseMs, ttlMs);
      if (begun.kind === 'in_flight') this.#events.emit('conflict', { id, leaseUntil: begun.error.leaseUntil });
      return begun;
    });
  }

  /**
   * A record in progress under another process's session: if that session
   * is dead, take the record over now instead of waiting for its lease. One
   * extra round trip, only on this path.
   */
  async #takeoverFromDead(id: string, input: ClaimInput, result: Extract<ClaimResult, { status: 'in_progress' }>): Promise<ClaimResult> {
    const owner = result.owner;
    const sessions = this.store.sessions;
    if (owner === undefined || sessions === undefined || this.session === undefined || owner === this.session.id) return result;
    if (input.fingerprint !== null && result.fingerprint !== null && input.fingerprint !== result.fingerprint) return result;
    if (await this.storeCall(id, 'alive', () => sessions.alive(owner))) return result;
    return this.storeCall(id, 'claim', () => this.store.claim(id, { ...input, takeoverFrom: owner }));
  }

  #decide(id: string, fingerprint: string | null, result: ClaimResult, sentAt: number, leaseMs: number, ttlMs: number): Begun {
    switch (result.status) {
      case 'acquired':
        this.#events.emit('acquired', { id, takeover: result.takeover });
        return { kind: 'run', claim: new Claim(this, id, result, sentAt, leaseMs, ttlMs, fingerprint) };
      case 'completed':
        if (fingerprint !== null && result.record.fingerprint !== null && result.record.fingerprint !== fingerprint) {
          this.#events.emit('mismatch', { id });
          return { kind: 'mismatch', error: new FingerprintMismatchError() };
        }
        this.#events.emit('replayed', { id });
        return { kind: 'replay', record: result.record };
      case 'in_progress': {
        if (fingerprint !== null && result.fingerprint !== null && result.fingerprint !== fingerprint) {
          this.#events.emit('mismatch', { id });
          return { kind: 'mismatch', error: new FingerprintMismatchError() };
        }
        // Retry soon: the first copy usually finishes long before its lease could be taken over
        // (the lease's end is on the error, as `leaseUntil`, for callers that want the worst case).
        return { kind: 'in_flight', error: new InFlightError(result.leaseUntil, 1) };
      }
    }
  }
}

/** What a recovery point's work receives: see {@link Claim.step}. */
export interface StepContext {
  /**
   * The step's own idempotency key, derived from the operation and the
   * step's name: send it downstream (`Idempotency-Key`), so that a step cut
   * off mid-call and run again is recognised by the service it calls.
   */
  readonly key: string;
  /** The operation's lease signal. */
  readonly signal: AbortSignal;
  /** True when this step runs again after an earlier attempt of it was cut off. */
  readonly takeover: boolean;
}

/** The states of a {@link Claim}: held until settled, or abandoned to its lease. */
type ClaimState = 'held' | 'abandoned' | 'settling' | 'settled';

/**
 * A won claim: this worker owns the operation until it settles it
 * (complete or release) or loses its lease. Made only by the engine
 * ({@link Engine.begin}, {@link Engine.beginMany}).
 *
 * - The lease is renewed in the background at a third of its length.
 * - The lease deadline is tracked locally, from the moment the last
 *   successful claim or renewal was sent: {@link Claim.signal} aborts with a
 *   {@link LeaseLostError} at that deadline when renewals failed, or as soon
 *   as a renewal is refused (taken over).
 * - It settles once: the first {@link Claim.settle} (or `complete`,
 *   `release`, `fail`) wins and later calls answer the same result.
 * - {@link Claim.abandon} stops the renewals when the request is gone but
 *   its handler may still be running: the claim then ends by its own
 *   settlement if one still comes, or by its lease.
 */
export class Claim implements SessionWatcher {
  /** Record id. */
  readonly id: string;
  /** Fencing token; every write presents it. */
  readonly token: string;
  /** True when this claim took over an expired lease (an earlier attempt crashed or stalled). */
  readonly takeover: boolean;
  /** Retention the outcome is stored with unless the settlement says otherwise, ms. */
  readonly ttlMs: number;
  readonly #engine: Engine;
  readonly #leaseMs: number;
  // Made on first use: most runs never look at their signal.
  #abort: AbortController | undefined;
  #lostReason: LeaseLostError | undefined;
  #renewTimer: NodeJS.Timeout | undefined;
  #deadlineTimer: NodeJS.Timeout | undefined;
  #leaseUntil: number;
  #state: ClaimState = 'held';
  #settled: Promise<Settled> | undefined;
  #marker: string | undefined;
  readonly #session: ProcessSession | undefined;
  #transaction: Promise<StoreTransaction> | undefined;
  // The request this claim runs: steps belong to it, not just to its key.
  readonly #fingerprint: string | null;
  // Claims of this operation's steps while they run: they never outlive it.
  #steps: Set<Claim> | undefined;

  /** @internal Made by the engine, which has just won the claim. */
  constructor(
    engine: Engine,
    id: string,
    acquired: ClaimAcquired,
    sentAt: number,
    leaseMs: number,
    ttlMs: number,
    fingerprint: string | null = null,
  ) {
    this.#fingerprint = fingerprint;
    this.#engine = engine;
    this.id = id;
    this.token = acquired.token;
    this.takeover = acquired.takeover;
    this.ttlMs = ttlMs;
    this.#leaseMs = leaseMs;
    this.#leaseUntil = sentAt + leaseMs;
    this.#session = engine.session;
    this.#session?.watch(this);
    this.#scheduleRenewal(sentAt);
  }

  /** Aborts when the lease is lost; pass it to the work so that it can stop early. */
  get signal(): AbortSignal {
    if (this.#abort === undefined) {
      this.#abort = new AbortController();
      if (this.#lostReason !== undefined) this.#abort.abort(this.#lostReason);
    }
    return this.#abort.signal;
  }

  /** True once the lease is known lost (refused, or its deadline passed unrenewed). */
  get lost(): boolean {
    return this.#lostReason !== undefined;
  }

  /**
   * The local lease deadline (epoch ms): the signal fires then unless a
   * renewal moves it. With a process session, never later than the
   * session's own deadline: past it, others may take the claim over.
   */
  get leaseUntil(): number {
    const session = this.#session;
    return session === undefined ? this.#leaseUntil : Math.min(this.#leaseUntil, session.until);
  }

  /** @internal The process session's heartbeat failed: the claim is bounded by the session's deadline too. */
  sessionAtRisk(_until: number): void {
    if (this.#state === 'held' || this.#state === 'abandoned') this.#armDeadline();
  }

  /** True once a settlement has begun (the claim will not be renewed again). */
  get settling(): boolean {
    return this.#state === 'settling' || this.#state === 'settled';
  }

  /**
   * Note that an answer has started to reach the client (response headers
   * or the first bytes of a stream). From now on a failure cannot be
   * released (the client may have acted on what it got): it completes with
   * this `marker` outcome instead, so the operation is never run again.
   */
  answered(marker: string): void {
    this.#marker = marker;
  }

  /** The marker given to {@link Claim.answered}, if an answer went out. */
  get marker(): string | undefined {
    return this.#marker;
  }

  #markLost(): void {
    if (this.#lostReason !== undefined) return;
    this.#lostReason = new LeaseLostError();
    this.#session?.unwatch(this);
    if (this.#steps) for (const step of this.#steps) step.abandon();
    clearTimeout(this.#deadlineTimer);
    this.#engine.emit('leaseLost', { id: this.id });
    this.#abort?.abort(this.#lostReason);
  }

  // The next renewal is due a third of the lease after the last one was SENT: an answer that
  // came late must not push it (and so the deadline check) past the deadline.
  #scheduleRenewal(sentAt: number): void {
    const due = sentAt + Math.max(10, Math.floor(this.#leaseMs / 3));
    this.#renewTimer = setTimeout(() => void this.#renew(), Math.max(0, due - Date.now()));
    this.#renewTimer.unref();
  }

  // The deadline is armed only while a renewal is outstanding or failing:
  // a run that renews on time never needs it.
  #armDeadline(): void {
    if (this.#deadlineTimer !== undefined || this.#lostReason !== undefined) return;
    this.#deadlineTimer = setTimeout(() => {
      this.#deadlineTimer = undefined;
      // A renewal or a session heartbeat may have moved the deadline meanwhile.
      if (Date.now() < this.leaseUntil) {
        if (this.#state === 'held' || this.#state === 'abandoned') this.#armDeadline();
        return;
      }
      this.#markLost();
    }, Math.max(0, this.leaseUntil - Date.now()));
    this.#deadlineTimer.unref();
  }

  #disarmDeadline(): void {
    clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = undefined;
  }

  async #renew(): Promise<void> {
    if (this.#state !== 'held') return;
    const sentAt = Date.now();
    this.#armDeadline();
    try {
      const ok = await this.#engine.storeCall(this.id, 'renew', () =>
        this.#engine.store.renew(this.id, this.token, this.#leaseMs),
      );
      if (this.#state !== 'held') return;
      if (!ok) {
        this.#engine.emit('fenced', { id: this.id, operation: 'renew' });
        this.#markLost();
        return;
      }
      this.#leaseUntil = sentAt + this.#leaseMs;
      this.#disarmDeadline();
    } catch {
      if (this.#state !== 'held') return;
      if (Date.now() >= this.leaseUntil) {
        this.#markLost();
        return;
      }
    }
    this.#scheduleRenewal(sentAt);
  }

  #stopRenewing(): void {
    clearTimeout(this.#renewTimer);
    this.#renewTimer = undefined;
  }

  /**
   * The request behind this claim is gone (its connection closed) while its
   * handler may still be running. Stop renewing: if the handler still
   * settles, that settlement counts; if not, the lease runs out and a retry
   * may take over, and the signal fires at the deadline. An answer that
   * already went out ({@link Claim.answered}) is completed with its marker
   * at once instead.
   */
  abandon(): void {
    if (this.#state !== 'held') return;
    if (this.#marker !== undefined) {
      void this.settle({ kind: 'complete', outcome: this.#marker });
      return;
    }
    this.#state = 'abandoned';
    this.#stopRenewing();
    this.#armDeadline();
    if (this.#steps) for (const step of this.#steps) step.abandon();
  }

  /**
   * End the claim: store the outcome, or release the record. The first
   * settlement wins; later calls answer its result. A completion that
   * cannot reach the store is retried with the same token until the lease
   * deadline. Never rejects for store failures (see {@link Settled}).
   */
  settle(settlement: Settlement): Promise<Settled> {
    if (this.#settled !== undefined) return this.#settled;
    this.#state = 'settling';
    this.#stopRenewing();
    const settling =
      settlement.kind === 'complete'
        ? this.#transaction
          ? this.#commit(settlement.outcome, settlement.ttlMs ?? this.ttlMs)
          : this.#complete(settlement.outcome, settlement.ttlMs ?? this.ttlMs)
        : this.#transaction
          ? this.#rollback().then(() => this.#release(settlement.reason))
          : this.#release(settlement.reason);
    this.#settled = settling.then((settled) => {
      this.#state = 'settled';
      this.#session?.unwatch(this);
      this.#disarmDeadline();
      return settled;
    });
    return this.#settled;
  }

  /**
   * Transactional mode (stores with `transactions`: the SQL stores): open
   * one transaction for this operation, once, and answer the driver's
   * handle inside it (a `pg` client, a mysql2 connection, a better-sqlite3
   * `Database`). The operation's business writes go through it, and the
   * record's completion commits with them: a crash at any point leaves both
   * or neither. A release rolls them back.
   *
   * @throws {@link ConfigError} when the store has no transactional mode.
   */
  async transaction<C = unknown>(): Promise<C> {
    const transactions = this.#engine.store.transactions;
    if (transactions === undefined) throw new ConfigError(`The ${this.#engine.store.name} store has no transactional mode.`);
    if (this.settling) throw new ConfigError('This operation is already settled; its transaction is closed.');
    this.#transaction ??= transactions.open(this.id, this.token);
    return (await this.#transaction).client as C;
  }

  /**
   * A recovery point: run `fn` once for this operation and keep its result.
   * A later attempt of the operation (a retry after a crash or a failure)
   * gets the stored result back instead of running `fn` again, and so
   * resumes after the last completed step. A step cut off mid-way runs
   * again on the next attempt, under the same derived `key`: pass it to the
   * service it calls. The result is stored as JSON (`undefined` too); a
   * step that throws stores nothing.
   *
   * @example
   * ```ts
   * const reservation = await claim.step('reserve', () => inventory.reserve(order));
   * const payment = await claim.step('pay', ({ key }) => payments.charge(order.total, { idempotencyKey: key }));
   * ```
   */
  async step<T>(name: string, fn: (step: StepContext) => T | Promise<T>): Promise<T> {
    if (typeof name !== 'string' || name.length === 0) throw new ConfigError('A step needs a non-empty name.');
    if (this.settling) throw new ConfigError(`Step ${JSON.stringify(name)} was asked for after the operation settled.`);
    const engine = this.#engine;
    // Keyed by the request's fingerprint too: a key released after a failure and reused for
    // another request must not hand that request the first one's step results.
    const id = recordId(name, `${this.id}\u0000${this.#fingerprint ?? ''}`, 'oncely:step');
    // An attempt cut off while it ran this step holds it until its session or lease ends: wait that long at most.
    const begun = await engine.begin({
      id,
      fingerprint: null,
      leaseMs: this.#leaseMs,
      ttlMs: this.ttlMs,
      wait: { timeoutMs: this.#leaseMs + 1_000 },
    });
    switch (begun.kind) {
      case 'replay':
        return decodeResult<T>(begun.record.outcome);
      case 'bypass':
        return fn({ key: deriveKey(this.id, name), signal: this.signal, takeover: false });
      case 'run':
        break;
      default:
        throw begun.error;
    }
    const step = begun.claim;
    this.#steps ??= new Set();
    this.#steps.add(step);
    if (this.#state === 'abandoned' || this.lost) step.abandon();
    const performed = await step.perform<T>({
      run: () => fn({ key: deriveKey(this.id, name), signal: this.signal, takeover: step.takeover }),
      settle: (value) => ({ kind: 'complete', outcome: encodeResult(value) }),
    });
    this.#steps.delete(step);
    if (!performed.ok) throw performed.error;
    return performed.value;
  }

  /** True once {@link Claim.transaction} was asked for: the completion commits with the business writes. */
  get transactional(): boolean {
    return this.#transaction !== undefined;
  }

  async #commit(outcome: string, ttlMs: number): Promise<Settled> {
    const engine = this.#engine;
    let transaction: StoreTransaction;
    try {
      transaction = await this.#transaction!;
    } catch (error) {
      // It never opened: nothing was written through it.
      engine.emit('storeError', { id: this.id, operation: 'transaction', error });
      return (await this.#release('transaction failed to open')) === 'released' ? 'rolled_back' : 'unsettled';
    }
    try {
      // No store timeout here: a commit cut short by a timer would still land.
      if (await transaction.commit(outcome, ttlMs)) {
        engine.emit('stored', { id: this.id, bytes: outcome.length });
        return 'stored';
      }
      engine.emit('fenced', { id: this.id, operation: 'complete' });
      this.#markLost();
      return 'fenced';
    } catch (error) {
      engine.emit('storeError', { id: this.id, operation: 'commit', error });
      // Both or neither committed: look, and release when it was neither, so that a retry runs.
      const released = await this.#release('commit failed');
      if (await this.#storedAlready(outcome)) return 'stored';
      return released === 'released' ? 'rolled_back' : 'unsettled';
    }
  }

  async #rollback(): Promise<void> {
    try {
      const transaction = await this.#transaction!;
      await transaction.rollback();
    } catch (error) {
      this.#engine.emit('storeError', { id: this.id, operation: 'rollback', error });
    }
  }

  /**
   * Settle a run that failed: release it, or, when an answer already went
   * out, complete it with its marker so that it is never run again.
   */
  fail(reason: string): Promise<Settled> {
    return this.settle(this.#marker !== undefined ? { kind: 'complete', outcome: this.#marker } : { kind: 'release', reason });
  }

  /**
   * Run `operation` under this claim and settle it on every path: its
   * result is settled as `operation.settle` says; a thrown error (or a
   * `settle` that throws) as `operation.failure` says, by default released
   * (or completed with the marker when an answer already went out).
   */
  async perform<T>(operation: Operation<T>): Promise<Performed<T>> {
    let value: T;
    try {
      value = await operation.run(this);
    } catch (error) {
      return { ok: false, error, settled: await this.#settleFailure(operation, error) };
    }
    let settlement: Settlement;
    try {
      settlement = operation.settle(value, this);
    } catch (error) {
      return { ok: false, error, settled: await this.#settleFailure(operation, error) };
    }
    return { ok: true, value, settled: await this.settle(settlement) };
  }

  #settleFailure<T>(operation: Operation<T>, error: unknown): Promise<Settled> {
    let settlement: Settlement | undefined;
    try {
      settlement = operation.failure?.(error, this);
    } catch {
      settlement = undefined;
    }
    return settlement ? this.settle(settlement) : this.fail('operation failed');
  }

  async #complete(outcome: string, ttlMs: number): Promise<Settled> {
    const engine = this.#engine;
    const { store } = engine;
    let pause = 50;
    let retried = false;
    for (;;) {
      try {
        const ok = await engine.storeCall(this.id, 'complete', () => store.complete(this.id, this.token, outcome, ttlMs));
        // A retry after an attempt that timed out but landed finds the record completed and answers
        // false: if what is stored is this outcome, it was this claim's own completion.
        if (ok || (retried && (await this.#storedAlready(outcome)))) {
          engine.emit('stored', { id: this.id, bytes: outcome.length });
          return 'stored';
        }
        engine.emit('fenced', { id: this.id, operation: 'complete' });
        this.#markLost();
        return 'fenced';
      } catch (error) {
        // Only an unreachable store is worth another try, and only until the
        // record's own lease ends. Not cut short by the process session: a
        // session whose heartbeats failed (the same outage) may look dead to
        // others, but a takeover gives the record a new token and this
        // completion is then refused (fenced); while nobody took over, it is
        // the only thing that stops a retry running the operation again.
        const remaining = this.#leaseUntil - Date.now();
        if (!(error instanceof StoreUnavailableError) || remaining <= pause) {
          engine.emit('unsettled', { id: this.id, error });
          return 'unsettled';
        }
        retried = true;
        await sleep(pause);
        pause = Math.min(pause * 2, 1_000);
      }
    }
  }

  async #storedAlready(outcome: string): Promise<boolean> {
    try {
      const record = await this.#engine.storeCall(this.id, 'get', () => this.#engine.store.get(this.id));
      return record?.state === 'completed' && record.outcome === outcome;
    } catch {
      return false;
    }
  }

  async #release(reason: string): Promise<Settled> {
    const engine = this.#engine;
    try {
      const ok = await engine.storeCall(this.id, 'release', () => engine.store.release(this.id, this.token));
      if (ok) {
        engine.emit('released', { id: this.id, reason });
        return 'released';
      }
      engine.emit('fenced', { id: this.id, operation: 'release' });
      return 'fenced';
    } catch (error) {
      // The lease ends by itself; a retry can take over then.
      engine.emit('unsettled', { id: this.id, error });
      return 'unsettled';
    }
  }

  /**
   * Store the outcome so that every duplicate gets it: {@link Claim.settle}
   * with a completion. Answers `true` when stored, `false` when this worker
   * no longer owns the record (fenced) or the store stayed unreachable until
   * the lease deadline.
   */
  async complete(outcome: string, ttlMs: number = this.ttlMs): Promise<boolean> {
    return (await this.settle({ kind: 'complete', outcome, ttlMs })) === 'stored';
  }

  /**
   * Delete the claim so that a retry runs the operation again:
   * {@link Claim.settle} with a release. Answers `true` when released.
   */
  async release(reason = 'retryable failure'): Promise<boolean> {
    return (await this.settle({ kind: 'release', reason })) === 'released';
  }
}
