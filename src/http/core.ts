import { type Claim, checkDuration, type StepContext, type Engine, type EngineOptions, engineFrom, type Settled, type WaitOptions } from '../engine/engine.js';
import { type FingerprintInput, fingerprintOf, fingerprintV1, type RecordIdSecret, recordIdFor } from '../engine/fingerprint.js';
import { parseIdempotencyKey } from '../engine/key.js';
import { isThenable } from '../engine/thenable.js';
import {
  AlreadyProcessedError,
  ConfigError,
  isOncelyError,
  KeyMissingError,
  NotReplayableError,
  type OncelyError,
  RolledBackError,
  ScopeMissingError,
} from '../errors/index.js';
import { decodeOutcome, encodeOutcome, type HttpResponse } from './outcome.js';
import { DEFAULT_REPLAY_HEADERS, defaultOutcomePolicy, NEVER_REPLAYED, type OutcomeDecision } from './policy.js';
import { problemResponse } from './problem.js';

/** The response header that marks a replay. */
export const REPLAYED_HEADER = 'idempotent-replayed';
/** The request header carrying the key. */
export const KEY_HEADER = 'idempotency-key';

/**
 * Options shared by the Express, Fastify and fetch front doors. `R` is the
 * framework's request type, given to `scope` and `fingerprint`.
 */
export interface HttpIdempotencyOptions<R> extends Partial<EngineOptions> {
  /** An engine to share between front doors; otherwise one is made from these options (`store` required). */
  engine?: Engine;
  /** Methods that are made idempotent; others pass through. Default `['POST', 'PATCH']`. */
  methods?: readonly string[];
  /** Refuse requests without a key (400). Default `true`. With `false` they pass through untouched. */
  required?: boolean;
  /** A pattern the key must match in full (for example a UUID). */
  keyPattern?: RegExp;
  /**
   * Who owns the key (account, tenant), from the request. Decided by the
   * server, never the client. Return `undefined` to refuse the request
   * (400, scope missing). Set `false` to declare keys global on purpose;
   * leaving it out logs a warning once.
   */
  scope?: ((request: R) => string | undefined | Promise<string | undefined>) | false;
  /** Separates this middleware's records from others' in a shared store. */
  namespace?: string;
  /**
   * Keyed record ids: with a secret (16+ bytes, the same in every process
   * sharing the store), record ids are an HMAC-SHA-256 of namespace, scope
   * and key, so a guessed (scope, key) pair cannot be confirmed from the
   * store's contents. Default: a plain SHA-256.
   */
  secret?: RecordIdSecret;
  /**
   * Fingerprint of a request: `'v1'` (default: method, path, sorted query,
   * canonical JSON or raw body, chosen headers), a function choosing what
   * identifies the request, or `false` for none.
   */
  fingerprint?: 'v1' | false | ((request: R) => unknown);
  /** Request headers included in the v1 fingerprint. */
  fingerprintHeaders?: readonly string[];
  /**
   * `'replay'` (default) stores the response and replays it; `'constraint'`
   * keeps only key and fingerprint, and a duplicate is told it was already processed.
   */
  strategy?: 'replay' | 'constraint';
  /**
   * Hash-based keys: when a request has no key, derive one from its scope
   * and fingerprint, deduplicating identical requests within `windowMs`.
   */
  keyFromFingerprint?: { windowMs: number } | false;
  /** Extra response headers to replay (names). */
  replayHeaders?: readonly string[];
  /** Largest response body stored for replay, bytes. Larger ones complete with a marker. Default 1 MiB. */
  maxStoredBytes?: number;
  /** Largest request body read when oncely reads the body itself, bytes. Default 1 MiB. */
  maxBodyBytes?: number;
  /** Outcome policy by status; the default stores 2xx–4xx except 401, 403, 404, 405, 408, 409, 425, 429. */
  outcome?: (status: number) => OutcomeDecision;
  /** Where warnings go (a missing scope; a settlement that failed unexpectedly). Default `console`. */
  logger?: { warn(message: string): void };
}

