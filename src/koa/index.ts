/**
 * `Idempotency-Key` middleware for Koa 2 and 3.
 *
 * @example
 * ```ts
 * import Koa from 'koa';
 * import { idempotency } from 'oncely/koa';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const app = new Koa();
 * app.use(idempotency({ store: memoryStore(), scope: (ctx) => ctx.get('x-account') || undefined }));
 * app.use((ctx) => {
 *   ctx.status = 201;
 *   ctx.body = { id: 'pay_1' };
 * });
 * ```
 * @module
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Context, Middleware, Next } from 'koa';
import { checkDuration } from '../engine/engine.js';
import { BodyInvalidError, BodyTooLargeError, ConfigError, isOncelyError } from '../errors/index.js';
import {
  type HttpFinish,
  HttpIdempotency,
  type HttpIdempotencyOptions,
  type HttpRequestView,
  type HttpRun,
  type IdempotencyContext,
  type RouteOverrides,
} from '../http/core.js';
import { fieldLines } from '../http/headers.js';
import type { HttpResponse } from '../http/outcome.js';

export type { IdempotencyContext, RouteOverrides } from '../http/core.js';
export type { OutcomeDecision } from '../http/policy.js';

declare module 'koa' {
  interface DefaultState {
    /** The idempotent run of this request, when there is one (oncely). */
    idempotency?: IdempotencyContext;
  }
}

/** Options of {@link idempotency}: see {@link HttpIdempotencyOptions}. `scope` and `fingerprint` get the Koa context. */
export type KoaIdempotencyOptions = HttpIdempotencyOptions<Context>;

/**
 * The middleware {@link idempotency} returns. `with(settings)` gives a
 * middleware for one route with its own lease, TTL or wait, sharing the
 * same engine and options.
 */
export interface KoaIdempotency extends Middleware {
  /**
   * A middleware for some routes, with their own settings (checked now).
   *
   * @example
   * ```ts
   * const oncely = idempotency({ store, scope: (ctx) => ctx.state.user?.accountId });
   * router.post('/payments', oncely.with({ ttlMs: 3_600_000 }), createPayment);
   * ```
   */
  with(settings: RouteOverrides): Middleware;
}

type Body = HttpRequestView<Context>['body'];
type Warn = (message: string) => void;

const contexts = new WeakMap<object, IdempotencyContext>();
// Requests an oncely middleware already took: a second one on the same
// request (a global mount and a route's) passes it through, or the request
// would run under two claims.
const taken = new WeakSet<object>();

/**
 * The idempotent run of a request, for a handler behind {@link idempotency}:
 * the same as `ctx.state.idempotency`, typed whatever the router's state type.
 *
 * @example
 * ```ts
 * router.post('/payments', async (ctx) => {
 *   const run = idempotencyOf(ctx);
 *   ctx.body = await psp.charge(ctx.request.body, { idempotencyKey: run?.id, signal: run?.signal });
 * });
 * ```
 */
export function idempotencyOf(ctx: object): IdempotencyContext | undefined {
  return contexts.get(ctx);
}

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

function isJson(type: string | undefined): boolean {
  return type !== undefined && /^application\/([\w.+-]*\+)?json\b/i.test(type);
}

/** The body a parser left in `ctx.request.body`, for the fingerprint. */
function parsedBody(body: unknown): Body {
  if (body === undefined || body === null) return undefined;
  if (typeof body === 'string' || body instanceof Uint8Array) return { raw: body };
  return { json: body };
}

/**
 * No body parser ran (Koa has none built in): read the body within `limit`
 * bytes and leave it parsed in `ctx.request.body` (JSON, URL-encoded, else a
 * Buffer), where @koa/bodyparser mounted later finds it and stops.
 */
