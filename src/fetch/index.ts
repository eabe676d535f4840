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

/** Read a response body up to `limit` bytes; `undefined` when it is larger. */
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
    let response: Response;
    try {
      response = await handler(forward, ...rest);
    } catch (error) {
      await core.fail(run, 'handler threw');
      throw error;
    }
    const headers = core.captureHeaders((name) => response.headers.get(name));
    const read = await readUpTo(response, core.maxStoredBytes);
    const finished: HttpFinish = read.complete
      ? { kind: 'response', response: { status: response.status, headers, body: read.body } }
      : { kind: 'unstorable', status: response.status, headers };
    await core.finish(run, finished);
    const out = read.complete ? (response.status === 204 || response.status === 304 ? null : read.body) : read.rest;
    return new Response(out as BodyInit | null, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  };
}

export default withIdempotency;
