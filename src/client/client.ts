/**
 * The retrying fetch: one logical operation, one Idempotency-Key, safe retries.
 *
 * @module
 */

import { randomUUID } from 'node:crypto';
import { ClientRequestError, type ClientFailureReason, ConfigError } from '../errors/index.js';
import { type Jitter, backoffDelay } from './backoff.js';
import { type ClientBody, type PreparedBody, prepareBody } from './body.js';
import { IDEMPOTENT_METHODS, type ResponseVerdict, isNetworkError, judgeResponse } from './retry.js';

/**
 * A fetch function: the global `fetch` (the default) or any compatible one,
 * such as undici's. The client always calls it with a URL string and an init.
 */
export type FetchFunction = (input: string, init: RequestInit) => Promise<Response>;

/** Why one attempt is retried, as {@link RetryState.reason} reports it. */
export type RetryReason = 'network' | 'timeout' | 'status';

/** What the client tells {@link ClientOptions.onRetry} before it waits and retries. */
export interface RetryState {
  /** The Idempotency-Key of the operation (the same on every attempt); undefined when none is sent. */
  readonly key: string | undefined;
  /** The attempt that just failed (1 for the first); the next one is `attempt + 1`. */
  readonly attempt: number;
  /** How long the client waits before the next attempt. */
  readonly delayMs: number;
  /** What went wrong with the attempt. */
  readonly reason: RetryReason;
  /** The status answered, when `reason` is `'status'`. */
  readonly status?: number;
  /** The error raised, when `reason` is `'network'` or `'timeout'`. */
  readonly error?: unknown;
  /** The request being retried (its body is not included). */
  readonly request: RetryRequest;
}

/** The request of a {@link RetryState}. */
export interface RetryRequest {
  /** The method, upper-cased. */
  readonly method: string;
  /** The absolute URL. */
  readonly url: string;
  /** A copy of the headers sent, including `Idempotency-Key`. */
  readonly headers: Headers;
}

/** Options of {@link createClient}; each may also be given per call. Defaults are in brackets. */
export interface ClientOptions {
  /** The fetch to call [the global `fetch`]. */
  fetch?: FetchFunction;
  /** How many times to retry after the first attempt [5]; 0 disables retries. */
  retries?: number;
  /** Smallest wait between attempts, in ms [100]. */
  minDelayMs?: number;
  /** Largest backoff wait, in ms [5000]. */
  maxDelayMs?: number;
  /** Backoff growth per retry [2]. */
  factor?: number;
  /** Jitter strategy [`'full'`]; see {@link backoffDelay}. */
  jitter?: Jitter;
  /**
   * Largest `Retry-After` obeyed, in ms [30000]. A server asking for a longer
   * wait gets no retry: its answer is returned.
   */
  maxRetryAfterMs?: number;
  /** Time limit of one attempt, until the response headers arrive, in ms [none]. */
  attemptTimeoutMs?: number;
  /** Time limit of the whole operation (all attempts and waits), in ms from the call [none]. */
  deadlineMs?: number;
  /** Absolute deadline of the whole operation [none]; the earlier of this and `deadlineMs` applies. */
  deadline?: Date;
  /**
   * Methods that get a generated Idempotency-Key [`['POST', 'PATCH']`].
   * GET, HEAD, OPTIONS, PUT and DELETE are idempotent by nature (RFC 9110):
   * they are retried without a key.
   */
  keyMethods?: readonly string[];
  /** Makes a new key [`crypto.randomUUID`]. */
  generateKey?: () => string;
  /**
   * Called before each retry, with the state of the failed attempt. It may be
   * async (the client waits for it); if it throws, the operation stops with that error.
   */
  onRetry?: (state: RetryState) => void | Promise<void>;
}

/** Per-call options: the client options, plus the key of this operation. */
export interface RequestOptions extends Omit<ClientOptions, 'fetch'> {
  /**
   * The Idempotency-Key of this operation (an `Idempotency-Key` header in
   * `init.headers` takes precedence). Use it to resume an operation whose
   * outcome is unknown, or to pass a {@link deriveKey | derived key}.
   */
  key?: string;
}

/** `RequestInit`, where `body` may also be a Node `Readable` or any async iterable of bytes. */
export interface ClientRequestInit extends Omit<RequestInit, 'body'> {
  /** Replayable bodies are resent on retries; stream bodies are sent once (no retry). */
  body?: ClientBody;
  /** Required by Node's fetch for stream bodies; the client sets it for you. */
  duplex?: 'half';
}