async function readBody(ctx: Context, limit: number): Promise<Body> {
  const req = ctx.req;
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > limit) throw new BodyTooLargeError(limit);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new BodyTooLargeError(limit);
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks);
  const type = req.headers['content-type'];
  const request = ctx.request as { body?: unknown; rawBody?: string };
  if (isJson(type)) {
    let parsed: unknown;
    try {
      parsed = raw.length === 0 ? undefined : JSON.parse(raw.toString('utf8'));
    } catch (error) {
      throw new BodyInvalidError('The request body is not valid JSON.', { cause: error });
    }
    request.body = parsed ?? {};
    request.rawBody = raw.toString('utf8');
    return parsed === undefined ? undefined : { json: parsed };
  }
  if (type !== undefined && /^application\/x-www-form-urlencoded\b/i.test(type)) {
    request.rawBody = raw.toString('utf8');
    request.body = Object.fromEntries(new URLSearchParams(request.rawBody));
  } else {
    request.body = raw;
  }
  return { raw };
}

async function bodyOf(ctx: Context, limit: number): Promise<Body> {
  const parsed = (ctx.request as { body?: unknown }).body;
  // A body parser before oncely consumed the stream and left its parse.
  if (parsed !== undefined) return parsedBody(parsed);
  const req = ctx.req;
  if (req.readableDidRead || req.readableEnded || !hasBody(req)) return undefined;
  return readBody(ctx, limit);
}

/** Answer from oncely (a replay or a problem) through Koa, without running what follows. */
function respond(ctx: Context, response: HttpResponse): void {
  for (const [name, value] of response.headers) ctx.set(name, value);
  const typed = response.headers.some(([name]) => name === 'content-type');
  const body = typeof response.body === 'string' ? Buffer.from(response.body) : Buffer.from(response.body);
  ctx.body = body;
  ctx.status = response.status;
  // Koa would call an untyped Buffer application/octet-stream: replay none, as stored.
  if (!typed) ctx.remove('Content-Type');
}

/** A body Koa streams rather than sends whole (Koa 3 also streams web bodies). */
function isStream(body: unknown): boolean {
  if (body === null || typeof body !== 'object') return false;
  if (typeof (body as { pipe?: unknown }).pipe === 'function') return true;
  return (
    (typeof ReadableStream !== 'undefined' && body instanceof ReadableStream) ||
    (typeof Blob !== 'undefined' && body instanceof Blob) ||
    (typeof Response !== 'undefined' && body instanceof Response)
  );
}

// Statuses whose response has no body (Koa's `statuses.empty`).
const EMPTY = new Set([204, 205, 304]);

/**
 * What Koa's `respond()` will write for a body it sends whole, computed the
 * way Koa does: a string or Buffer as it is, an object as `JSON.stringify`,
 * no body as the status message in text/plain. Throws where Koa would (a
 * `BigInt` in a JSON body).
 */
function wholeBody(ctx: Context, headers: Array<[string, string]>): { body: string | Uint8Array; headers: Array<[string, string]> } {
  const body: unknown = ctx.body;
  if (EMPTY.has(ctx.status) || ctx.method === 'HEAD') return { body: '', headers };
  if (body === null || body === undefined) {
    if ((ctx.response as { _explicitNullBody?: boolean })._explicitNullBody) {
      return { body: '', headers: headers.filter(([name]) => name !== 'content-type') };
    }
    const text = ctx.req.httpVersionMajor >= 2 ? String(ctx.status) : ctx.message || String(ctx.status);
    return { body: text, headers: [...headers.filter(([name]) => name !== 'content-type'), ['content-type', 'text/plain; charset=utf-8']] };
  }
  if (typeof body === 'string' || body instanceof Uint8Array) return { body, headers };
  return { body: JSON.stringify(body) ?? '', headers };
}

/**
 * Settle a run whose answer goes out around Koa's whole-body path: a stream
 * body, or `ctx.respond = false` with the handler writing to `ctx.res`. It
 * settles when its status and headers go out (the first byte; a marker, or
 * released by the outcome policy for that status), as in oncely/fastify.
 * Before that: a stream that fails releases the run (nothing reached the
 * client); a client that leaves a stream still gets the marker (the handler
 * finished its work); a client that leaves a hijacked response is gone (the
 * handler may still be writing).
 */
