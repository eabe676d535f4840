/**
 * `Idempotency-Key` for AWS Lambda behind API Gateway REST APIs (payload
 * 1.0), HTTP APIs (payload 2.0) and Lambda Function URLs: a handler wrapper,
 * {@link withIdempotency}, and a Middy middleware, {@link idempotency}. Both
 * answer as the other front doors do (same core, same options), in the
 * result shape of the event they answer.
 *
 * @example
 * ```ts
 * import type { APIGatewayProxyEventV2 } from 'aws-lambda';
 * import { withIdempotency } from 'oncely/lambda';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * export const handler = withIdempotency(
 *   async (event: APIGatewayProxyEventV2) => ({ statusCode: 201, body: JSON.stringify({ id: 'pay_1' }) }),
 *   { store: memoryStore(), scope: (event) => event.headers['x-account'] },
 * );
 * ```
 * @module
 */
import { isOncelyError } from '../errors/index.js';
import { type HttpFinish, HttpIdempotency, type HttpIdempotencyOptions, type HttpRun, type IdempotencyContext, type RouteOverrides } from '../http/core.js';
import { type LambdaContextLike, type LambdaHttpEvent, type LambdaHttpResult, methodOf, readResult, type Shape, shapeOf, toResult, viewOf } from './event.js';

export type { IdempotencyContext, RouteOverrides } from '../http/core.js';
export type { OutcomeDecision } from '../http/policy.js';
export type { LambdaContextLike, LambdaHttpEvent, LambdaHttpResult } from './event.js';

/**
 * Options of {@link withIdempotency} and {@link idempotency}: see
 * {@link HttpIdempotencyOptions}. `scope` and `fingerprint` get the event,
 * so a scope usually comes from what the authorizer put in `requestContext`.
 *
 * @example
 * ```ts
 * import type { APIGatewayProxyEventV2WithJWTAuthorizer } from 'aws-lambda';
 * import type { LambdaIdempotencyOptions } from 'oncely/lambda';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const options: LambdaIdempotencyOptions<APIGatewayProxyEventV2WithJWTAuthorizer> = {
 *   store: memoryStore(),
 *   scope: (event) => event.requestContext.authorizer.jwt.claims.sub as string | undefined,
 * };
 * ```
 */
export type LambdaIdempotencyOptions<E extends LambdaHttpEvent = LambdaHttpEvent> = HttpIdempotencyOptions<E>;

/**
 * Added to the invocation's remaining time to bound a claim's lease: room
 * for a completion sent at the last moment to reach the store in time.
 */
const LEASE_MARGIN_MS = 1_000;

const contexts = new WeakMap<object, IdempotencyContext>();

/**
 * The idempotent run of an event, for a handler behind {@link withIdempotency}
 * or {@link idempotency}: its record id (a unique business key), its lease
 * signal, `decide()` to override the outcome policy, `transaction()` and `step()`.
 *
 * @example
 * ```ts
 * import type { APIGatewayProxyEventV2 } from 'aws-lambda';
 * import { idempotencyOf } from 'oncely/lambda';
 *
 * declare const psp: { charge(amount: number, options: { idempotencyKey?: string; signal?: AbortSignal }): Promise<{ id: string }> };
 *
 * export async function pay(event: APIGatewayProxyEventV2) {
 *   const run = idempotencyOf(event);
 *   const charge = await psp.charge(2500, { idempotencyKey: run?.id, signal: run?.signal });
 *   return { statusCode: 201, body: JSON.stringify(charge) };
 * }
 * ```
 */
export function idempotencyOf(event: object): IdempotencyContext | undefined {
  return contexts.get(event);
}

type Begun = { kind: 'pass' } | { kind: 'respond'; result: LambdaHttpResult } | { kind: 'run'; run: HttpRun; shape: Shape };
const PASS: Begun = { kind: 'pass' };

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * The translation both forms share: begin from an event, settle from a
 * result. The core decides everything else.
 */
