/**
 * Translation between API Gateway / Function URL payloads and the HTTP core:
 * which payload an event is, the request as the core sees it, the handler's
 * result as a response, and a response in the payload's own result shape.
 * Types are structural (no import of `aws-lambda`), so that the events and
 * results of `@types/aws-lambda` fit them and nobody has to install it.
 */
import { BodyInvalidError, BodyTooLargeError } from '../errors/index.js';
import type { HttpRequestView } from '../http/core.js';
import type { HttpResponse } from '../http/outcome.js';

/**
 * An HTTP event as Lambda receives it: API Gateway REST APIs (payload 1.0,
 * `APIGatewayProxyEvent`), HTTP APIs (payload 2.0, `APIGatewayProxyEventV2`)
 * and Function URLs (`LambdaFunctionURLEvent`, payload 2.0). Only the fields
 * oncely reads; the types of `@types/aws-lambda` fit it.
 *
 * @example
 * ```ts
 * const event: LambdaHttpEvent = {
 *   version: '2.0',
 *   rawPath: '/payments',
 *   rawQueryString: '',
 *   headers: { 'idempotency-key': 'order-42', 'content-type': 'application/json' },
 *   requestContext: { http: { method: 'POST', path: '/payments' } },
 *   body: '{"amount":2500}',
 *   isBase64Encoded: false,
 * };
 * ```
 */
export interface LambdaHttpEvent {
  /** `'2.0'` for HTTP API payload 2.0 and Function URLs; `'1.0'` (HTTP API payload 1.0) or absent for REST APIs. */
  version?: string;
  /** Payload 1.0: the method. */
  httpMethod?: string;
  /** Payload 1.0: the path (without the stage). */
  path?: string;
  /** Payload 2.0: the path as sent. */
  rawPath?: string;
  /** Payload 2.0: the query string as sent, without `?`. */
  rawQueryString?: string;
  /** Header fields: payload 1.0 keeps the client's case and the last value; 2.0 lower-cases names and joins repeated fields with commas. */
  headers?: Record<string, string | undefined> | null;
  /** Payload 1.0: every value of every header field. */
  multiValueHeaders?: Record<string, string[] | undefined> | null;
  /** Payload 1.0: query parameters (decoded; the last value of each). */
  queryStringParameters?: Record<string, string | undefined> | null;
  /** Payload 1.0: every value of every query parameter (decoded). */
  multiValueQueryStringParameters?: Record<string, string[] | undefined> | null;
  /** Payload 2.0: the `Cookie` header, split. */
  cookies?: string[];
  /** The body as text, base64 when `isBase64Encoded`; an object once a body parser (Middy's) ran. */
  body?: unknown;
  /** The body is base64. */
  isBase64Encoded?: boolean;
  /** Payload 2.0 has `http` (method, path); both carry the authorizer's output, where a scope usually comes from. */
  requestContext?: object;
}

/**
 * A response in the shape of the event it answers: `statusCode`, headers
 * (`multiValueHeaders` for a payload 1.0 event that has them, else
 * `headers`), the body as text, or base64 with `isBase64Encoded` when it is
 * binary. It fits `APIGatewayProxyResult` and `APIGatewayProxyStructuredResultV2`.
 *
 * @example
 * ```ts
 * const answer: LambdaHttpResult = { statusCode: 201, headers: { 'content-type': 'application/json' }, body: '{"id":"pay_1"}', isBase64Encoded: false };
 * ```
 */
export interface LambdaHttpResult {
  statusCode: number;
  headers?: Record<string, string>;
  multiValueHeaders?: Record<string, string[]>;
  body: string;
  isBase64Encoded: boolean;
}

/**
 * The parts of the Lambda context oncely reads (the `Context` of
 * `@types/aws-lambda` fits it; a local harness may pass `{}`).
 *
 * @example
 * ```ts
 * const context: LambdaContextLike = { getRemainingTimeInMillis: () => 3_000 };
 * ```
 */