function settleAtHead(ctx: Context, core: HttpIdempotency<Context>, run: HttpRun, stream: unknown): void {
  const res = ctx.res as ServerResponse;
  const headersOf = (): Array<[string, string]> => core.captureHeaders((name) => res.getHeader(name));
  if (res.headersSent) {
    void core.finish(run, { kind: 'unstorable', status: res.statusCode, headers: headersOf() });
    return;
  }
  const { writeHead } = res;
  const onerror = ctx.onerror;
  let waiting = true;
  const settled = (): void => {
    waiting = false;
    res.writeHead = writeHead;
    res.removeListener('close', onClose);
    if (ctx.onerror === wrappedOnerror) ctx.onerror = onerror;
    if (source !== undefined) source.removeListener('error', onStreamError);
  };
  res.writeHead = function oncelyWriteHead(this: ServerResponse, ...args: unknown[]) {
    // The head is given here, or set before with setHeader: copy what is given so the marker sees Location.
    const given = typeof args[1] === 'string' ? args[2] : args[1];
    if (given && typeof given === 'object' && !Array.isArray(given)) {
      for (const [name, value] of Object.entries(given)) if (value !== undefined) this.setHeader(name, value as string);
    }
    const status = typeof args[0] === 'number' ? args[0] : this.statusCode;
    this.statusCode = status;
    if (waiting) {
      settled();
      void core.finish(run, { kind: 'unstorable', status, headers: headersOf() });
    }
    return (writeHead as (...a: unknown[]) => ServerResponse).apply(this, args);
  } as ServerResponse['writeHead'];
  const failed = (): void => {
    if (!waiting) return;
    settled();
    void core.fail(run, 'stream failed before its first byte');
  };
  const onStreamError = (): void => failed();
  // A Node stream tells its failure itself; Koa 3 turns a web body into a
  // stream of its own inside respond(), whose failure reaches only ctx.onerror.
  const source = typeof (stream as { pipe?: unknown } | undefined)?.pipe === 'function' ? (stream as NodeJS.ReadableStream) : undefined;
  // Koa calls it with null once the response finishes: only an error counts.
  const wrappedOnerror = function oncelyOnerror(this: Context, error: Error) {
    if (error) failed();
    return onerror.call(this, error);
  };
  if (source !== undefined) source.once('error', onStreamError);
  else if (stream !== undefined) ctx.onerror = wrappedOnerror;
  function onClose(): void {
    if (!waiting) return;
    settled();
    if (stream === undefined) core.gone(run);
    else void core.finish(run, { kind: 'unstorable', status: ctx.status, headers: headersOf() });
  }
  res.once('close', onClose);
}

/** Settle a run once its handler is done and before Koa sends the answer. */
async function settle(ctx: Context, core: HttpIdempotency<Context>, run: HttpRun, warn: Warn): Promise<void> {
  if (ctx.respond === false) return settleAtHead(ctx, core, run, undefined);
  if (isStream(ctx.body)) return settleAtHead(ctx, core, run, ctx.body);
  const status = ctx.status;
  let whole: ReturnType<typeof wholeBody>;
  try {
    whole = wholeBody(ctx, core.captureHeaders((name) => ctx.response.get(name) || undefined));
  } catch {
    // Koa's respond() fails on this body the same way and answers 500.
    await core.fail(run, 'response body not serialisable');
    return;
  }
  const size = typeof whole.body === 'string' ? Buffer.byteLength(whole.body) : whole.body.byteLength;
  const finished: HttpFinish =
    size <= core.maxStoredBytes
      ? { kind: 'response', response: { status, headers: whole.headers, body: whole.body } }
      : { kind: 'unstorable', status, headers: whole.headers };
  try {
    await core.finish(run, finished);
  } catch (error) {
    // A user's `outcome` function threw: nothing was stored; the answer still goes out.
    warn(`oncely: the response could not be settled and was sent unstored: ${error instanceof Error ? error.message : String(error)}`);
    await core.fail(run, 'finish failed').catch(() => undefined);
  }
}

const ROUTE_SETTINGS = new Set(['ttlMs', 'leaseMs', 'wait']);

