/**
 * `Idempotency-Key` for web-standard `Request → Response` handlers: Hono,
 * Next.js route handlers, Bun, Deno, or a plain function.
 *
 * @example
 * ```ts
 * import { Hono } from 'hono';
 * import { withIdempotency } from 'oncely/fetch';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const app = new Hono();
 * app.post('/payments', (c) => c.json({ id: 'pay_1' }, 201));
 * export default {
 *   fetch: withIdempotency(app.fetch, { store: memoryStore(), scope: (req) => req.headers.get('x-account') ?? undefined }),
 * };
 * ```
 * @module
 */
import { BodyInvalidError, BodyTooLargeError, isOncelyError } from '../errors/index.js';
import {
  type HttpFinish,
  HttpIdempotency,
  type HttpIdempotencyOptions,
  type HttpRequestView,
  type IdempotencyContext,
} from '../http/core.js';
import type { HttpResponse } from '../http/outcome.js';

export type { IdempotencyContext, RouteOverrides } from '../http/core.js';
export type { OutcomeDecision } from '../http/policy.js';

/** Options of {@link withIdempotency}: see {@link HttpIdempotencyOptions}. */
export type FetchIdempotencyOptions = HttpIdempotencyOptions<Request>;

const contexts = new WeakMap<Request, IdempotencyContext>();

/** The idempotent run of a request inside a handler wrapped by {@link withIdempotency}. */
export function idempotencyOf(request: Request): IdempotencyContext | undefined {
  return contexts.get(request);
}

function toResponse(response: HttpResponse): Response {
  return new Response(response.status === 204 || response.status === 304 ? null : (response.body as BodyInit), {
    status: response.status,
    headers: response.headers,
  });
}

async function readLimited(request: Request, limit: number): Promise<Uint8Array> {
  const declared = Number(request.headers.get('content-length'));
  if (Number.isFinite(declared) && declared > limit) throw new BodyTooLargeError(limit);
  if (request.body === null) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = request.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      throw new BodyTooLargeError(limit);
    }
    chunks.push(value);
  }
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return out;
}

/**
 * A `Response`, also from another realm or a polyfill (@hono/node-server
 * swaps the global one for its own, so `instanceof` is not enough).
 */
function isResponse(value: unknown): value is Response {
  if (value instanceof Response) return true;
  if (typeof value !== 'object' || value === null) return false;
  const candidate = value as Partial<Response>;
  return typeof candidate.status === 'number' && typeof candidate.headers?.get === 'function' && 'body' in candidate;
}

function kindOf(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  if (typeof value === 'object') return `an object (${value.constructor?.name ?? 'no prototype'})`;
  return `a ${typeof value}`;
}

/**
 * Read a response body up to `limit` bytes. Beyond it, `complete` is false
 * and `rest` streams the whole body (what was read, then the remainder).
 * Rejects when the body stream fails before the end or the limit.
 */
async function readUpTo(
  response: Response,
  limit: number,
): Promise<{ body: Uint8Array; rest: ReadableStream<Uint8Array> | null; complete: boolean }> {
  if (response.body === null) return { body: new Uint8Array(0), rest: null, complete: true };
  const reader = response.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.byteLength;
    if (size > limit) {
      // Hand back what was read followed by the rest, untouched.
      const head = chunks.splice(0);
      const rest = new ReadableStream<Uint8Array>({
        start(controller) {
          for (const chunk of head) controller.enqueue(chunk);
        },
        async pull(controller) {
          const next = await reader.read();
          if (next.done) controller.close();
          else controller.enqueue(next.value);
        },
        cancel(reason) {
          return reader.cancel(reason);
        },
      });
      return { body: new Uint8Array(0), rest, complete: false };
    }
  }
  const body = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return { body, rest: null, complete: true };
}

/**
 * Wrap a fetch-style handler so that POST and PATCH (by default) are
 * idempotent by their `Idempotency-Key`. Extra arguments (Hono's `env` and
 * execution context, for example) pass through. The handler gets a fresh
 * `Request` with the same body; {@link idempotencyOf} gives its run.
 */
