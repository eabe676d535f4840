/**
 * The reference system's OpenAPI 3.1 document, made from the JSON schemas
 * its routes already declare to Fastify (body, params, querystring,
 * headers), and served at `GET /openapi.json` (behind the bearer token, like
 * every route but `/healthz`). No extra framework dependency: an `onRoute`
 * hook collects each route as it is registered. `oncely verify --openapi`
 * reads it (docs/cli.md).
 *
 * Nothing in the document says which operations are idempotent: that is for
 * `verify` to find out from the outside.
 *
 * @example
 * ```ts
 * import { startReference } from './app.js';
 * const ref = await startReference({ storeUrl: 'memory:', dataDir: '/tmp/ref', port: 0 });
 * const doc = await (await fetch(`${ref.url}/openapi.json`, { headers: { authorization: 'Bearer acct_1' } })).json();
 * console.log(Object.keys(doc.paths)); // ['/healthz', '/payments', '/payments/{id}', …]
 * ```
 * @module
 */
import type { FastifyInstance, RouteOptions } from 'fastify';

declare module './app.js' {
  interface ReferenceOptions {
    /**
     * More routes, registered after the others (they appear in the OpenAPI
     * document too). For tests, e.g. a route with `config: { idempotency:
     * false }` to show `oncely verify --openapi` an unprotected operation.
     */
    extraRoutes?: (app: FastifyInstance) => void | Promise<void>;
  }
}

/**
 * One route as the document is made from it.
 *
 * @example
 * ```ts
 * const route: ReferenceRoute = { method: 'GET', url: '/payments/:id', schema: { params: { type: 'object' } } };
 * ```
 */
export interface ReferenceRoute {
  method: string;
  /** Fastify's URL, e.g. `/payments/:id`. */
  url: string;
  schema?: {
    body?: unknown;
    params?: unknown;
    querystring?: unknown;
    headers?: unknown;
    summary?: string;
    description?: string;
  };
}

/**
 * Where the document is served.
 *
 * @example
 * ```ts
 * const doc = await fetch(`${ref.url}${OPENAPI_PATH}`, { headers: { authorization: 'Bearer acct_1' } });
 * ```
 */
export const OPENAPI_PATH = '/openapi.json';

/** Routes answered without a bearer token (see the `onRequest` hook in app.ts). */
const PUBLIC_PATHS = new Set(['/healthz']);

interface ObjectSchema {
  properties?: Record<string, unknown>;
  required?: readonly string[];
}

/** A JSON copy: the document must not share (or expose) the objects Fastify compiled. */
function copy<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

/** `/payments/:id` → `/payments/{id}`. */
function openApiPath(url: string): string {
  return url.replace(/:([A-Za-z0-9_]+)/g, '{$1}');
}

/** `post /payments/:id` → `postPaymentsById`. */
function operationId(method: string, url: string): string {
  const words = url
    .split('/')
    .filter(Boolean)
    .map((part) => (part.startsWith(':') ? `by-${part.slice(1)}` : part))
    .flatMap((part) => part.split(/[^A-Za-z0-9]+/))
    .filter(Boolean);
  return method.toLowerCase() + words.map((w) => w[0]!.toUpperCase() + w.slice(1)).join('');
}

function parametersFrom(where: 'path' | 'query' | 'header', schema: unknown, pathNames: readonly string[] = []): object[] {
  const object = (schema ?? {}) as ObjectSchema;
  const names = [...new Set([...pathNames, ...Object.keys(object.properties ?? {})])];
  return names.map((name) => ({
    name,
    in: where,
    required: where === 'path' || (object.required ?? []).includes(name),
    schema: copy(object.properties?.[name] ?? { type: 'string' }),
  }));
}

/**
 * The OpenAPI 3.1 document of `routes`: one operation per method and path
 * (HEAD and OPTIONS left out), parameters and request bodies from the route
 * schemas, bearer authentication on all but the public paths. Route schemas
 * are JSON Schema, which OpenAPI 3.1 takes as they are.
 *
 * @example
 * ```ts
 * const doc = openApiDocument([{ method: 'POST', url: '/payments', schema: { body: { type: 'object' } } }]);
 * console.log(doc.paths['/payments'].post.requestBody); // { required: true, content: { 'application/json': … } }
 * ```
 */
export function openApiDocument(routes: readonly ReferenceRoute[]): {
  openapi: string;
  paths: Record<string, Record<string, Record<string, unknown>>>;
} & Record<string, unknown> {
  const paths: Record<string, Record<string, Record<string, unknown>>> = {};
  for (const route of routes) {
    const method = route.method.toLowerCase();
    if (method === 'head' || method === 'options' || route.url === OPENAPI_PATH || route.url.includes('*')) continue;
    const path = openApiPath(route.url);
    const pathNames = [...route.url.matchAll(/:([A-Za-z0-9_]+)/g)].map((m) => m[1]!);
    const schema = route.schema ?? {};
    const parameters = [
      ...parametersFrom('path', schema.params, pathNames),
      ...(schema.querystring ? parametersFrom('query', schema.querystring) : []),
      ...(schema.headers ? parametersFrom('header', schema.headers) : []),
    ];
    const operation: Record<string, unknown> = {
      operationId: operationId(method, route.url),
      ...(schema.summary ? { summary: schema.summary } : {}),
      ...(schema.description ? { description: schema.description } : {}),
      ...(parameters.length > 0 ? { parameters } : {}),
      ...(schema.body
        ? { requestBody: { required: true, content: { 'application/json': { schema: copy(schema.body) } } } }
        : {}),
      responses: {
        default: {
          description: 'The answer: JSON, or application/problem+json for an error (docs/reference.md)',
        },
      },
      ...(PUBLIC_PATHS.has(route.url) ? { security: [] } : {}),
    };
    paths[path] ??= {};
    paths[path]![method] = operation;
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'oncely reference system',
      version: '1.0.0',
      description: 'Payments, orders, trades and users behind a demo bearer token (Authorization: Bearer <account>).',
    },
    // Relative: the document is served by the server it describes.
    servers: [{ url: '/' }],
    security: [{ bearer: [] }],
    components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    paths,
  };
}

/**
 * Collects every route registered after it and serves their document at
 * `GET /openapi.json`; then registers `options.extraRoutes`, if any. Call it
 * before the routes are registered.
 *
 * @example
 * ```ts
 * const app = Fastify();
 * await openApiRoutes(app, { extraRoutes: (scoped) => void scoped.post('/transfers', { config: { idempotency: false } }, handler) });
 * app.post('/payments', { schema: { body: paymentBodySchema } }, pay); // in the document
 * ```
 */
export async function openApiRoutes(
  app: FastifyInstance,
  options: { extraRoutes?: (app: FastifyInstance) => void | Promise<void> } = {},
): Promise<void> {
  const routes: ReferenceRoute[] = [];
  app.addHook('onRoute', (route: RouteOptions) => {
    const methods = Array.isArray(route.method) ? route.method : [route.method];
    for (const method of methods) routes.push({ method, url: route.url, schema: route.schema as ReferenceRoute['schema'] });
  });
  let document: string | undefined;
  app.get(OPENAPI_PATH, async (_request, reply) => {
    // Made once, at the first request: every route is registered by then.
    document ??= JSON.stringify(openApiDocument(routes));
    return reply.type('application/json; charset=utf-8').send(document);
  });
  if (options.extraRoutes) await app.register(async (scoped) => options.extraRoutes!(scoped));
}
