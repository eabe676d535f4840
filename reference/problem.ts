/**
 * RFC 9457 problem responses for the reference system: every error it
 * answers (auth, validation, parsing, not found, oncely's own) is
 * `application/problem+json` with a stable `type` per situation.
 *
 * @module
 */
import { STATUS_CODES } from 'node:http';
import type { Socket } from 'node:net';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BodyInvalidError, BodyTooLargeError, isOncelyError, PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE } from 'oncely';

/** The body of a problem response. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  [extension: string]: unknown;
}

/** Reference-specific problem types (oncely's own errors keep theirs). */
export const REFERENCE_PROBLEMS = {
  unauthorized: { status: 401, title: 'Authentication required' },
  validation: { status: 400, title: 'Request is invalid' },
  'not-found': { status: 404, title: 'Not found' },
  'bad-request': { status: 400, title: 'Malformed request' },
  'request-timeout': { status: 408, title: 'Request timeout' },
  'headers-too-large': { status: 431, title: 'Request headers too large' },
  'unsupported-media-type': { status: 415, title: 'Unsupported media type' },
  'payment-failed': { status: 502, title: 'Payment failed' },
  'payment-pending': { status: 503, title: 'Payment still in progress' },
  'shutting-down': { status: 503, title: 'Server shutting down' },
  internal: { status: 500, title: 'Internal error' },
} as const;

/** A problem `type` slug of the reference system. */
export type ReferenceProblem = keyof typeof REFERENCE_PROBLEMS;

/** Build a reference problem body. */
export function problem(slug: ReferenceProblem, detail: string, extensions: Record<string, unknown> = {}): Problem {
  const { status, title } = REFERENCE_PROBLEMS[slug];
  return { type: `${PROBLEM_TYPE_BASE}reference/${slug}`, title, status, detail, ...extensions };
}

/** Send a problem body with its status and media type. */
export function sendProblem(reply: FastifyReply, body: Problem, headers: Record<string, string> = {}): FastifyReply {
  reply.code(body.status).header('content-type', PROBLEM_CONTENT_TYPE);
  for (const [name, value] of Object.entries(headers)) reply.header(name, value);
  return reply.send(JSON.stringify(body));
}

/** An error a route throws to answer with a problem (kept out of the 500 path). */
export class ProblemError extends Error {
  readonly problem: Problem;
  readonly headers: Record<string, string>;
  constructor(body: Problem, headers: Record<string, string> = {}) {
    super(body.detail);
    this.problem = body;
    this.headers = headers;
  }
}

function fromOncely(error: { status: number; type: string; title: string; message: string; retryAfter?: number | undefined }): {
  body: Problem;
  headers: Record<string, string>;
} {
  const headers: Record<string, string> = {};
  if (error.retryAfter !== undefined) headers['retry-after'] = String(error.retryAfter);
  return { body: { type: error.type, title: error.title, status: error.status, detail: error.message }, headers };
}

/** Translate any error Fastify or a route raised into a problem. */
export function problemOf(error: FastifyError | Error): { body: Problem; headers: Record<string, string> } {
  if (error instanceof ProblemError) return { body: error.problem, headers: error.headers };
  if (isOncelyError(error)) return fromOncely(error);
  const fe = error as FastifyError;
  if (fe.validation) {
    const errors = fe.validation.map((v) => ({
      pointer: v.instancePath || '/',
      message: v.message ?? 'is invalid',
      ...(v.keyword === 'additionalProperties'
        ? { property: (v.params as { additionalProperty?: string }).additionalProperty }
        : {}),
    }));
    return { body: problem('validation', fe.message, { errors }), headers: {} };
  }
  switch (fe.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE': {
      const limit = Number((fe as FastifyError & { limit?: number }).limit);
      return fromOncely(new BodyTooLargeError(Number.isFinite(limit) ? limit : 0));
    }
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return fromOncely(new BodyInvalidError(`The body is not valid JSON: ${fe.message}`));
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return fromOncely(new BodyInvalidError('The body is empty; send a JSON object.'));
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return fromOncely(new BodyInvalidError('Content-Length does not match the body.'));
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return { body: problem('unsupported-media-type', 'Send the body as application/json.'), headers: {} };
  }
  // Fastify's body parser reports syntax errors as a 400 with no code in some paths.
  if (error instanceof SyntaxError || (fe.statusCode === 400 && /JSON/i.test(fe.message))) {
    return fromOncely(new BodyInvalidError(`The body is not valid JSON: ${fe.message}`));
  }
  if (fe.statusCode !== undefined && fe.statusCode >= 400 && fe.statusCode < 500) {
    return {
      body: { type: 'about:blank', title: fe.name || 'Bad request', status: fe.statusCode, detail: fe.message },
      headers: {},
    };
  }
  return { body: problem('internal', 'The server failed to process the request; it may be retried.'), headers: {} };
}

/**
 * Install the problem+json error and not-found handlers. 5xx errors that
 * are not oncely's own are logged to stderr (their detail is not sent).
 */
export function installProblemHandlers(app: FastifyInstance): void {
  app.setErrorHandler((error: FastifyError, request, reply) => {
    const { body, headers } = problemOf(error);
    if (body.status >= 500 && !isOncelyError(error) && !(error instanceof ProblemError)) {
      console.error(`[reference] ${request.method} ${request.url} failed:`, error);
    }
    return sendProblem(reply, body, headers);
  });
  app.setNotFoundHandler((request, reply) =>
    sendProblem(reply, problem('not-found', `No route ${request.method} ${request.url.split('?')[0]}.`)),
  );
}

/**
 * Fastify's `frameworkErrors` option: errors raised before routing (an
 * undecodable URL), answered as problems like every other error.
 */
export function frameworkErrorProblem(error: FastifyError, _request: FastifyRequest, reply: FastifyReply): void {
  const body =
    error.code === 'FST_ERR_BAD_URL'
      ? problem('bad-request', 'The URL is not valid (a percent-encoding is broken).')
      : problemOf(error).body;
  void sendProblem(reply, body);
}

/**
 * Fastify's `clientErrorHandler` option: a request Node's HTTP parser
 * refused (headers too large, a timeout, broken HTTP), answered on the raw
 * socket with a problem and the connection closed.
 */
export function clientErrorProblem(error: Error & { code?: string }, socket: Socket): void {
  if (error.code === 'ECONNRESET' || socket.destroyed) return;
  const body =
    error.code === 'ERR_HTTP_REQUEST_TIMEOUT'
      ? problem('request-timeout', 'The request was not received in time.')
      : error.code === 'HPE_HEADER_OVERFLOW'
        ? problem('headers-too-large', 'The request headers exceed the size the server accepts.')
        : problem('bad-request', 'The request is not valid HTTP.');
  const text = JSON.stringify(body);
  if (socket.writable) {
    socket.write(
      `HTTP/1.1 ${body.status} ${STATUS_CODES[body.status]}\r\nConnection: close\r\n` +
        `Content-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(text)}\r\n\r\n${text}`,
    );
  }
  socket.destroy(error);
}
