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
import type { HttpResponse } from '../http/outcome.js';
import { fieldLines } from '../http/headers.js';

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

const kRun = Symbol('oncely.run');
type WithRun = FastifyRequest & { [kRun]?: HttpRun };

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

  fastify.addHook('preHandler', async function oncelyPreHandler(request: WithRun, reply) {
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
    request[kRun] = begun.run;
    request.idempotency = begun.run.context;
  });

  fastify.addHook('onSend', async function oncelyOnSend(request: WithRun, reply, payload) {
    const run = request[kRun];
    if (run === undefined) return payload;
    request[kRun] = undefined;
    const status = reply.statusCode;
    const headers = core.captureHeaders((name) => reply.getHeader(name));
    let finished: HttpFinish;
    if (payload === null || payload === undefined) {
      finished = { kind: 'response', response: { status, headers, body: '' } };
    } else if (
      (typeof payload === 'string' && Buffer.byteLength(payload) <= core.maxStoredBytes) ||
      (payload instanceof Uint8Array && payload.byteLength <= core.maxStoredBytes)
    ) {
      finished = { kind: 'response', response: { status, headers, body: payload } };
    } else {
      // A stream or an oversized body: never replayed, never re-run.
      finished = { kind: 'unstorable', status, headers };
    }
    await core.finish(run, finished);
    return payload;
  });

  fastify.addHook('onResponse', async function oncelyOnResponse(request: WithRun) {
    const run = request[kRun];
    if (run === undefined) return;
    // The reply went out without passing onSend (hijacked): nothing to store.
    request[kRun] = undefined;
    await core.fail(run, 'response not captured');
  });
}

// Apply the hooks to the instance it is registered on, as fastify-plugin does.
Object.assign(oncely, {
  [Symbol.for('skip-override')]: true,
  [Symbol.for('fastify.display-name')]: 'oncely',
});

export default oncely;
