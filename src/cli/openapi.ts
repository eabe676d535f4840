/**
 * `oncely verify --openapi <file or URL>`: runs the checks of
 * {@link verify} against every POST and PATCH operation of an OpenAPI 3
 * document, with request bodies sampled from their schemas, and reports
 * which operations are protected and which are not.
 *
 * The document is read and its `$ref`s resolved by `@readme/openapi-parser`;
 * bodies and parameters come from `openapi-sampler` (deterministic: the
 * document's own examples first, else values fitting the schema). Both are
 * loaded only here, from the current project first, then from wherever
 * oncely is installed: oncely does not depend on them (see docs/cli.md).
 *
 * @example
 * ```ts
 * import { formatOpenApiReport, verifyOpenApi } from './openapi.js';
 * const report = await verifyOpenApi({
 *   document: 'http://127.0.0.1:3000/openapi.json',
 *   headers: [['authorization', 'Bearer acct_1']],
 * });
 * console.log(formatOpenApiReport(report)); // one row per operation: protected or not
 * ```
 * @module
 */

import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { renderTable } from './table.js';
import { type CheckName, type CheckResult, type VerifyReport, verify } from './verify.js';

/**
 * The methods checked by default: the ones that create or change something and are not idempotent by nature.
 *
 * @example
 * ```ts
 * const plans = planOperations(document, baseUrl, sample, [...OPENAPI_METHODS, 'DELETE']);
 * ```
 */
export const OPENAPI_METHODS = ['POST', 'PATCH'] as const;

/**
 * The packages `--openapi` needs, with the ranges it was tested with.
 *
 * @example
 * ```ts
 * console.log(`npm install -D ${OPENAPI_TOOLS.parser} ${OPENAPI_TOOLS.sampler}`);
 * ```
 */
export const OPENAPI_TOOLS = { parser: '@readme/openapi-parser@^9', sampler: 'openapi-sampler@^1.7' } as const;

/**
 * `@readme/openapi-parser` or `openapi-sampler` is not installed; the message says how to install them.
 *
 * @example
 * ```ts
 * try {
 *   await verifyOpenApi({ document: './openapi.yaml', baseUrl: 'http://127.0.0.1:3000' });
 * } catch (error) {
 *   if (error instanceof MissingToolError) console.error(error.message); // … run `npm install -D …`
 * }
 * ```
 */
export class MissingToolError extends Error {}

/**
 * Options of {@link verifyOpenApi}.
 *
 * @example
 * ```ts
 * const options: OpenApiVerifyOptions = {
 *   document: './openapi.yaml',
 *   baseUrl: 'https://staging.example.com',
 *   headers: [['authorization', `Bearer ${process.env.TEST_TOKEN}`]],
 *   exclude: ['POST /login'],
 *   concurrency: 10,
 * };
 * ```
 */
export interface OpenApiVerifyOptions {
  /** The document: a file path, or an `http(s)://` URL. JSON or YAML. */
  document: string;
  /**
   * The base URL of the server under test, e.g. `http://127.0.0.1:3000`.
   * Default: the document's first `servers` entry, resolved against the
   * document's URL (a document read from a file needs an absolute one).
   */
  baseUrl?: string;
  /**
   * Headers sent with every request (authentication…). They are sent with
   * the document's request too when it is on the origin of the server under
   * test (always when `baseUrl` is not given: the server serves its document).
   */
  headers?: ReadonlyArray<readonly [string, string]>;
  /** Methods whose operations are checked [POST, PATCH]. */
  methods?: readonly string[];
  /** Operations to leave out: `'POST /login'` (the document's path) or an `operationId`. */
  exclude?: readonly string[];
  /** Duplicates sent at once by the concurrency check [20]. */
  concurrency?: number;
  /** Limit of one request, ms [10000]. */
  timeoutMs?: number;
  /** Limit of the whole run, ms [120000 per operation]: operations left when it runs out are not verified. */
  maxTimeMs?: number;
  /** Where the resource id is in a JSON answer, dotted [`id`]. */
  idField?: string;
  /** Checks not to run, for every operation. */
  skip?: readonly CheckName[];
}

