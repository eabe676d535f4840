/**
 * `Idempotency-Key` for Fastify 5, as a plugin.
 *
 * @example
 * ```ts
 * import Fastify from 'fastify';
 * import { oncely } from 'oncely/fastify';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const app = Fastify();
 * await app.register(oncely, { store: memoryStore(), scope: (req) => req.headers['x-account'] as string });
 * app.post('/payments', async (req, reply) => reply.code(201).send({ id: 'pay_1' }));
 * ```
 * @module
 */
import type { OutgoingHttpHeaders, ServerResponse } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { checkDuration } from '../engine/engine.js';
import { ConfigError } from '../errors/index.js';
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

/** Options of the Fastify plugin: see {@link HttpIdempotencyOptions}. */
export type FastifyIdempotencyOptions = HttpIdempotencyOptions<FastifyRequest>;

declare module 'fastify' {
  interface FastifyRequest {
    /** The idempotent run of this request, when there is one (oncely). */
    idempotency?: IdempotencyContext;
  }
  interface FastifyContextConfig {
    /** `false` turns oncely off for this route; an object changes its settings (oncely). */
    idempotency?: false | RouteOverrides;
  }
}

/*
 * When a run settles. Fastify sends most answers through onSend whole, but
 * not all of them, so the raw response is watched too (its `writeHead` and
 * its `close`):
 *
 * - A payload that passes onSend whole (a string, a Buffer, nothing) is
 *   stored there, before it is sent (or released, per the outcome policy).
 * - A stream payload (a Node or web stream, a `Response`) settles when its
 *   first byte goes out (`writeHead`): a marker, since from then the client
 *   holds part of an answer and a retry must not run again. A stream that
 *   fails before that byte makes Fastify send its error answer through onSend
 *   a second time: nothing reached the client, so the run is released. A
 *   stream the client leaves before its first byte still completes with the
 *   marker: the handler had finished its work.
 * - A hijacked reply, or anything written to `reply.raw` around Fastify,
 *   never passes onSend: it settles when its status and headers go out
 *   (`writeHead`), with the marker (or released, per the policy for its
 *   status). If its connection closes before anything was written, the run
 *   is gone: the lease lapses unless the handler still settles it.
 * - The connection closes while the handler runs: gone, likewise. (Fastify's
 *   `onRequestAbort` does not fire once the request body was read, so the
 *   raw `close` is watched instead.)
 */

/** Where a run is as its answer goes out. */
type Phase = 'handling' | 'streaming' | 'settled';

/** One run's state, kept on its raw response (shared listeners, no closures per request). */
interface Tracker {
  readonly core: HttpIdempotency<FastifyRequest>;
  readonly run: HttpRun;
  readonly reply: FastifyReply;
  readonly writeHead: ServerResponse['writeHead'];
  phase: Phase;
}

const kTracker = Symbol('oncely.tracker');
type Tracked = ServerResponse & { [kTracker]?: Tracker };

function bodyOf(request: FastifyRequest): HttpRequestView<FastifyRequest>['body'] {
  const body = request.body;
  if (body === undefined || body === null) return undefined;
  if (typeof body === 'string' || body instanceof Uint8Array) return { raw: body };
  return { json: body };
}

function send(reply: FastifyReply, response: HttpResponse): FastifyReply {
  reply.code(response.status);
  for (const [name, value] of response.headers) reply.header(name, value);
  return reply.send(typeof response.body === 'string' ? response.body : Buffer.from(response.body));
}

/** A header given to `writeHead` itself (an object, or a flat or nested array), which `getHeader` may not see. */
function headerIn(given: unknown, name: string): string | undefined {
  if (Array.isArray(given)) {
    if (Array.isArray(given[0])) {
      for (const pair of given as unknown[][]) if (String(pair[0]).toLowerCase() === name) return String(pair[1]);
    } else {
      for (let i = 0; i + 1 < given.length; i += 2) if (String(given[i]).toLowerCase() === name) return String(given[i + 1]);
    }
    return undefined;
  }
  if (given === null || typeof given !== 'object') return undefined;
  for (const key in given) {
    if (key.toLowerCase() === name) {
      const value = (given as OutgoingHttpHeaders)[key];
      return value === undefined ? undefined : Array.isArray(value) ? value.join(', ') : String(value);
    }
  }
  return undefined;
}

// Installed as the raw response's `writeHead` for every run: the status and
// headers are final here and about to reach the client.
function trackedWriteHead(this: Tracked, ...args: unknown[]): ServerResponse {
  const tracker = this[kTracker]!;
  const result = (tracker.writeHead as (...a: unknown[]) => ServerResponse).apply(this, args);
  if (tracker.phase !== 'settled') {
    // Not settled in onSend: a stream's first byte, or a hijacked reply.
    tracker.phase = 'settled';
    const given = typeof args[1] === 'string' ? args[2] : args[1];
    const headers = tracker.core.captureHeaders((name) => this.getHeader(name) ?? headerIn(given, name));
    void tracker.core.finish(tracker.run, { kind: 'unstorable', status: this.statusCode, headers });
  }
  return result;
}

function trackedClose(this: Tracked): void {
  const tracker = this[kTracker];
  if (tracker === undefined || tracker.phase === 'settled') return;
  if (this.headersSent || tracker.phase === 'streaming') {
    // Written around our writeHead, or a stream the client left before its
    // first byte: the handler is done and its answer (partly) went out.
    tracker.phase = 'settled';
    const { core, reply } = tracker;
    const headers = core.captureHeaders((name) => reply.getHeader(name));
    void core.finish(tracker.run, { kind: 'unstorable', status: reply.statusCode, headers });
    return;
  }
  tracker.core.gone(tracker.run);
}