export interface LambdaContextLike {
  /** Milliseconds until Lambda stops this invocation. */
  getRemainingTimeInMillis?: () => number;
}

/** Which payload an event is: 1.0 (REST APIs) or 2.0 (HTTP APIs, Function URLs). */
export type Shape =
  /** `multiValue`: the event has `multiValueHeaders`, so its answer uses them. */
  | { version: 1; multiValue: boolean }
  | { version: 2 };

const V2: Shape = { version: 2 };
const V1_MULTI: Shape = { version: 1, multiValue: true };
const V1_SINGLE: Shape = { version: 1, multiValue: false };

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null;
}

/** The payload of an event, or undefined when it is not an HTTP event (a warm-up ping, a queue message). */
export function shapeOf(event: unknown): Shape | undefined {
  if (!isObject(event)) return undefined;
  const context = event.requestContext;
  if (event.version === '2.0' || (isObject(context) && isObject(context.http))) {
    return isObject(context) && isObject(context.http) && typeof context.http.method === 'string' ? V2 : undefined;
  }
  if (typeof event.httpMethod !== 'string') return undefined;
  return isObject(event.multiValueHeaders) ? V1_MULTI : V1_SINGLE;
}

/** The request method, upper case. */
export function methodOf(event: LambdaHttpEvent, shape: Shape): string {
  const method = shape.version === 2 ? httpOf(event)!.method : event.httpMethod!;
  return method.toUpperCase();
}

/** Payload 2.0: `requestContext.http`. */
function httpOf(event: LambdaHttpEvent): { method: string; path?: string } | undefined {
  return (event.requestContext as { http?: { method: string; path?: string } } | undefined)?.http;
}

/** Every value of a header, names compared without case. */
function headerLines(event: LambdaHttpEvent, shape: Shape, name: string): string[] | undefined {
  let found: string[] | undefined;
  if (shape.version === 1 && shape.multiValue) {
    for (const [field, values] of Object.entries(event.multiValueHeaders!)) {
      if (values !== undefined && field.toLowerCase() === name) found = found === undefined ? [...values] : [...found, ...values];
    }
    return found;
  }
  for (const [field, value] of Object.entries(event.headers ?? {})) {
    if (value !== undefined && field.toLowerCase() === name) found = found === undefined ? [value] : [...found, value];
  }
  // Payload 2.0 takes the Cookie header out of `headers`.
  if (found === undefined && name === 'cookie' && shape.version === 2 && event.cookies !== undefined && event.cookies.length > 0) {
    return [event.cookies.join('; ')];
  }
  return found;
}

/** The query string: as sent (2.0), or rebuilt from the decoded parameters (1.0). */
function queryOf(event: LambdaHttpEvent, shape: Shape): string {
  if (shape.version === 2) return event.rawQueryString ?? '';
  const params = new URLSearchParams();
  const multi = event.multiValueQueryStringParameters;
  if (isObject(multi)) {
    for (const [name, values] of Object.entries(multi)) for (const value of values ?? []) params.append(name, value);
  } else {
    for (const [name, value] of Object.entries(event.queryStringParameters ?? {})) if (value !== undefined) params.append(name, value);
  }
  return params.toString();
}

function isJson(type: string | undefined): boolean {
  return type !== undefined && /^application\/([\w.+-]*\+)?json\b/i.test(type);
}

/** The body for the fingerprint, within `limit` bytes. */
function bodyOf(event: LambdaHttpEvent, shape: Shape, limit: number): HttpRequestView<unknown>['body'] {
  const body = event.body;
  if (body === undefined || body === null || body === '') return undefined;
  // A body parser (Middy's) ran first: what it parsed is the body.
  if (body instanceof Uint8Array) return { raw: body };
  if (typeof body !== 'string') return { json: body };
  const bytes = event.isBase64Encoded ? Buffer.from(body, 'base64') : undefined;
  if ((bytes?.byteLength ?? Buffer.byteLength(body)) > limit) throw new BodyTooLargeError(limit);
  if (isJson(headerLines(event, shape, 'content-type')?.[0])) {
    try {
      return { json: JSON.parse(bytes === undefined ? body : bytes.toString('utf8')) };
    } catch (error) {
      throw new BodyInvalidError('The request body is not valid JSON.', { cause: error });
    }
  }
  return { raw: bytes ?? body };
}