/**
 * The verdict on one operation: `protected` (every check passed),
 * `unprotected` (a check showed a key ignored: a second resource, a keyless
 * request that ran…), or `unverified` (the requests were refused for other
 * reasons, e.g. a sampled body the server rejects, or a 404 for a sampled id).
 *
 * @example
 * ```ts
 * const unprotected = report.operations.filter((o) => o.verdict === 'unprotected').map((o) => `${o.method} ${o.path}`);
 * ```
 */
export type OperationVerdict = 'protected' | 'unprotected' | 'unverified';

/**
 * One operation of the document and what the checks found.
 *
 * @example
 * ```ts
 * for (const operation of report.operations) console.log(operation.method, operation.path, operation.verdict, operation.reasons);
 * ```
 */
export interface OperationResult {
  method: string;
  /** The path as the document writes it, e.g. `/payments/{id}/refunds`. */
  path: string;
  operationId?: string;
  /** The URL requested (path parameters filled in). */
  url: string;
  verdict: OperationVerdict;
  /** Why, in one line per failed check (empty when protected without remarks). */
  reasons: string[];
  /** The body of the first logical operation, as sent (`null` when the operation has no body). */
  body: string | null;
  /** The checks' full report; absent when the operation could not be run (no JSON body schema, time out…). */
  report?: VerifyReport;
}

/**
 * What {@link verifyOpenApi} found.
 *
 * @example
 * ```ts
 * const report: OpenApiReport = await verifyOpenApi({ document: 'http://127.0.0.1:3000/openapi.json' });
 * process.exitCode = report.passed ? 0 : 1;
 * ```
 */
export interface OpenApiReport {
  document: string;
  /** The document's `info.title`, when it has one. */
  title?: string;
  baseUrl: string;
  /** True when every operation checked is protected (and there was at least one). */
  passed: boolean;
  operations: OperationResult[];
  /** Operations left out on request (`exclude`), as `METHOD path`. */
  excluded: string[];
  /** HTTP requests sent in all (the document's own excluded). */
  requests: number;
  durationMs: number;
}

/**
 * A planned operation: where to send, what to send. See {@link planOperations}.
 *
 * @example
 * ```ts
 * const [plan] = planOperations(document, 'http://127.0.0.1:3000', sample);
 * await verify({ url: plan.url, method: plan.method, body: plan.body, skip: plan.varies ? [] : ['reuse'] });
 * ```
 */
export interface PlannedOperation {
  method: string;
  path: string;
  operationId?: string;
  url: string;
  /** Required header parameters, filled from their examples or schemas. */
  headers: Array<[string, string]>;
  /** The body of logical operation `n`; `null`: the operation has no request body. */
  body: ((n: number) => string) | null;
  /** False when no field of the body could be varied: the `reuse` check cannot run. */
  varies: boolean;
  /** Set when the operation cannot be checked at all, and why. */
  unusable?: string;
}

/**
 * The sampler's signature (`openapi-sampler`'s `sample`).
 *
 * @example
 * ```ts
 * import { sample } from 'openapi-sampler';
 * const sampler = sample as unknown as SampleFn;
 * ```
 */
export type SampleFn = (schema: object, options?: Record<string, unknown>, document?: object) => unknown;

/** The pieces of an OpenAPI document read here (after `$ref`s are resolved). */
interface Schema {
  type?: string | string[];
  properties?: Record<string, Schema>;
  items?: Schema | Schema[];
  allOf?: Schema[];
  oneOf?: Schema[];
  anyOf?: Schema[];
  enum?: unknown[];
  const?: unknown;
  format?: string;
  pattern?: string;
  minLength?: number;
  maxLength?: number;
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number | boolean;
  exclusiveMaximum?: number | boolean;
  multipleOf?: number;
  example?: unknown;
  examples?: unknown[];
  default?: unknown;
  readOnly?: boolean;
}