function track(core: HttpIdempotency<FastifyRequest>, run: HttpRun, reply: FastifyReply): void {
  const res = reply.raw as Tracked;
  res[kTracker] = { core, run, reply, writeHead: res.writeHead, phase: 'handling' };
  res.writeHead = trackedWriteHead as ServerResponse['writeHead'];
  // The client may have left while the claim was being taken.
  if (res.destroyed) core.gone(run);
  else res.on('close', trackedClose);
}

const ROUTE_SETTINGS = new Set(['ttlMs', 'leaseMs', 'wait']);

/** Check a route's `config.idempotency` when the route is added, not at its first request. */
function checkRouteSettings(setting: unknown, where: string): void {
  if (setting === undefined || setting === false) return;
  const name = `config.idempotency of ${where}`;
  if (typeof setting !== 'object' || setting === null || Array.isArray(setting)) {
    throw new ConfigError(`${name} must be false or { ttlMs?, leaseMs?, wait? }; got ${String(setting)}.`);
  }
  const unknown = Object.keys(setting).filter((key) => !ROUTE_SETTINGS.has(key));
  if (unknown.length > 0) {
    throw new ConfigError(`${name} has unknown settings ${unknown.map((k) => `\`${k}\``).join(', ')}; known: ttlMs, leaseMs, wait.`);
  }
  const { ttlMs, leaseMs, wait } = setting as RouteOverrides;
  checkDuration(`${name}: ttlMs`, ttlMs);
  checkDuration(`${name}: leaseMs`, leaseMs);
  if (wait === undefined || wait === false) return;
  if (typeof wait !== 'object' || wait === null) throw new ConfigError(`${name}: wait must be false or { timeoutMs, pollMs? }.`);
  checkDuration(`${name}: wait.timeoutMs`, wait.timeoutMs);
  checkDuration(`${name}: wait.pollMs`, wait.pollMs);
}

/**
 * The Fastify plugin. Register it once (it applies to every route of the
 * instance it is registered on, like a `fastify-plugin`); turn it off per
 * route with `config: { idempotency: false }`, or change the lease, TTL or
 * wait per route with `config: { idempotency: { ttlMs } }` (checked when the
 * route is added). Handlers see their run as `request.idempotency`.
 *
 * @throws {@link ConfigError} for invalid options, a second registration on
 * the same instance, or (when a route is added) invalid route settings.
 */
export async function oncely(fastify: FastifyInstance, options: FastifyIdempotencyOptions): Promise<void> {
  if (fastify.hasRequestDecorator('idempotency')) {
    // Twice would run every request under two claims, of which one never settles.
    throw new ConfigError(
      'oncely is already registered on this Fastify instance (or a parent): register it once; change settings per route with `config: { idempotency }`.',
    );
  }
  const core = new HttpIdempotency<FastifyRequest>(options);

  fastify.decorateRequest('idempotency', undefined);

  fastify.addHook('onRoute', function oncelyOnRoute(route) {
    checkRouteSettings(route.config?.idempotency, `${String(route.method)} ${route.url}`);
  });

  fastify.addHook('preHandler', async function oncelyPreHandler(request, reply) {
    if (!core.applies(request.method)) return;
    const route = request.routeOptions.config?.idempotency;
    if (route === false) return;
    const url = request.url;
    const q = url.indexOf('?');
    const begun = await core.begin(
      {
        raw: request,
        method: request.method,
        path: q < 0 ? url : url.slice(0, q),
        query: q < 0 ? '' : url.slice(q + 1),
        header: (name) => fieldLines(request.headers[name]),
        body: bodyOf(request),
      },
      route ?? {},
    );
    if (begun.kind === 'pass') return;
    if (begun.kind === 'respond') return send(reply, begun.response);
    track(core, begun.run, reply);
    request.idempotency = begun.run.context;
  });

  fastify.addHook('onSend', async function oncelyOnSend(_request, reply, payload) {
    const tracker = (reply.raw as Tracked)[kTracker];
    if (tracker === undefined || tracker.phase === 'settled') return payload;
    const { run } = tracker;
    if (tracker.phase === 'streaming') {
      // A second payload after a stream: Fastify's error answer for a stream
      // that failed before its first byte. Nothing of it reached the client.
      tracker.phase = 'settled';
      await core.fail(run, 'stream failed before its first byte');
      return payload;
    }
    const whole = payload === null || payload === undefined || typeof payload === 'string' || payload instanceof Uint8Array;
    if (!whole && !reply.raw.destroyed) {
      // A stream: it settles at its first byte (see above), when its status is final.
      tracker.phase = 'streaming';
      return payload;
    }
    tracker.phase = 'settled';
    const status = reply.statusCode;
    const headers = core.captureHeaders((name) => reply.getHeader(name));
    let finished: HttpFinish;
    if (!whole) {
      // A stream for a client that already left: the handler is done.
      finished = { kind: 'unstorable', status, headers };
    } else {
      const body = payload ?? '';
      const size = typeof body === 'string' ? Buffer.byteLength(body) : body.byteLength;
      finished = size <= core.maxStoredBytes ? { kind: 'response', response: { status, headers, body } } : { kind: 'unstorable', status, headers };
    }
    const settled = await core.finish(run, finished);
    // Transactional mode: an answer whose writes did not commit is not sent as if they had.
    const replacement = core.replacement(run, settled, status);
    if (replacement === undefined) return payload;
    reply.removeHeader('location');
    reply.code(replacement.status);
    for (const [name, value] of replacement.headers) reply.header(name, value);
    return replacement.body;
  });
}

// Apply the hooks to the instance it is registered on, as fastify-plugin does.
Object.assign(oncely, {
  [Symbol.for('skip-override')]: true,
  [Symbol.for('fastify.display-name')]: 'oncely',
});

export default oncely;