/** What a handler can see and decide about its own idempotent run. */
export interface IdempotencyContext {
  /** The key (derived from the fingerprint when hash-based keys applied). */
  readonly key: string;
  /** Record id: stable per (scope, key); usable as a unique business key. */
  readonly id: string;
  /** True when an earlier attempt crashed or stalled and this run took over. */
  readonly takeover: boolean;
  /** Aborts when the lease is lost: the response will not be stored. */
  readonly signal: AbortSignal;
  /** Override the outcome policy for this response. */
  decide(decision: OutcomeDecision): void;
  /**
   * Transactional mode (SQL stores): the driver's handle inside one
   * transaction opened for this request (a `pg` client, a mysql2
   * connection, a better-sqlite3 `Database`). Write your business rows
   * through it: they commit together with the stored response, before the
   * response is sent; a released outcome rolls them back. If the commit
   * fails, the client gets a 503 instead of your answer, and nothing
   * happened.
   *
   * @example
   * ```ts
   * const db = await req.idempotency!.transaction<import('pg').PoolClient>();
   * await db.query('INSERT INTO payments (id, amount) VALUES ($1, $2)', [req.idempotency!.id, 2500]);
   * ```
   */
  transaction<C = unknown>(): Promise<C>;
  /**
   * A recovery point (see `Claim.step`): `fn` runs once for this request's
   * key; a retry after a crash gets its stored result and resumes after it.
   * Pass `step.key` to the service the step calls.
   *
   * @example
   * ```ts
   * const charge = await req.idempotency!.step('pay', ({ key }) => psp.charge(2500, { idempotencyKey: key }));
   * ```
   */
  step<T>(name: string, fn: (step: StepContext) => T | Promise<T>): Promise<T>;
}

/** Settings a single route may change. */
export interface RouteOverrides {
  /** Retention of this route's outcomes, ms. */
  ttlMs?: number;
  /** Lease for this route, ms. */
  leaseMs?: number;
  /** Wait for in-flight duplicates on this route. */
  wait?: WaitOptions | false;
}

/** A request as the core sees it: each front door fills this in. */
export interface HttpRequestView<R> {
  raw: R;
  method: string;
  path: string;
  query: string;
  /** All field lines of a request header (lower-case name). */
  header(name: string): string[] | undefined;
  /** The body for the fingerprint. */
  body: FingerprintInput['body'];
}

/** An idempotent run in progress, handed back to the front door. */
export interface HttpRun {
  readonly claim: Claim | null;
  readonly context: IdempotencyContext;
  /** @internal */ decision: OutcomeDecision | undefined;
  /** @internal */ readonly ttlMs: number | undefined;
}

/** What a front door does with a request. */
export type HttpBegin =
  | { kind: 'pass' }
  | { kind: 'respond'; response: HttpResponse }
  | { kind: 'run'; run: HttpRun };

/** What a front door captured of the handler's response. */
export type HttpFinish =
  | { kind: 'response'; response: HttpResponse }
  /** The body was streamed or exceeded `maxStoredBytes`: only status and headers are known. */
  | { kind: 'unstorable'; status: number; headers: Array<[string, string]> };

const neverAborted = new AbortController().signal;
const warned = new WeakSet<object>();
const PASS: HttpBegin = { kind: 'pass' };

// One per idempotent request: the run and, as `context`, what its handler sees.
class Run implements HttpRun, IdempotencyContext {
  decision: OutcomeDecision | undefined = undefined;
  readonly claim: Claim | null;
  readonly key: string;
  readonly id: string;
  readonly ttlMs: number | undefined;

  constructor(claim: Claim | null, key: string, id: string, ttlMs: number | undefined) {
    this.claim = claim;
    this.key = key;
    this.id = id;
    this.ttlMs = ttlMs;
  }

  get context(): IdempotencyContext {
    return this;
  }

  get takeover(): boolean {
    return this.claim?.takeover ?? false;
  }

  get signal(): AbortSignal {
    return this.claim?.signal ?? neverAborted;
  }

  // A bound function, so that `const { decide } = request.idempotency` works.
  readonly decide = (decision: OutcomeDecision): void => {
    this.decision = decision;
  };

  step<T>(name: string, fn: (step: StepContext) => T | Promise<T>): Promise<T> {
    if (this.claim === null) return Promise.resolve(fn({ key: `${this.key}:${name}`, signal: neverAborted, takeover: false }));
    return this.claim.step(name, fn);
  }

  transaction<C = unknown>(): Promise<C> {
    if (this.claim === null) {
      return Promise.reject(new ConfigError('This request runs without a claim (the store is down and failOpen is set): there is no transaction.'));
    }
    return this.claim.transaction<C>();
  }
}

/**
 * The protocol logic shared by every HTTP front door: key and scope, the
 * fingerprint, the claim, replays and problem responses, and the outcome
 * policy. Front doors only translate their framework's request and response.
 */
export class HttpIdempotency<R> {
  readonly engine: Engine;
  readonly maxStoredBytes: number;
  readonly maxBodyBytes: number;
  readonly #methods: ReadonlySet<string>;
  readonly #options: HttpIdempotencyOptions<R>;
  readonly #replayHeaders: ReadonlySet<string>;
  readonly #policy: (status: number) => OutcomeDecision;
  readonly #fingerprintHeaders: readonly string[];
  readonly #recordId: (key: string, scope?: string, namespace?: string) => string;
  // Response headers a stored outcome can keep: the replayed ones, and
  // `location` for a not-replayable marker.
  readonly #capturedHeaders: readonly string[];