interface Parameter {
  name: string;
  in: string;
  required?: boolean;
  schema?: Schema;
  example?: unknown;
  examples?: Record<string, { value?: unknown }>;
}

interface MediaType {
  schema?: Schema;
  example?: unknown;
  examples?: Record<string, { value?: unknown }>;
}

interface Operation {
  operationId?: string;
  parameters?: Parameter[];
  requestBody?: { content?: Record<string, MediaType> };
}

interface Document {
  openapi?: string;
  swagger?: string;
  info?: { title?: string };
  servers?: Array<{ url: string; variables?: Record<string, { default?: string }> }>;
  paths?: Record<string, (Record<string, Operation> & { parameters?: Parameter[] }) | undefined>;
}

/** Sampler options: only what a client must send, never what the server writes. */
const SAMPLE_OPTIONS = { skipReadOnly: true, skipNonRequired: true, quiet: true, enablePatterns: true };

/**
 * Loads a package from the current project first, then from wherever oncely
 * is installed (the specifier is a plain string: no types needed either).
 */
async function loadTool(name: string): Promise<Record<string, unknown> | undefined> {
  try {
    const resolved = createRequire(join(process.cwd(), 'noop.js')).resolve(name);
    return (await import(pathToFileURL(resolved).href)) as Record<string, unknown>;
  } catch {
    // not in the current project: try oncely's own resolution
  }
  try {
    return (await import(name)) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** A function export of a module, whether ESM or CommonJS (`default`). */
function exported<T>(module: Record<string, unknown> | undefined, name: string): T | undefined {
  const direct = module?.[name];
  if (typeof direct === 'function') return direct as T;
  const viaDefault = (module?.default as Record<string, unknown> | undefined)?.[name];
  return typeof viaDefault === 'function' ? (viaDefault as T) : undefined;
}

type DereferenceFn = (api: string | object, options?: Record<string, unknown>) => Promise<unknown>;

/**
 * The parser's `dereference` and the sampler's `sample`.
 * @throws {@link MissingToolError} naming the packages to install.
 */
async function loadTools(): Promise<{ parse: DereferenceFn; dereference: DereferenceFn; sample: SampleFn }> {
  const parser = await loadTool('@readme/openapi-parser');
  const parse = exported<DereferenceFn>(parser, 'parse');
  const dereference = exported<DereferenceFn>(parser, 'dereference');
  const sample = exported<SampleFn>(await loadTool('openapi-sampler'), 'sample');
  if (parse === undefined || dereference === undefined || sample === undefined) {
    const missing = [dereference === undefined ? OPENAPI_TOOLS.parser : '', sample === undefined ? OPENAPI_TOOLS.sampler : ''].filter(Boolean);
    throw new MissingToolError(
      `verify --openapi needs ${missing.join(' and ')}, which oncely does not install: run \`npm install -D ${missing.join(' ')}\` in your project.`,
    );
  }
  return { parse, dereference, sample };
}

function isUrl(source: string): boolean {
  return /^https?:\/\//i.test(source);
}

/** The base URL of the server: the given one, else the document's first server, resolved against the document. */
function baseUrlOf(document: Document, source: string, given: string | undefined): string {
  if (given !== undefined) return trimSlash(new URL(given).toString());
  const server = document.servers?.[0];
  const template = server?.url ?? '/';
  const url = template.replace(/\{([^}]+)\}/g, (_, name: string) => server?.variables?.[name]?.default ?? '');
  if (isUrl(source)) return trimSlash(new URL(url, source).toString());
  if (isUrl(url)) return trimSlash(url);
  throw new Error(
    `the document's server is ${server ? JSON.stringify(server.url) : 'not given'}, not an absolute URL: pass the server's base URL (oncely verify --openapi <file> <base-url>)`,
  );
}

function trimSlash(url: string): string {
  return url.replace(/\/+$/, '');
}

/**
 * Fetches a document served over HTTP, with the user's headers when asked.
 * Fetched here rather than by the parser, which refuses loopback and
 * private addresses (a guard for servers; here the user names the URL of
 * their own API, often on 127.0.0.1 or a staging network).
 */
async function fetchDocument(
  url: string,
  headers: ReadonlyArray<readonly [string, string]>,
  sendHeaders: boolean,
  timeoutMs: number,
): Promise<string> {
  let response: Response;
  try {
    response = await fetch(url, {
      headers: [['accept', 'application/json, application/yaml;q=0.9, */*;q=0.1'], ...(sendHeaders ? headers.map(([n, v]): [string, string] => [n, v]) : [])],
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (error) {
    throw new Error(`cannot fetch the OpenAPI document ${url}: ${error instanceof Error ? error.message : String(error)}`);
  }
  const text = await response.text();
  if (!response.ok) throw new Error(`cannot fetch the OpenAPI document ${url}: answered ${response.status} ${text.slice(0, 200)}`);
  return text;
}

/**
 * Reads and checks an OpenAPI 3 document, with every `$ref` resolved. A
 * file may refer to other files and public URLs; a document fetched over
 * HTTP is resolved on its own (internal `$ref`s), since the parser may not
 * fetch loopback or private addresses.
 * @throws {@link MissingToolError} when the parser or sampler is not installed; an `Error` for an unreadable document.
 */
async function readDocument(
  source: string,
  headers: ReadonlyArray<readonly [string, string]>,
  sendHeaders: boolean,
  timeoutMs: number,
): Promise<{ document: Document; sample: SampleFn }> {
  const { parse, dereference, sample } = await loadTools();
  let document: Document;
  try {
    if (isUrl(source)) {
      const text = await fetchDocument(source, headers, sendHeaders, timeoutMs);
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        // YAML: the parser reads it from a file of its own.
        const dir = mkdtempSync(join(tmpdir(), 'oncely-openapi-'));
        try {
          const file = join(dir, 'openapi.yaml');
          writeFileSync(file, text);
          parsed = await parse(file);
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      }
      document = (await dereference(parsed as object, { resolve: { external: false } })) as Document;
    } else {
      document = (await dereference(isAbsolute(source) ? source : resolve(source), { resolve: { http: { timeout: timeoutMs } } })) as Document;
    }
  } catch (error) {
    if (error instanceof Error && error.message.startsWith('cannot fetch')) throw error;
    throw new Error(`cannot read the OpenAPI document ${source}: ${error instanceof Error ? error.message : String(error)}`);
  }
  if (typeof document?.openapi !== 'string' || !document.openapi.startsWith('3.')) {
    const version = document?.swagger ? `Swagger ${document.swagger}` : 'no openapi version';
    throw new Error(`${source} is not an OpenAPI 3 document (${version}): convert it to OpenAPI 3 first`);
  }
  return { document, sample };
}

/** The example a parameter or media type gives, if any. */
function exampleOf(holder: { example?: unknown; examples?: Record<string, { value?: unknown }> }): unknown {
  if (holder.example !== undefined) return holder.example;
  for (const example of Object.values(holder.examples ?? {})) if (example?.value !== undefined) return example.value;
  return undefined;
}

/** A value for a parameter: its example, else one sampled from its schema. */
function parameterValue(parameter: Parameter, sample: SampleFn): string {
  const value = exampleOf(parameter) ?? sample(parameter.schema ?? { type: 'string' }, SAMPLE_OPTIONS);
  return typeof value === 'string' ? value : JSON.stringify(value);
}

/** The path item's parameters overridden by the operation's (same `in` and `name`). */
function parametersOf(pathParameters: Parameter[] | undefined, operation: Operation): Parameter[] {
  const merged = new Map<string, Parameter>();
  for (const parameter of [...(pathParameters ?? []), ...(operation.parameters ?? [])]) {
    if (parameter && typeof parameter.name === 'string') merged.set(`${parameter.in}:${parameter.name}`, parameter);
  }
  return [...merged.values()];
}

function isJsonMediaType(type: string): boolean {
  return /^application\/([\w.-]+\+)?json\s*(;|$)/i.test(type);
}

/** The schema of one property, through `allOf` (merged) and `oneOf`/`anyOf` (the first, as the sampler does). */
function propertySchema(schema: Schema | undefined, key: string): Schema | undefined {
  if (schema === undefined) return undefined;
  if (schema.properties?.[key] !== undefined) return schema.properties[key];
  for (const part of [...(schema.allOf ?? []), ...(schema.oneOf?.slice(0, 1) ?? []), ...(schema.anyOf?.slice(0, 1) ?? [])]) {
    const found = propertySchema(part, key);
    if (found !== undefined) return found;
  }
  return undefined;
}

function itemSchema(schema: Schema | undefined, index: number): Schema | undefined {
  if (schema === undefined) return undefined;
  if (Array.isArray(schema.items)) return schema.items[index];
  if (schema.items !== undefined) return schema.items;
  for (const part of schema.allOf ?? []) {
    const found = itemSchema(part, index);
    if (found !== undefined) return found;
  }
  return undefined;
}

/** A change of one value for logical operation `n`. */
type Vary = (n: number) => unknown;

/** How far `n` may go: verify makes about ten logical operations per run. */
const MAX_N = 1000;

/**
 * How a string can differ per operation while still fitting its schema:
 * free text gets the run's nonce and `n` appended, e-mail addresses and
 * UUIDs are made fresh; enums, constants, patterns and other formats are
 * left alone (a changed value might no longer fit).
 */
function varyString(schema: Schema, value: string, nonce: string): Vary | undefined {
  const max = schema.maxLength ?? Number.POSITIVE_INFINITY;
  const min = schema.minLength ?? 0;
  if (schema.format === 'uuid') return () => randomUUID();
  if (schema.format === 'email' || schema.format === 'idn-email') {
    if (schema.pattern !== undefined) return undefined;
    const make = (n: number) => `oncely-${nonce}-${n}@example.com`;
    return make(MAX_N).length <= max ? make : undefined;
  }
  if (schema.format !== undefined || schema.pattern !== undefined) return undefined;
  for (const make of [(n: number) => `${value}-${nonce}-${n}`, (n: number) => `${nonce}${n}`, (n: number) => String(n)]) {
    if (make(MAX_N).length <= max) return (n) => make(n).padEnd(min, 'x');
  }
  return undefined;
}

/** `value + n × step` (or minus), when every `n` up to {@link MAX_N} stays within the schema's bounds. */
function varyNumber(schema: Schema, value: number, integer: boolean): Vary | undefined {
  const step = schema.multipleOf ?? 1;
  if (integer && !Number.isInteger(step)) return undefined;
  const upper = typeof schema.exclusiveMaximum === 'number' ? schema.exclusiveMaximum : schema.maximum;
  const upperOpen = typeof schema.exclusiveMaximum === 'number' || schema.exclusiveMaximum === true;
  const lower = typeof schema.exclusiveMinimum === 'number' ? schema.exclusiveMinimum : schema.minimum;
  const lowerOpen = typeof schema.exclusiveMinimum === 'number' || schema.exclusiveMinimum === true;
  const fits = (x: number): boolean =>
    Number.isSafeInteger(Math.round(x)) &&
    (upper === undefined || (upperOpen ? x < upper : x <= upper)) &&
    (lower === undefined || (lowerOpen ? x > lower : x >= lower));
  if (fits(value + MAX_N * step) && fits(value + step)) return (n) => value + n * step;
  if (fits(value - MAX_N * step) && fits(value - step)) return (n) => value - n * step;
  return undefined;
}

/**
 * Every way the sampled `value` can differ per logical operation: all free
 * strings (so that fields a server keeps unique differ too), else the first
 * number that can move within its bounds.
 */
function variations(schema: Schema | undefined, value: unknown, nonce: string): { strings: Array<[Array<string | number>, Vary]>; numbers: Array<[Array<string | number>, Vary]> } {
  const strings: Array<[Array<string | number>, Vary]> = [];
  const numbers: Array<[Array<string | number>, Vary]> = [];
  const walk = (s: Schema | undefined, v: unknown, path: Array<string | number>, depth: number): void => {
    if (s === undefined || depth > 8 || s.enum !== undefined || s.const !== undefined || s.readOnly) return;
    if (Array.isArray(v)) {
      for (const [i, item] of v.entries()) walk(itemSchema(s, i), item, [...path, i], depth + 1);
      return;
    }
    if (v !== null && typeof v === 'object') {
      for (const [key, child] of Object.entries(v)) walk(propertySchema(s, key), child, [...path, key], depth + 1);
      return;
    }
    const types = Array.isArray(s.type) ? s.type : [s.type];
    if (typeof v === 'string') {
      const vary = varyString(s, v, nonce);
      if (vary) strings.push([path, vary]);
    } else if (typeof v === 'number') {
      const vary = varyNumber(s, v, types.includes('integer') || (Number.isInteger(v) && !types.includes('number')));
      if (vary) numbers.push([path, vary]);
    }
  };
  walk(schema, value, [], 0);
  return { strings, numbers };
}

/** `value` with the value at `path` replaced. */
function setAt(value: unknown, path: ReadonlyArray<string | number>, replacement: unknown): unknown {
  if (path.length === 0) return replacement;
  const [head, ...rest] = path;
  if (Array.isArray(value)) return value.map((item, i) => (i === head ? setAt(item, rest, replacement) : item));
  const record = value as Record<string, unknown>;
  return { ...record, [head as string]: setAt(record[head as string], rest, replacement) };
}

/** The body maker of one operation, from its JSON media type: the document's example, else a sample; varied per `n`. */
function bodyMaker(media: MediaType, sample: SampleFn): { body: (n: number) => string; varies: boolean } {
  const example = exampleOf(media);
  const base = example !== undefined ? example : sample(media.schema ?? {}, SAMPLE_OPTIONS);
  const nonce = randomBytes(3).toString('hex');
  const { strings, numbers } = variations(media.schema, base, nonce);
  const chosen = strings.length > 0 ? strings : numbers.slice(0, 1);
  return {
    body: (n) => JSON.stringify(chosen.reduce<unknown>((value, [path, vary]) => setAt(value, path, vary(n)), base)),
    varies: chosen.length > 0,
  };
}

/**
 * The operations of `document` to check, each with its URL (path
 * parameters filled from their examples or schemas, required query
 * parameters appended), required headers and a body maker. Pure, apart
 * from a random nonce in varied strings: no request is sent.
 *
 * @example
 * ```ts
 * import { sample } from 'openapi-sampler';
 * const [op] = planOperations(document, 'http://127.0.0.1:3000', sample);
 * console.log(op.method, op.url, op.body?.(1)); // POST http://127.0.0.1:3000/payments {"amount":2,"currency":"AAA"}
 * ```
 */
export function planOperations(
  document: object,
  baseUrl: string,
  sample: SampleFn,
  methods: readonly string[] = OPENAPI_METHODS,
): PlannedOperation[] {
  const doc = document as Document;
  const wanted = new Set(methods.map((m) => m.toLowerCase()));
  const planned: PlannedOperation[] = [];
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    if (item === undefined || item === null) continue;
    for (const [method, operation] of Object.entries(item)) {
      if (!wanted.has(method.toLowerCase()) || operation === null || typeof operation !== 'object') continue;
      const op = operation as Operation;
      const parameters = parametersOf(item.parameters, op);
      const plan: PlannedOperation = {
        method: method.toUpperCase(),
        path,
        ...(op.operationId !== undefined ? { operationId: op.operationId } : {}),
        url: '',
        headers: [],
        body: null,
        varies: false,
      };
      try {
        let filled = path.replace(/\{([^}]+)\}/g, (whole, name: string) => {
          const parameter = parameters.find((p) => p.in === 'path' && p.name === name);
          return parameter ? encodeURIComponent(parameterValue(parameter, sample)) : whole;
        });
        const query = new URLSearchParams();
        for (const parameter of parameters) {
          if (!parameter.required) continue;
          if (parameter.in === 'query') query.append(parameter.name, parameterValue(parameter, sample));
          // verify chooses the keys; the content type follows the body.
          if (parameter.in === 'header' && !/^(idempotency-key|content-type|accept)$/i.test(parameter.name)) {
            plan.headers.push([parameter.name, parameterValue(parameter, sample)]);
          }
        }
        if (query.size > 0) filled += `?${query}`;
        plan.url = `${baseUrl}${filled}`;
        const content = op.requestBody?.content;
        if (content !== undefined && Object.keys(content).length > 0) {
          const json = Object.keys(content).find(isJsonMediaType);
          if (json === undefined) {
            plan.unusable = `its request body is ${Object.keys(content).join(', ')}, not JSON: not sampled`;
          } else {
            const { body, varies } = bodyMaker(content[json]!, sample);
            plan.body = body;
            plan.varies = varies;
          }
        }
      } catch (error) {
        plan.url ||= `${baseUrl}${path}`;
        plan.unusable = `could not sample its parameters or body: ${error instanceof Error ? error.message : String(error)}`;
      }
      planned.push(plan);
    }
  }
  return planned;
}

/**
 * The verdict on one operation from its report, with the lines that explain it.
 *
 * @example
 * ```ts
 * const { verdict, reasons } = verdictOf(await verify({ url: 'http://127.0.0.1:3000/payments' }));
 * ```
 */
export function verdictOf(report: VerifyReport): { verdict: OperationVerdict; reasons: string[] } {
  if (report.passed) return { verdict: 'protected', reasons: [] };
  const failed = report.checks.filter(
    (c): c is CheckResult => c.status === 'fail' || (c.status === 'skip' && c.summary !== 'skipped on request'),
  );
  const reasons = failed.map((c) => `${c.name}: ${c.summary}`);
  const conclusive = failed.some((c) => c.status === 'fail' && c.inconclusive !== true);
  return { verdict: conclusive ? 'unprotected' : 'unverified', reasons };
}

function matches(excluded: readonly string[], plan: PlannedOperation): boolean {
  return excluded.some((entry) => {
    const trimmed = entry.trim();
    if (plan.operationId !== undefined && trimmed === plan.operationId) return true;
    const [method, ...rest] = trimmed.split(/\s+/);
    return rest.length > 0 && method!.toUpperCase() === plan.method && rest.join(' ') === plan.path;
  });
}

/**
 * Reads the document, then runs the checks against each POST and PATCH
 * operation in turn (one at a time: each creates resources) and gives each
 * a verdict. Throws for an unreadable document or a missing parser or
 * sampler ({@link MissingToolError}); never for what the server does.
 *
 * @example
 * ```ts
 * const report = await verifyOpenApi({
 *   document: 'http://127.0.0.1:3000/openapi.json',
 *   headers: [['authorization', 'Bearer acct_1']],
 * });
 * console.log(report.operations.map((o) => `${o.method} ${o.path}: ${o.verdict}`));
 * ```
 */
export async function verifyOpenApi(options: OpenApiVerifyOptions): Promise<OpenApiReport> {
  const started = performance.now();
  const headers = options.headers ?? [];
  const timeoutMs = options.timeoutMs ?? 10_000;
  let sendHeaders = true;
  if (options.baseUrl !== undefined && isUrl(options.document)) {
    sendHeaders = new URL(options.document).origin === new URL(options.baseUrl).origin;
  }
  const { document, sample } = await readDocument(options.document, headers, sendHeaders, timeoutMs);
  const baseUrl = baseUrlOf(document, options.document, options.baseUrl);
  const excluded = options.exclude ?? [];
  const all = planOperations(document, baseUrl, sample, options.methods ?? OPENAPI_METHODS);
  const plans = all.filter((plan) => !matches(excluded, plan));
  const deadline = Date.now() + (options.maxTimeMs ?? 120_000 * Math.max(1, plans.length));
  const operations: OperationResult[] = [];
  let requests = 0;
  for (const plan of plans) {
    const base = {
      method: plan.method,
      path: plan.path,
      ...(plan.operationId !== undefined ? { operationId: plan.operationId } : {}),
      url: plan.url,
      body: plan.body?.(1) ?? null,
    };
    if (plan.unusable !== undefined) {
      operations.push({ ...base, verdict: 'unverified', reasons: [plan.unusable] });
      continue;
    }
    const left = deadline - Date.now();
    if (left <= 0) {
      operations.push({ ...base, verdict: 'unverified', reasons: ['the time limit of the run ran out before it'] });
      continue;
    }
    const skip = new Set(options.skip ?? []);
    const remarks: string[] = [];
    if (!plan.varies && !skip.has('reuse')) {
      skip.add('reuse');
      remarks.push(plan.body === null ? 'reuse: not run (no request body to vary)' : 'reuse: not run (no field of the body could be varied)');
    }
    const report = await verify({
      url: plan.url,
      method: plan.method,
      headers: [...headers, ...plan.headers.filter(([name]) => !headers.some(([given]) => given.toLowerCase() === name.toLowerCase()))],
      body: plan.body,
      timeoutMs,
      maxTimeMs: left,
      skip: [...skip],
      ...(options.concurrency !== undefined ? { concurrency: options.concurrency } : {}),
      ...(options.idField !== undefined ? { idField: options.idField } : {}),
    });
    requests += report.requests;
    const { verdict, reasons } = verdictOf(report);
    operations.push({ ...base, verdict, reasons: [...reasons, ...remarks], report });
  }
  return {
    document: options.document,
    ...(document.info?.title !== undefined ? { title: document.info.title } : {}),
    baseUrl,
    passed: operations.length > 0 && operations.every((o) => o.verdict === 'protected'),
    operations,
    excluded: all.filter((plan) => matches(excluded, plan)).map((plan) => `${plan.method} ${plan.path}`),
    requests,
    durationMs: Math.round(performance.now() - started),
  };
}

const VERDICT_LABEL: Record<OperationVerdict, string> = {
  protected: 'protected',
  unprotected: 'NOT PROTECTED',
  unverified: 'UNVERIFIED',
};

/**
 * The human-readable report: one row per operation, its verdict, the checks passed and why.
 *
 * @example
 * ```ts
 * console.log(formatOpenApiReport(await verifyOpenApi({ document: './openapi.json', baseUrl: 'http://127.0.0.1:3000' })));
 * ```
 */
export function formatOpenApiReport(report: OpenApiReport): string {
  const rows = report.operations.map((operation) => {
    const checks = operation.report?.checks.filter((c) => c.status !== 'skip' || c.summary !== 'skipped on request') ?? [];
    const passed = checks.filter((c) => c.status === 'pass').length;
    return [
      `${operation.method} ${operation.path}`,
      VERDICT_LABEL[operation.verdict],
      operation.report ? `${passed}/${checks.length}` : '-',
      operation.reasons.join('\n'),
    ];
  });
  const count = (verdict: OperationVerdict) => report.operations.filter((o) => o.verdict === verdict).length;
  const summary = report.passed
    ? `PASSED: ${report.operations.length}/${report.operations.length} operations protected`
    : report.operations.length === 0
      ? 'FAILED: no POST or PATCH operation to check'
      : `FAILED: ${count('unprotected')} not protected, ${count('unverified')} unverified, ${count('protected')} protected`;
  return [
    `oncely verify --openapi ${report.document}${report.title ? ` (${report.title})` : ''} → ${report.baseUrl}`,
    '',
    renderTable(['operation', 'result', 'checks', 'why'], rows),
    ...(report.excluded.length > 0 ? ['', `excluded: ${report.excluded.join(', ')}`] : []),
    '',
    `${summary} · ${report.requests} requests · ${(report.durationMs / 1000).toFixed(1)} s`,
  ].join('\n');
}