/** The request as the core sees it. Throws a body error (400, 413) before any claim. */
export function viewOf<E extends LambdaHttpEvent>(event: E, shape: Shape, method: string, maxBodyBytes: number): HttpRequestView<E> {
  return {
    raw: event,
    method,
    path: (shape.version === 2 ? (event.rawPath ?? httpOf(event)?.path) : event.path) ?? '/',
    query: queryOf(event, shape),
    header: (name) => headerLines(event, shape, name),
    body: bodyOf(event, shape, maxBodyBytes),
  };
}

/** A response in the event's result shape. */
export function toResult(response: HttpResponse, shape: Shape): LambdaHttpResult {
  const binary = typeof response.body !== 'string';
  const body = typeof response.body === 'string' ? response.body : Buffer.from(response.body).toString('base64');
  if (shape.version === 1 && shape.multiValue) {
    const multiValueHeaders: Record<string, string[]> = {};
    for (const [name, value] of response.headers) multiValueHeaders[name] = [...(multiValueHeaders[name] ?? []), value];
    return { statusCode: response.status, multiValueHeaders, body, isBase64Encoded: binary };
  }
  const headers: Record<string, string> = {};
  for (const [name, value] of response.headers) headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
  return { statusCode: response.status, headers, body, isBase64Encoded: binary };
}

/** A handler's result read as a response: its status, a header by name (any case), its body. */
export interface ReadResult {
  status: number;
  header(name: string): string | undefined;
  body: Uint8Array | string;
}

function headerValue(value: unknown): string {
  return Array.isArray(value) ? value.map(String).join(', ') : String(value);
}

/**
 * Read a handler's result as API Gateway would. An object with a numeric
 * `statusCode` is a proxy result; for payload 2.0 anything else is a value
 * answered as 200 JSON. Undefined when API Gateway could not read it either
 * (payload 1.0 without a `statusCode`: its 502).
 */
export function readResult(result: unknown, shape: Shape): ReadResult | undefined {
  if (!isObject(result) || typeof result.statusCode !== 'number') {
    if (shape.version === 1) return undefined;
    // Payload 2.0 infers the rest: 200, application/json, the value as JSON (a string is quoted).
    const body = JSON.stringify(result) ?? 'null';
    return { status: 200, header: (name) => (name === 'content-type' ? 'application/json' : undefined), body };
  }
  const headers = new Map<string, string>();
  if (isObject(result.headers)) {
    for (const [name, value] of Object.entries(result.headers)) if (value !== undefined && value !== null) headers.set(name.toLowerCase(), headerValue(value));
  }
  // API Gateway merges both maps; where a name is in both, the multi-value one wins.
  if (isObject(result.multiValueHeaders)) {
    for (const [name, value] of Object.entries(result.multiValueHeaders)) if (value !== undefined && value !== null) headers.set(name.toLowerCase(), headerValue(value));
  }
  let body: Uint8Array | string;
  const raw = result.body;
  if (raw === undefined || raw === null) body = '';
  else if (typeof raw === 'string') body = result.isBase64Encoded === true ? new Uint8Array(Buffer.from(raw, 'base64')) : raw;
  else if (raw instanceof Uint8Array) body = raw;
  else {
    // An object left for a response serializer (Middy's http-response-serializer)
    // that runs after oncely: kept as the JSON such a serializer makes.
    body = JSON.stringify(raw) ?? '';
    if (!headers.has('content-type')) headers.set('content-type', 'application/json');
  }
  return { status: result.statusCode, header: (name) => headers.get(name), body };
}