class LambdaDoor<E extends LambdaHttpEvent> {
  readonly #core: HttpIdempotency<E>;
  readonly #warn: (message: string) => void;
  #warnedUnreadable = false;

  constructor(options: LambdaIdempotencyOptions<E>) {
    this.#core = new HttpIdempotency<E>(options);
    const logger = options.logger ?? console;
    this.#warn = (message) => logger.warn(message);
  }

  warn(message: string): void {
    this.#warn(message);
  }

  /**
   * Lambda stops an invocation at its deadline, and a stopped invocation
   * never renews nor releases: its claim stays in progress until its lease
   * ends, and every retry meanwhile is a 409. No handler outlives
   * `getRemainingTimeInMillis()`, so a lease longer than that (plus a margin
   * for the last completion) only keeps a dead claim; a shorter one is
   * safe, since leases are renewed while the handler runs (also where the
   * deadline is not enforced: a local harness). Hence min(configured lease,
   * remaining time + margin): a stopped invocation holds its key at most
   * that long past its deadline (its last renewal came before it).
   */
  #overrides(context: LambdaContextLike | undefined): RouteOverrides | undefined {
    const remaining = typeof context?.getRemainingTimeInMillis === 'function' ? context.getRemainingTimeInMillis() : Number.NaN;
    if (!Number.isFinite(remaining)) return undefined;
    const bound = Math.max(0, Math.floor(remaining)) + LEASE_MARGIN_MS;
    return bound < this.#core.engine.leaseMs ? { leaseMs: bound } : undefined;
  }

  async begin(event: E, context: LambdaContextLike | undefined): Promise<Begun> {
    const shape = shapeOf(event);
    // Not an HTTP event (a warm-up ping, a queue message): not ours to judge.
    if (shape === undefined) return PASS;
    const method = methodOf(event, shape);
    if (!this.#core.applies(method)) return PASS;
    try {
      const begun = await this.#core.begin(viewOf(event, shape, method, this.#core.maxBodyBytes), this.#overrides(context));
      if (begun.kind === 'pass') return PASS;
      if (begun.kind === 'respond') return { kind: 'respond', result: toResult(begun.response, shape) };
      contexts.set(event, begun.run.context);
      return { kind: 'run', run: begun.run, shape };
    } catch (error) {
      if (isOncelyError(error)) return { kind: 'respond', result: toResult(this.#core.problem(error), shape) };
      throw error;
    }
  }

  /**
   * Settle a run from the handler's result, before it is returned. Answers
   * what to return instead (transactional mode: a 503 when the writes did
   * not commit), or undefined to return the result as it is. Never throws.
   */
  async finish(run: HttpRun, shape: Shape, result: unknown): Promise<LambdaHttpResult | undefined> {
    const core = this.#core;
    const read = readResult(result, shape);
    if (read === undefined) {
      if (!this.#warnedUnreadable) {
        this.#warnedUnreadable = true;
        this.#warn('oncely/lambda: the handler answered no proxy result (an object with a numeric statusCode); API Gateway answers 502 and the claim was released.');
      }
      await core.fail(run, 'handler answered no proxy result');
      return undefined;
    }
    const headers = core.captureHeaders(read.header);
    const size = typeof read.body === 'string' ? Buffer.byteLength(read.body) : read.body.byteLength;
    // Lambda has no streamed answer here: a body over the limit goes out whole, and completes with a marker.
    const finished: HttpFinish =
      size > core.maxStoredBytes
        ? { kind: 'unstorable', status: read.status, headers }
        : { kind: 'response', response: { status: read.status, headers, body: read.body } };
    try {
      const settled = await core.finish(run, finished);
      const replacement = core.replacement(run, settled, read.status);
      return replacement === undefined ? undefined : toResult(replacement, shape);
    } catch (error) {
      // `finish` never rejects for store failures; a user's `outcome` can throw. Nothing was stored.
      this.#warn(`oncely/lambda: the result could not be settled and was answered unstored: ${messageOf(error)}`);
      await core.fail(run, 'finish failed').catch(() => undefined);
      return undefined;
    }
  }

  /** The handler threw: released (a retry runs again). */
  async fail(run: HttpRun, reason: string): Promise<void> {
    await this.#core.fail(run, reason);
  }
}

/**
 * Wrap a Lambda handler so that POST and PATCH requests (by default) from
 * API Gateway REST APIs (payload 1.0), HTTP APIs (payload 2.0) and Function
 * URLs are idempotent by their `Idempotency-Key`. The payload is told from
 * the event itself; other events (not HTTP) pass through untouched.
 *
 * A retry gets the stored answer in its event's shape (status, replayed
 * headers, body; binary bodies base64 with `isBase64Encoded`) with
 * `Idempotent-Replayed: true`; refusals are problem responses in that shape
 * too. A thrown error releases the claim and is rethrown. The lease is
 * bounded by the invocation's remaining time (plus a second), so the claim
 * of an invocation that timed out frees soon after.
 *
 * @example
 * ```ts
 * import type { APIGatewayProxyEvent } from 'aws-lambda';
 * import { withIdempotency } from 'oncely/lambda';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * export const handler = withIdempotency(
 *   async (event: APIGatewayProxyEvent) => ({ statusCode: 201, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id: 'pay_1' }) }),
 *   { store: memoryStore(), scope: (event) => event.requestContext.authorizer?.principalId as string | undefined },
 * );
 * ```
 */
export function withIdempotency<E extends LambdaHttpEvent, C extends LambdaContextLike, A extends unknown[], R>(
  handler: (event: E, context: C, ...rest: A) => R | Promise<R>,
  options: LambdaIdempotencyOptions<E>,
): (event: E, context: C, ...rest: A) => Promise<R | LambdaHttpResult> {
  const door = new LambdaDoor<E>(options);
  return async function oncelyLambda(event: E, context: C, ...rest: A): Promise<R | LambdaHttpResult> {
    const begun = await door.begin(event, context);
    if (begun.kind === 'pass') return handler(event, context, ...rest);
    if (begun.kind === 'respond') return begun.result;
    let result: R;
    try {
      result = await handler(event, context, ...rest);
    } catch (error) {
      await door.fail(begun.run, 'handler threw');
      throw error;
    }
    return (await door.finish(begun.run, begun.shape, result)) ?? result;
  };
}

/**
 * The Middy request as {@link idempotency} reads it (Middy's own `Request`
 * fits it).
 *
 * @example
 * ```ts
 * const request: MiddyRequestLike = { event: {}, context: {}, response: undefined, error: undefined };
 * ```
 */
export interface MiddyRequestLike<E = unknown, C = unknown> {
  event: E;
  context: C;
  response: unknown;
  error: unknown;
}

/**
 * The Middy middleware {@link idempotency} returns: give it to `.use()`.
 *
 * @example
 * ```ts
 * import middy from '@middy/core';
 * import { idempotency, type IdempotencyMiddleware } from 'oncely/lambda';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const once: IdempotencyMiddleware = idempotency({ store: memoryStore(), scope: false });
 * export const handler = middy().use(once).handler(async () => ({ statusCode: 204, body: '' }));
 * ```
 */
export interface IdempotencyMiddleware<E extends LambdaHttpEvent = LambdaHttpEvent> {
  readonly name: string;
  /** Begins: answers a replay or a refusal at once (Middy's early return), or claims the key. */
  before(request: MiddyRequestLike<E, LambdaContextLike>): Promise<LambdaHttpResult | undefined>;
  /** Settles from `request.response` before it is returned. */
  after(request: MiddyRequestLike<E, LambdaContextLike>): Promise<void>;
  /** Releases on a thrown error (or settles from the answer an error handler before it made). */
  onError(request: MiddyRequestLike<E, LambdaContextLike>): Promise<void>;
}

/**
 * Let a run learn that a middleware `.use()`d after oncely answered early
 * (Middy sets `request.earlyResponse` and skips the handler and every
 * `after`, oncely's included). An inherited setter sees the assignment
 * without making the property own before it happens (Middy tests `hasOwn`).
 * The settlement then cannot be awaited: Middy returns at once.
 */
function watchEarlyResponse(request: object, answered: (response: unknown) => void): void {
  try {
    const trap = Object.create(Object.getPrototypeOf(request) as object | null, {
      earlyResponse: {
        configurable: true,
        get: () => undefined,
        set(this: object, value: unknown) {
          Object.defineProperty(this, 'earlyResponse', { value, writable: true, enumerable: true, configurable: true });
          answered(value);
        },
      },
    }) as object;
    Object.setPrototypeOf(request, trap);
  } catch {
    // A frozen or exotic request: the lease bounds the claim instead.
  }
}

/**
 * A Middy middleware (`@middy/core` 6) making POST and PATCH requests (by
 * default) idempotent by their `Idempotency-Key`, for the same events as
 * {@link withIdempotency} and with the same answers.
 *
 * `.use()` it last, after body parsers and whatever establishes the scope:
 * Middy runs `before` hooks in order and `after`/`onError` hooks in reverse,
 * so oncely's `before` runs right before the handler and its `after` and
 * `onError` see the handler's own result or error first. A replay or a
 * refusal returns early (Middy skips the handler and every `after` hook),
 * so it carries only what was stored (list CORS headers in `replayHeaders`).
 *
 * @example
 * ```ts
 * import middy from '@middy/core';
 * import type { APIGatewayProxyEventV2WithJWTAuthorizer } from 'aws-lambda';
 * import { idempotency } from 'oncely/lambda';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * type Event = APIGatewayProxyEventV2WithJWTAuthorizer;
 * export const handler = middy<Event>()
 *   .use(idempotency<Event>({ store: memoryStore(), scope: (event) => event.requestContext.authorizer.jwt.claims.sub as string | undefined }))
 *   .handler(async () => ({ statusCode: 201, body: JSON.stringify({ id: 'pay_1' }) }));
 * ```
 */
export function idempotency<E extends LambdaHttpEvent = LambdaHttpEvent>(options: LambdaIdempotencyOptions<E>): IdempotencyMiddleware<E> {
  const door = new LambdaDoor<E>(options);
  // Keyed by Middy's request: one per invocation, and invocations may overlap (tests, local servers).
  const runs = new WeakMap<object, { run: HttpRun; shape: Shape }>();
  let warnedEarly = false;
  return {
    name: 'oncely',
    async before(request) {
      const begun = await door.begin(request.event, request.context);
      if (begun.kind === 'pass') return undefined;
      if (begun.kind === 'respond') {
        request.response = begun.result;
        return begun.result;
      }
      const running = { run: begun.run, shape: begun.shape };
      runs.set(request, running);
      watchEarlyResponse(request, (response) => {
        if (runs.get(request) !== running) return;
        runs.delete(request);
        if (!warnedEarly) {
          warnedEarly = true;
          door.warn('oncely/lambda: a middleware used after idempotency() answered early, so its after hook never ran: .use(idempotency(...)) last.');
        }
        void door.finish(running.run, running.shape, response);
      });
      return undefined;
    },
    async after(request) {
      const running = runs.get(request);
      if (running === undefined) return;
      runs.delete(request);
      const replacement = await door.finish(running.run, running.shape, request.response);
      if (replacement !== undefined) request.response = replacement;
    },
    async onError(request) {
      const running = runs.get(request);
      if (running === undefined) return;
      runs.delete(request);
      // An error handler used after oncely already turned the error into an answer: the policy judges it.
      if (request.response !== undefined && request.response !== null) {
        const replacement = await door.finish(running.run, running.shape, request.response);
        if (replacement !== undefined) request.response = replacement;
        return;
      }
      await door.fail(running.run, 'handler threw');
    },
  };
}

export default withIdempotency;