function checkSettings(settings: unknown): RouteOverrides {
  if (typeof settings !== 'object' || settings === null || Array.isArray(settings)) {
    throw new ConfigError(`idempotency().with() takes { ttlMs?, leaseMs?, wait? }; got ${String(settings)}.`);
  }
  const unknown = Object.keys(settings).filter((key) => !ROUTE_SETTINGS.has(key));
  if (unknown.length > 0) {
    throw new ConfigError(`idempotency().with() has unknown settings ${unknown.map((k) => `\`${k}\``).join(', ')}; known: ttlMs, leaseMs, wait.`);
  }
  const { ttlMs, leaseMs, wait } = settings as RouteOverrides;
  checkDuration('idempotency().with(): ttlMs', ttlMs);
  checkDuration('idempotency().with(): leaseMs', leaseMs);
  if (wait !== undefined && wait !== false) {
    if (typeof wait !== 'object' || wait === null) throw new ConfigError('idempotency().with(): wait must be false or { timeoutMs, pollMs? }.');
    checkDuration('idempotency().with(): wait.timeoutMs', wait.timeoutMs);
    checkDuration('idempotency().with(): wait.pollMs', wait.pollMs);
  }
  return settings as RouteOverrides;
}

/**
 * Make POST and PATCH requests (by default) idempotent by their
 * `Idempotency-Key`. Mount it after authentication (the scope usually comes
 * from it) and before the routes it protects, globally with `app.use` or on
 * some routes only (`router.post(path, oncely, handler)`, or
 * `oncely.with(settings)` for a route's own TTL, lease or wait). Mount
 * middleware that rewrites response bodies after it, so that what is stored
 * is what is sent.
 *
 * A body parser (such as @koa/bodyparser) may run before it: its
 * `ctx.request.body` is fingerprinted. When none has, oncely reads the body
 * itself within `maxBodyBytes` and leaves it parsed in `ctx.request.body`.
 *
 * The answer is settled after `next()` and before Koa sends it: stored (or
 * released, per the outcome policy) from `ctx.status`, the response headers
 * and `ctx.body` as Koa will send them. A stream body settles at its first
 * byte with a marker. A throw from downstream releases the run and is
 * rethrown to your error handling. A client that hangs up while the handler
 * runs stops the lease renewals: an answer that still comes is stored;
 * otherwise the lease ends and a retry runs again. The handler sees its run
 * as `ctx.state.idempotency` or {@link idempotencyOf}.
 *
 * @throws {@link ConfigError} for invalid options.
 * @example
 * ```ts
 * app.use(idempotency({ store: redisStore({ client: redis }), scope: (ctx) => ctx.state.user?.accountId }));
 * ```
 */
export function idempotency(options: KoaIdempotencyOptions): KoaIdempotency {
  const core = new HttpIdempotency<Context>(options);
  const logger = options.logger ?? console;
  const warn: Warn = (message) => logger.warn(message);
  const middleware = (overrides: RouteOverrides): Middleware =>
    async function oncelyKoa(ctx: Context, next: Next): Promise<void> {
      if (!core.applies(ctx.method) || taken.has(ctx)) return next();
      taken.add(ctx);
      let run: HttpRun;
      try {
        const body = await bodyOf(ctx, core.maxBodyBytes);
        const url = ctx.originalUrl ?? ctx.url;
        const q = url.indexOf('?');
        const begun = await core.begin(
          {
            raw: ctx,
            method: ctx.method,
            path: q < 0 ? url : url.slice(0, q),
            query: q < 0 ? '' : url.slice(q + 1),
            header: (name) => fieldLines(ctx.req.headers[name]),
            body,
          },
          overrides,
        );
        if (begun.kind === 'pass') return next();
        if (begun.kind === 'respond') return respond(ctx, begun.response);
        run = begun.run;
      } catch (error) {
        if (isOncelyError(error)) {
          if (error instanceof BodyTooLargeError) ctx.set('Connection', 'close');
          return respond(ctx, core.problem(error));
        }
        throw error;
      }
      ctx.state.idempotency = run.context;
      contexts.set(ctx, run.context);
      const res = ctx.res;
      // The client hangs up while the handler runs: an answer that still
      // comes counts; if none comes the lease lapses and a retry runs.
      const gone = (): void => core.gone(run);
      if (res.destroyed) gone();
      else res.once('close', gone);
      try {
        await next();
      } catch (error) {
        res.removeListener('close', gone);
        await core.fail(run, 'handler threw');
        throw error;
      }
      res.removeListener('close', gone);
      await settle(ctx, core, run, warn);
    };
  return Object.assign(middleware({}), { with: (settings: RouteOverrides) => middleware(checkSettings(settings)) });
}

export default idempotency;