export function withIdempotency<A extends unknown[]>(
  handler: (request: Request, ...rest: A) => Response | Promise<Response>,
  options: FetchIdempotencyOptions,
): (request: Request, ...rest: A) => Promise<Response> {
  const core = new HttpIdempotency<Request>(options);
  return async function oncelyFetch(request: Request, ...rest: A): Promise<Response> {
    if (!core.applies(request.method)) return handler(request, ...rest);
    let bytes: Uint8Array;
    let forward: Request;
    let begun: Awaited<ReturnType<typeof core.begin>>;
    try {
      bytes = await readLimited(request, core.maxBodyBytes);
      const type = request.headers.get('content-type') ?? undefined;
      let body: HttpRequestView<Request>['body'];
      if (bytes.byteLength === 0) body = undefined;
      else if (type !== undefined && /^application\/([\w.+-]*\+)?json\b/i.test(type)) {
        try {
          body = { json: JSON.parse(new TextDecoder().decode(bytes)) };
        } catch (error) {
          throw new BodyInvalidError('The request body is not valid JSON.', { cause: error });
        }
      } else body = { raw: bytes };
      forward = new Request(request.url, {
        method: request.method,
        headers: request.headers,
        body: bytes.byteLength === 0 ? null : (bytes as BodyInit),
        signal: request.signal,
      });
      const url = new URL(request.url);
      begun = await core.begin({
        raw: request,
        method: request.method,
        path: url.pathname,
        query: url.search,
        header: (name) => {
          const value = request.headers.get(name);
          return value === null ? undefined : [value];
        },
        body,
      });
    } catch (error) {
      if (isOncelyError(error)) return toResponse(core.problem(error));
      throw error;
    }
    if (begun.kind === 'pass') return handler(forward, ...rest);
    if (begun.kind === 'respond') return toResponse(begun.response);
    const { run } = begun;
    contexts.set(forward, run.context);
    // The client left (the server aborts the request's signal) while the
    // handler runs or its body is read: stop renewing. An answer that still
    // comes is stored; one that never does lets the lease lapse.
    const gone = (): void => core.gone(run);
    const { signal } = request;
    if (signal.aborted) gone();
    else signal.addEventListener('abort', gone, { once: true });
    let response: Response;
    let headers: Array<[string, string]>;
    let read: Awaited<ReturnType<typeof readUpTo>>;
    let failed = 'handler threw';
    try {
      response = await handler(forward, ...rest);
      if (!isResponse(response)) {
        failed = 'handler answered no Response';
        throw new TypeError(`oncely/fetch: the handler answered ${kindOf(response)}, not a Response.`);
      }
      headers = core.captureHeaders((name) => response.headers.get(name));
      failed = 'response body failed';
      read = await readUpTo(response, core.maxStoredBytes);
    } catch (error) {
      // Nothing reached the client yet (the body is read before it is sent),
      // so the run is released. The error goes on to the server's error path
      // (a 500, logged and reported) as a handler's throw does: a failing
      // body is the application's failure, not an upstream's (no 502).
      await core.fail(run, failed);
      throw error;
    } finally {
      signal.removeEventListener('abort', gone);
    }
    // A body over maxStoredBytes is streamed through after this: the marker
    // is stored first, and stands if that stream fails later (an answer
    // went out).
    const finished: HttpFinish = read.complete
      ? { kind: 'response', response: { status: response.status, headers, body: read.body } }
      : { kind: 'unstorable', status: response.status, headers };
    const settled = await core.finish(run, finished);
    // Transactional mode: an answer whose writes did not commit is not sent as if they had.
    const replacement = core.replacement(run, settled, response.status);
    if (replacement !== undefined) return toResponse(replacement);
    const out = read.complete ? (response.status === 204 || response.status === 304 ? null : read.body) : read.rest;
    return new Response(out as BodyInit | null, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  };
}

export default withIdempotency;