/**
 * `Response`, typed without `clone`, for {@link OncelyResponse} to declare its
 * own: the DOM lib declares `clone` a method and @types/node a property, and a
 * subclass cannot override both. At run time this is `Response` itself.
 */
const ResponseWithoutClone: new (body: Response['body'], init: ResponseInit) => Omit<Response, 'clone'> = Response;

/**
 * The answer of an operation: a standard `Response` (read it as usual:
 * `.ok`, `.status`, `.json()`…) that also tells how it was obtained.
 *
 * It is a new `Response` over the same body stream, headers, status, `url`,
 * `redirected` and `type` as the one fetch returned; nothing global is patched.
 *
 * @example
 * ```ts
 * const res = await client.fetch(url, { method: 'POST', body });
 * console.log(res.status, res.key, res.attempts, res.replayed);
 * ```
 */
export class OncelyResponse extends ResponseWithoutClone {
  /** The Idempotency-Key sent on every attempt; undefined when none was sent. */
  readonly key: string | undefined;
  /** How many attempts were made (1 when the first one was answered). */
  readonly attempts: number;
  /** True when the server answered `Idempotent-Replayed: true`: the operation had already run. */
  readonly replayed: boolean;

  /** Wraps the `response` fetch returned; its body is not read. */
  constructor(response: Response, meta: { key: string | undefined; attempts: number }) {
    super(NULL_BODY_STATUSES.has(response.status) ? null : response.body, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
    this.key = meta.key;
    this.attempts = meta.attempts;
    this.replayed = response.headers.get('idempotent-replayed')?.trim().toLowerCase() === 'true';
    keepOrigin(this, response);
  }

  /** A copy that can be read separately, with the same `key`, `attempts`, `replayed` and `url`. */
  clone(): OncelyResponse {
    const copy = new OncelyResponse(Response.prototype.clone.call(this), { key: this.key, attempts: this.attempts });
    keepOrigin(copy, this);
    return copy;
  }
}

/** Own properties shadow Response's getters, so a wrapped answer keeps the real URL. */
function keepOrigin(target: Response, origin: Response): void {
  Object.defineProperties(target, {
    url: { value: origin.url, enumerable: true, configurable: true },
    redirected: { value: origin.redirected, enumerable: true, configurable: true },
    type: { value: origin.type, enumerable: true, configurable: true },
  });
}

const NULL_BODY_STATUSES: ReadonlySet<number> = new Set([101, 103, 204, 205, 304]);

/** The `fetch` of a client: fetch's signature, plus per-call options. */
export type OncelyFetch = (
  input: string | URL | Request,
  init?: ClientRequestInit,
  options?: RequestOptions,
) => Promise<OncelyResponse>;

/** A client made by {@link createClient}. */
export interface OncelyClient {
  /**
   * Performs one logical operation, retrying it safely; bound, so it can be
   * passed wherever a fetch function is expected.
   */
  readonly fetch: OncelyFetch;
}

interface Settings {
  fetch: FetchFunction;
  retries: number;
  minDelayMs: number;
  maxDelayMs: number;
  factor: number;
  jitter: Jitter;
  maxRetryAfterMs: number;
  attemptTimeoutMs: number | undefined;
  deadlineMs: number | undefined;
  deadline: Date | undefined;
  keyMethods: ReadonlySet<string>;
  generateKey: () => string;
  onRetry: ((state: RetryState) => void | Promise<void>) | undefined;
  key: string | undefined;
}

/** Options are validated and defaulted once per call (ky's normalise step). */
function settle(options: ClientOptions & RequestOptions): Settings {
  const settings: Settings = {
    fetch: options.fetch ?? ((input, init) => globalThis.fetch(input, init)),
    retries: options.retries ?? 5,
    minDelayMs: options.minDelayMs ?? 100,
    maxDelayMs: options.maxDelayMs ?? 5000,
    factor: options.factor ?? 2,
    jitter: options.jitter ?? 'full',
    maxRetryAfterMs: options.maxRetryAfterMs ?? 30_000,
    attemptTimeoutMs: options.attemptTimeoutMs,
    deadlineMs: options.deadlineMs,
    deadline: options.deadline,
    keyMethods: new Set((options.keyMethods ?? ['POST', 'PATCH']).map((m) => m.toUpperCase())),
    generateKey: options.generateKey ?? randomUUID,
    onRetry: options.onRetry,
    key: options.key,
  };
  const counts: [string, number | undefined][] = [
    ['retries', settings.retries],
    ['minDelayMs', settings.minDelayMs],
    ['maxDelayMs', settings.maxDelayMs],
    ['maxRetryAfterMs', settings.maxRetryAfterMs],
    ['attemptTimeoutMs', settings.attemptTimeoutMs],
    ['deadlineMs', settings.deadlineMs],
  ];
  for (const [name, value] of counts) {
    if (value !== undefined && !(Number.isFinite(value) && value >= 0)) {
      throw new ConfigError(`oncely/client: ${name} must be a finite number >= 0, got ${value}.`);
    }
  }
  if (!Number.isInteger(settings.retries)) throw new ConfigError('oncely/client: retries must be an integer.');
  if (!(Number.isFinite(settings.factor) && settings.factor >= 1)) {
    throw new ConfigError('oncely/client: factor must be a finite number >= 1.');
  }
  if (settings.jitter !== 'full' && settings.jitter !== 'decorrelated') {
    throw new ConfigError(`oncely/client: jitter must be 'full' or 'decorrelated', got ${String(settings.jitter)}.`);
  }
  if (settings.deadline !== undefined && Number.isNaN(settings.deadline.getTime())) {
    throw new ConfigError('oncely/client: deadline is an invalid Date.');
  }
  return settings;
}

/**
 * Creates a client whose `fetch` performs each call as one logical operation
 * with safe retries:
 *
 * - one key (`crypto.randomUUID()`) per operation, made before the first
 *   attempt, sent as `Idempotency-Key` on every attempt; a caller's own key
 *   (header, any case, any header form; or `options.key`) always wins;
 * - POST and PATCH get a key; GET, HEAD, OPTIONS, PUT and DELETE are retried
 *   without one (idempotent by nature); any other method without a key is
 *   sent once, because retrying it could repeat its effect;
 * - retried: network errors, attempt timeouts, 408, 425, 429, 500, 502, 503,
 *   504, and the in-flight 409; never 400, 401, 403, 404, 422;
 * - backoff with jitter between attempts; `Retry-After` obeyed exactly up to
 *   `maxRetryAfterMs`; past that cap or the deadline, the last answer is returned;
 * - HTTP error statuses are returned (like fetch); a {@link ClientRequestError}
 *   is thrown only when no answer could be obtained; the caller's abort
 *   rejects at once with the abort reason;
 * - stream bodies are sent once, never retried.
 *
 * @example
 * ```ts
 * import { createClient } from 'oncely/client';
 *
 * const client = createClient({ retries: 4, attemptTimeoutMs: 5_000, deadlineMs: 20_000 });
 * const res = await client.fetch('https://api.example.com/payments', {
 *   method: 'POST',
 *   headers: { 'content-type': 'application/json' },
 *   body: JSON.stringify({ amount: 4200, currency: 'EUR' }),
 * });
 * if (res.ok) console.log(await res.json(), { key: res.key, attempts: res.attempts, replayed: res.replayed });
 * ```
 */
export function createClient(options: ClientOptions = {}): OncelyClient {
  settle(options); // fail fast on bad options, at creation
  // async, so that bad per-call options reject rather than throw synchronously.
  const fetch: OncelyFetch = async (input, init = {}, callOptions = {}) =>
    operate(input, init, settle({ ...options, ...callOptions }));
  return Object.freeze({ fetch });
}

/**
 * One operation with a one-off client: `createClient(options).fetch(input, init)`.
 *
 * @example
 * ```ts
 * import { idempotentFetch } from 'oncely/client';
 * const res = await idempotentFetch('http://localhost:3000/payments', {
 *   method: 'POST',
 *   headers: { 'content-type': 'application/json' },
 *   body: JSON.stringify({ amount: 100, currency: 'EUR' }),
 * }, { retries: 3 });
 * ```
 */
export async function idempotentFetch(
  input: string | URL | Request,
  init?: ClientRequestInit,
  options: ClientOptions & RequestOptions = {},
): Promise<OncelyResponse> {
  return operate(input, init ?? {}, settle(options));
}

interface Prepared {
  url: string;
  method: string;
  headers: Headers;
  body: PreparedBody;
  signal: AbortSignal | undefined;
  rest: RequestInit;
}

/** Takes the request apart once, so that every attempt is built the same way. */
async function prepare(input: string | URL | Request, init: ClientRequestInit): Promise<Prepared> {
  const { body, headers, signal, method, duplex: _duplex, ...rest } = init;
  if (typeof input === 'string' || input instanceof URL) {
    return {
      url: String(input),
      method: (method ?? 'GET').toUpperCase(),
      headers: new Headers(headers),
      body: await prepareBody(body),
      signal: signal ?? undefined,
      rest,
    };
  }
  // A Request (possibly from another fetch implementation): its body is read
  // once into memory so it can be replayed; pass a stream in init.body instead
  // to send it once without buffering.
  const requestBody: ClientBody =
    body !== undefined ? body : input.body === null ? null : new Uint8Array(await input.clone().arrayBuffer());
  const inherited: RequestInit = {};
  if (input.redirect !== undefined) inherited.redirect = input.redirect;
  if (input.integrity) inherited.integrity = input.integrity;
  if (input.keepalive) inherited.keepalive = input.keepalive;
  return {
    url: input.url,
    method: (method ?? input.method).toUpperCase(),
    headers: new Headers(headers ?? input.headers),
    body: await prepareBody(requestBody),
    signal: signal ?? input.signal ?? undefined,
    rest: { ...inherited, ...rest },
  };
}

type AttemptResult =
  | { ok: true; response: Response; verdict: ResponseVerdict }
  | { ok: false; error: unknown; reason: ClientFailureReason };

async function operate(
  input: string | URL | Request,
  init: ClientRequestInit,
  settings: Settings,
): Promise<OncelyResponse> {
  const startedAt = Date.now();
  const deadlineAt = earliest(
    settings.deadlineMs === undefined ? undefined : startedAt + settings.deadlineMs,
    settings.deadline?.getTime(),
  );
  const request = await prepare(input, init);
  const { signal } = request;
  signal?.throwIfAborted();

  // The caller's key wins; otherwise one key for the whole operation, made now.
  let key = request.headers.get('idempotency-key') ?? settings.key ?? undefined;
  if (key === undefined && settings.keyMethods.has(request.method)) key = settings.generateKey();
  if (key !== undefined && !request.headers.has('idempotency-key')) request.headers.set('Idempotency-Key', key);
  if (request.body.contentType !== undefined && !request.headers.has('content-type')) {
    request.headers.set('content-type', request.body.contentType);
  }

  // A request without a key is retried only if its method is idempotent by
  // nature; a stream can be sent once only.
  const retryable = request.body.kind !== 'stream' && (key !== undefined || IDEMPOTENT_METHODS.has(request.method));
  const maxAttempts = retryable ? settings.retries + 1 : 1;

  let attempt = 0;
  let previousDelay = settings.minDelayMs;
  let lastStatus: number | undefined;
  for (;;) {
    attempt++;
    const result = await attemptOnce(request, settings, deadlineAt);
    let delayMs: number;
    let reason: RetryReason;
    if (result.ok) {
      const { response, verdict } = result;
      lastStatus = response.status;
      const answer = () => new OncelyResponse(response, { key, attempts: attempt });
      if (!verdict.retry || attempt >= maxAttempts) return answer();
      if (verdict.retryAfterMs !== undefined) {
        // The server's wait is obeyed exactly; one longer than we accept means "give up".
        if (verdict.retryAfterMs > settings.maxRetryAfterMs) return answer();
        delayMs = verdict.retryAfterMs;
      } else {
        delayMs = backoffDelay(attempt, previousDelay, settings);
      }
      if (deadlineAt !== undefined && Date.now() + delayMs >= deadlineAt) return answer();
      reason = 'status';
      await discard(response);
    } else {
      const fail = (why: ClientFailureReason, detail: string) =>
        new ClientRequestError(detail, { key, attempts: attempt, reason: why, lastStatus, cause: result.error });
      if (result.reason === 'deadline') throw fail('deadline', `The deadline passed during attempt ${attempt}.`);
      if (result.reason === 'unexpected') throw fail('unexpected', `Attempt ${attempt} failed: ${describe(result.error)}`);
      if (attempt >= maxAttempts) {
        throw fail(
          result.reason,
          retryable
            ? `Gave up after ${attempt} attempts; the last failed: ${describe(result.error)}`
            : `The request failed and cannot be retried (${request.body.kind === 'stream' ? 'stream body' : `${request.method} without an Idempotency-Key`}): ${describe(result.error)}`,
        );
      }
      delayMs = backoffDelay(attempt, previousDelay, settings);
      if (deadlineAt !== undefined && Date.now() + delayMs >= deadlineAt) {
        throw fail('deadline', `Attempt ${attempt} failed and the deadline leaves no time to retry: ${describe(result.error)}`);
      }
      reason = result.reason === 'timeout' ? 'timeout' : 'network';
    }
    previousDelay = delayMs;
    if (settings.onRetry) {
      await settings.onRetry({
        key,
        attempt,
        delayMs,
        reason,
        ...(result.ok ? { status: result.response.status } : { error: result.error }),
        request: { method: request.method, url: request.url, headers: new Headers(request.headers) },
      });
    }
    await sleep(delayMs, signal);
  }
}

/**
 * One attempt, bounded by the attempt timeout, the deadline and the caller's
 * signal. The caller's abort is rethrown at once (no retry); the other
 * failures are returned for the retry loop to judge.
 */
async function attemptOnce(request: Prepared, settings: Settings, deadlineAt: number | undefined): Promise<AttemptResult> {
  const controller = new AbortController();
  let why: 'timeout' | 'deadline' | undefined;
  const timers: NodeJS.Timeout[] = [];
  const stop = (reason: 'timeout' | 'deadline', ms: number) => {
    timers.push(
      setTimeout(() => {
        why ??= reason;
        controller.abort(new DOMException(`oncely/client: the ${reason} of ${ms} ms passed`, 'TimeoutError'));
      }, ms),
    );
  };
  if (settings.attemptTimeoutMs !== undefined) stop('timeout', settings.attemptTimeoutMs);
  if (deadlineAt !== undefined) stop('deadline', Math.max(0, deadlineAt - Date.now()));
  // The caller's signal stays linked to the returned response, so that
  // aborting it also stops reading the body, as with fetch; our timers only
  // bound the wait for the answer.
  const callerSignal = request.signal;
  const signal = callerSignal ? anySignal(controller.signal, callerSignal) : controller.signal;

  const init: RequestInit & { duplex?: 'half' } = {
    ...request.rest,
    method: request.method,
    headers: new Headers(request.headers),
    // Node's fetch also takes an async iterable (with duplex: 'half', set below).
    body: request.body.make() as RequestInit['body'],
    signal,
  };
  if (request.body.kind === 'stream') init.duplex = 'half';
  let response: Response | undefined;
  try {
    response = await settings.fetch(request.url, init);
    const verdict = await judgeResponse(response);
    if (signal.aborted) throw signal.reason;
    return { ok: true, response, verdict };
  } catch (error) {
    if (response) void discard(response);
    if (callerSignal?.aborted) throw callerSignal.reason;
    if (why !== undefined) return { ok: false, error, reason: why };
    return { ok: false, error, reason: isNetworkError(error) ? 'network' : 'unexpected' };
  } finally {
    for (const timer of timers) clearTimeout(timer);
  }
}

/** `AbortSignal.any` where Node has it (20.3+, weakly linked); a listener otherwise. */
function anySignal(a: AbortSignal, b: AbortSignal): AbortSignal {
  const any = (AbortSignal as { any?: (signals: AbortSignal[]) => AbortSignal }).any;
  if (any) return any.call(AbortSignal, [a, b]);
  const controller = new AbortController();
  for (const s of [a, b]) {
    if (s.aborted) {
      controller.abort(s.reason);
      break;
    }
    s.addEventListener('abort', () => controller.abort(s.reason), { once: true });
  }
  return controller.signal;
}

/** Frees the connection of an answer that will not be returned. */
async function discard(response: Response): Promise<void> {
  try {
    await response.body?.cancel();
  } catch {
    // Nothing to free.
  }
}

/** Waits `ms`, or rejects with the abort reason as soon as `signal` aborts. */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function earliest(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return Math.min(a, b);
}

function describe(error: unknown): string {
  if (error instanceof Error) {
    const cause = error.cause instanceof Error ? ` (${error.cause.message})` : '';
    return `${error.message}${cause}`;
  }
  return String(error);
}