  constructor(options: HttpIdempotencyOptions<R>) {
    this.#options = options;
    this.engine = engineFrom(options, 'oncely');
    this.#recordId = recordIdFor(options.secret);
    this.#methods = new Set((options.methods ?? ['POST', 'PATCH']).map((m) => m.toUpperCase()));
    this.#replayHeaders = new Set(
      [...DEFAULT_REPLAY_HEADERS, ...(options.replayHeaders ?? []).map((h) => h.toLowerCase())].filter(
        (h) => !NEVER_REPLAYED.has(h),
      ),
    );
    this.#capturedHeaders = [...new Set([...this.#replayHeaders, 'location'])];
    this.#policy = options.outcome ?? defaultOutcomePolicy;
    this.#fingerprintHeaders = (options.fingerprintHeaders ?? []).map((h) => h.toLowerCase());
    this.maxStoredBytes = options.maxStoredBytes ?? 1024 * 1024;
    this.maxBodyBytes = options.maxBodyBytes ?? 1024 * 1024;
    if (options.keyFromFingerprint && options.fingerprint === false) {
      throw new ConfigError('keyFromFingerprint needs a fingerprint.');
    }
    if (options.keyFromFingerprint) checkDuration('keyFromFingerprint.windowMs', options.keyFromFingerprint.windowMs);
    checkDuration('maxStoredBytes', this.maxStoredBytes);
    checkDuration('maxBodyBytes', this.maxBodyBytes);
    if (options.scope === undefined && !warned.has(this.engine)) {
      warned.add(this.engine);
      (options.logger ?? console).warn(
        'oncely: no `scope` configured, so Idempotency-Keys are global across all callers. ' +
          'Pass `scope: (req) => accountId`, or `scope: false` to confirm global keys.',
      );
    }
  }

  /** True when this method is made idempotent. */
  applies(method: string): boolean {
    return this.#methods.has(method);
  }

  /** Decide what happens to a request: pass it on, answer it now, or run it under a claim. */
  async begin(view: HttpRequestView<R>, overrides: RouteOverrides = {}): Promise<HttpBegin> {
    try {
      const options = this.#options;
      let key = parseIdempotencyKey(view.header(KEY_HEADER), { pattern: options.keyPattern });
      let ttlMs = overrides.ttlMs;
      if (key === undefined && !options.keyFromFingerprint) {
        if (options.required === false) return PASS;
        throw new KeyMissingError();
      }
      // Only a user's function makes these asynchronous; the defaults cost no extra turn.
      let fingerprint = this.#fingerprint(view);
      if (isThenable(fingerprint)) fingerprint = await fingerprint;
      if (key === undefined) {
        // Hash-based key: identical requests within the window are one operation.
        key = `fp:${fingerprint}`;
        ttlMs = options.keyFromFingerprint ? options.keyFromFingerprint.windowMs : ttlMs;
      }
      let scope = '';
      if (options.scope) {
        let s = options.scope(view.raw);
        if (isThenable(s)) s = await s;
        if (s === undefined || s === '') throw new ScopeMissingError();
        scope = s;
      }
      const id = this.#recordId(key, scope, options.namespace);
      const begun = await this.engine.begin({ id, fingerprint, scope, ttlMs, leaseMs: overrides.leaseMs, wait: overrides.wait });
      switch (begun.kind) {
        case 'replay':
          return { kind: 'respond', response: this.#replay(begun.record.outcome) };
        case 'run':
          return { kind: 'run', run: new Run(begun.claim, key, id, ttlMs) };
        case 'bypass':
          return { kind: 'run', run: new Run(null, key, id, ttlMs) };
        default:
          return { kind: 'respond', response: problemResponse(begun.error) };
      }
    } catch (error) {
      if (isOncelyError(error)) return { kind: 'respond', response: problemResponse(error) };
      throw error;
    }
  }

  #fingerprint(view: HttpRequestView<R>): string | null | Promise<string | null> {
    const option = this.#options.fingerprint ?? 'v1';
    if (option === false) return null;
    if (typeof option === 'function') {
      const chosen = option(view.raw);
      return isThenable(chosen) ? Promise.resolve(chosen).then(fingerprintOf) : fingerprintOf(chosen);
    }
    const names = this.#fingerprintHeaders;
    const headers: Array<[string, string]> = new Array(names.length);
    for (let i = 0; i < names.length; i++) headers[i] = [names[i]!, (view.header(names[i]!) ?? []).join(', ')];
    return fingerprintV1({ method: view.method, path: view.path, query: view.query, body: view.body, headers });
  }

  #replay(stored: string): HttpResponse {
    const outcome = decodeOutcome(stored);
    if (outcome.kind === 'processed') return problemResponse(new AlreadyProcessedError());
    if (outcome.kind === 'marker') return problemResponse(new NotReplayableError(outcome.status, outcome.location));
    const { response } = outcome;
    return { status: response.status, headers: [...response.headers, [REPLAYED_HEADER, 'true']], body: response.body };
  }

  /**
   * The response headers a stored outcome can keep, read one by name through
   * `get` (a framework's `getHeader`): cheaper than copying every header.
   */
  captureHeaders(get: (name: string) => number | string | readonly string[] | null | undefined): Array<[string, string]> {
    const out: Array<[string, string]> = [];
    for (const name of this.#capturedHeaders) {
      const value = get(name);
      if (value === undefined || value === null) continue;
      out.push([name, Array.isArray(value) ? value.join(', ') : String(value)]);
    }
    return out;
  }

  // Keep only the headers that are replayed.
  #replayable(headers: Iterable<[string, string]>): Array<[string, string]> {
    const kept: Array<[string, string]> = [];
    for (const [name, value] of headers) {
      const lower = name.toLowerCase();
      if (this.#replayHeaders.has(lower)) kept.push([lower, value]);
    }
    return kept;
  }

  /**
   * Settle a run once the handler's response is known: store it (per the
   * outcome policy) before it is sent, or release the claim. Never throws:
   * a store that stays down is reported as an event, the response still goes
   * out, and the record stays in progress until its lease ends.
   */
  finish(run: HttpRun, finished: HttpFinish): Promise<Settled | undefined> {
    const { claim } = run;
    if (claim === null) return Promise.resolve(undefined);
    const status = finished.kind === 'response' ? finished.response.status : finished.status;
    const decision = run.decision ?? this.#policy(status);
    if (decision === 'release') return claim.settle({ kind: 'release', reason: `status ${status}` });
    let outcome: string;
    if (this.#options.strategy === 'constraint') outcome = encodeOutcome({ kind: 'processed', status });
    else if (finished.kind === 'unstorable') outcome = this.#marker(status, finished.headers);
    else {
      const { response } = finished;
      outcome = encodeOutcome({
        kind: 'response',
        response: { status, headers: this.#replayable(response.headers), body: response.body },
      });
    }
    return claim.settle({ kind: 'complete', outcome, ttlMs: run.ttlMs });
  }

  #marker(status: number, headers: ReadonlyArray<[string, string]>): string {
    if (this.#options.strategy === 'constraint') return encodeOutcome({ kind: 'processed', status });
    const location = headers.find(([name]) => name.toLowerCase() === 'location')?.[1];
    return encodeOutcome({ kind: 'marker', status, location });
  }

  /**
   * What to send instead of the handler's answer, when there is something
   * else to send: in transactional mode, an answer whose business writes
   * did not commit (the commit failed, another owner fenced it, or the
   * settlement failed) must not reach the client as if it had happened.
   * Answers a 503 problem then, `undefined` otherwise.
   */
  replacement(run: HttpRun, settled: Settled | undefined, status: number): HttpResponse | undefined {
    if (run.claim === null || !run.claim.transactional || settled === 'stored') return undefined;
    // A released answer (a 5xx, a 401…) said itself that nothing happened: it goes out as it is.
    if ((run.decision ?? this.#policy(status)) === 'store') {
      return problemResponse(
        new RolledBackError('The operation did not commit (its transaction rolled back); nothing happened. Retry with the same key.'),
      );
    }
    return undefined;
  }

  /**
   * The response's status and headers have started to reach the client (a
   * stream, a hijacked reply): if the run fails from now on, it completes
   * with a marker (never run again) instead of being released, unless the
   * outcome policy releases this status anyway.
   */
  answered(run: HttpRun, status: number, headers: ReadonlyArray<[string, string]>): void {
    const { claim } = run;
    if (claim === null) return;
    if ((run.decision ?? this.#policy(status)) === 'release') return;
    claim.answered(this.#marker(status, headers));
  }

  /**
   * Settle a run whose handler failed without a complete response: released,
   * or completed with its marker when an answer had already gone out.
   */
  fail(run: HttpRun, reason: string): Promise<Settled | undefined> {
    return run.claim === null ? Promise.resolve(undefined) : run.claim.fail(reason);
  }

  /**
   * The request's connection closed before its response was complete, and
   * its handler may still be running: stop renewing (see {@link Claim.abandon}).
   */
  gone(run: HttpRun): void {
    run.claim?.abandon();
  }

  /** The problem response for an oncely error. */
  problem(error: OncelyError): HttpResponse {
    return problemResponse(error);
  }
}
