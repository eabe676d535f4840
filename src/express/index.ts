/**
 * `Idempotency-Key` middleware for Express 4 and 5.
 *
 * @example
 * ```ts
 * import express from 'express';
 * import { idempotency } from 'oncely/express';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const app = express();
 * app.use(idempotency({ store: memoryStore(), scope: (req) => req.get('x-account') }));
 * app.post('/payments', express.json(), (req, res) => res.status(201).json({ id: 'pay_1' }));
 * ```
 * @module
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { NextFunction, Request, Response } from 'express';
import { BodyInvalidError, BodyTooLargeError, isOncelyError } from '../errors/index.js';
import {
  type HttpFinish,
  HttpIdempotency,
  type HttpIdempotencyOptions,
  type HttpRequestView,
  type HttpRun,
  type IdempotencyContext,
} from '../http/core.js';
import type { Settled } from '../engine/engine.js';
import type { HttpResponse } from '../http/outcome.js';
import { fieldLines } from '../http/headers.js';

export type { IdempotencyContext, RouteOverrides } from '../http/core.js';
export type { OutcomeDecision } from '../http/policy.js';

declare global {
  namespace Express {
    interface Request {
      /** The idempotent run of this request, when there is one (oncely). */
      idempotency?: IdempotencyContext;
    }
  }
}

/** Options of {@link idempotency}: see {@link HttpIdempotencyOptions}. */
export type ExpressIdempotencyOptions = HttpIdempotencyOptions<Request>;

type Body = HttpRequestView<Request>['body'];

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

function isJson(type: string | undefined): boolean {
  return type !== undefined && /^application\/([\w.+-]*\+)?json\b/i.test(type);
}

/**
 * True when something before oncely already took the body off the stream:
 * body-parser 1 (Express 4) and oncely itself set `_body`; body-parser 2
 * (Express 5) sets no flag but has consumed the stream. Reading a consumed
 * stream would yield an empty body (and a wrong fingerprint).
 */
function bodyTaken(req: IncomingMessage): boolean {
  return (req as { _body?: unknown })._body === true || req.readableDidRead || req.readableEnded;
}

// body-parser 1 sets `req.body = {}` even when it skips a content type it does
// not parse, leaving the stream unread: that placeholder is not a parsed body.
function isPlaceholder(body: unknown): boolean {
  if (body === undefined) return true;
  if (body === null || typeof body !== 'object' || Buffer.isBuffer(body)) return false;
  const proto = Object.getPrototypeOf(body);
  return (proto === Object.prototype || proto === null) && Object.keys(body).length === 0;
}

/**
 * Read the body ourselves (no body parser has read it), within `limit`
 * bytes. `req.body` gets our parse unless an earlier middleware already put
 * something there: that is never overwritten.
 */
async function readBody(req: Request, limit: number): Promise<Body> {
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
  // Mark the body parsed so that body parsers mounted later leave it alone
  // (body-parser 1 looks at `_body`; body-parser 2 sees the stream finished).
  (req as { _body?: boolean })._body = true;
  const keep = !isPlaceholder(req.body);
  if (isJson(type)) {
    let parsed: unknown;
    try {
      parsed = raw.length === 0 ? undefined : JSON.parse(raw.toString('utf8'));
    } catch (error) {
      throw new BodyInvalidError('The request body is not valid JSON.', { cause: error });
    }
    if (!keep) req.body = parsed;
    return parsed === undefined ? undefined : { json: parsed };
  }
  if (!keep) {
    if (type !== undefined && /^application\/x-www-form-urlencoded\b/i.test(type)) {
      req.body = Object.fromEntries(new URLSearchParams(raw.toString('utf8')));
    } else {
      req.body = raw;
    }
  }
  return { raw };
}

/** The body a parser left in `req.body`, for the fingerprint. */
function parsedBody(req: Request): Body {
  const body: unknown = req.body;
  if (body === undefined || body === null) return undefined;
  if (typeof body === 'string' || body instanceof Uint8Array) return { raw: body };
  return { json: body };
}

function send(res: Response, response: HttpResponse): void {
  res.statusCode = response.status;
  for (const [name, value] of response.headers) res.setHeader(name, value);
  res.end(typeof response.body === 'string' ? response.body : Buffer.from(response.body));
}

type WriteCallback = (error?: Error | null) => void;
type Chunk = string | Uint8Array;

function toBuffer(chunk: Chunk, encoding?: BufferEncoding): Buffer {
  return typeof chunk === 'string' ? Buffer.from(chunk, encoding ?? 'utf8') : Buffer.from(chunk);
}

type Warn = (message: string) => void;

/**
 * Hold the handler's response (status, headers, body, however it is written)
 * until the outcome is stored, then send it. A body over `maxStoredBytes`
 * streams out as it comes and completes with a marker instead.
 *
 * Every way the response can end reaches the core: `res.end` (finish), the
 * handler destroying the response (fail), the connection closing first
 * (gone, or fail once bytes went out). A handler that never answers while
 * its client stays connected keeps its claim, renewed: it may still be
 * running, and nothing tells a slow handler from a stuck one.
 */
function capture(res: ServerResponse, core: HttpIdempotency<Request>, run: HttpRun, warn: Warn): void {
  const original = {
    writeHead: res.writeHead,
    write: res.write,
    end: res.end,
    flushHeaders: res.flushHeaders,
    destroy: res.destroy,
  };
  // Loosely typed views of the originals, for calling them with the arguments we hold.
  const rawWrite = original.write as (this: ServerResponse, ...args: unknown[]) => boolean;
  const rawEnd = original.end as (this: ServerResponse, ...args: unknown[]) => ServerResponse;
  const chunks: Buffer[] = [];
  let size = 0;
  let streaming = false;
  // Set once the handler ended (finish) or destroyed (fail) its response: that path settles the run.
  let ended = false;
  const restore = (): void => {
    res.writeHead = original.writeHead;
    res.write = original.write;
    res.end = original.end;
    res.flushHeaders = original.flushHeaders;
    res.destroy = original.destroy;
  };
  const headersOf = (): Array<[string, string]> => core.captureHeaders((name) => res.getHeader(name));
  const startStreaming = (): void => {
    streaming = true;
    res.writeHead = original.writeHead;
    res.flushHeaders = original.flushHeaders;
    // The head goes out with the first chunk: from now on a failure completes with the marker.
    core.answered(run, res.statusCode, headersOf());
    for (const chunk of chunks.splice(0)) rawWrite.call(res, chunk);
  };

  res.once('close', () => {
    if (ended) return;
    if (streaming || res.headersSent) {
      // Part of the answer reached the client: never released, never run again.
      if (!streaming) core.answered(run, res.statusCode, headersOf());
      void core.fail(run, 'connection closed mid-response');
    } else {
      // Nothing went out, and the handler may still answer: that answer still
      // counts; if none comes, the lease runs out and a retry runs again.
      core.gone(run);
    }
  });

  res.writeHead = function writeHead(this: ServerResponse, status: number, ...rest: unknown[]) {
    this.statusCode = status;
    let headers = rest[0];
    if (typeof headers === 'string') {
      this.statusMessage = headers;
      headers = rest[1];
    }
    if (Array.isArray(headers)) {
      // Either [[name, value], …] or a flat [name, value, name, value, …].
      if (Array.isArray(headers[0])) for (const [n, v] of headers as string[][]) this.setHeader(n!, v!);
      else for (let i = 0; i + 1 < headers.length; i += 2) this.setHeader(String(headers[i]), String(headers[i + 1]));
    } else if (headers && typeof headers === 'object') {
      for (const [n, v] of Object.entries(headers)) if (v !== undefined) this.setHeader(n, v as string);
    }
    return this;
  } as ServerResponse['writeHead'];

  // The head is held with the body until the outcome is stored; it goes out then.
  res.flushHeaders = function flushHeaders() {} as ServerResponse['flushHeaders'];

  // The handler gave up on its response: a failure (released, or the marker once bytes went out).
  res.destroy = function destroy(this: ServerResponse, error?: Error) {
    if (!ended) {
      ended = true;
      restore();
      if (!streaming && this.headersSent) core.answered(run, this.statusCode, headersOf());
      void core.fail(run, 'response destroyed');
    }
    return original.destroy.call(this, error);
  } as ServerResponse['destroy'];

  res.write = function write(this: ServerResponse, chunk: Chunk, encoding?: BufferEncoding | WriteCallback, cb?: WriteCallback) {
    if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    if (streaming) return rawWrite.call(this, chunk, encoding, cb);
    const buffer = toBuffer(chunk, encoding);
    chunks.push(buffer);
    size += buffer.length;
    if (size > core.maxStoredBytes) startStreaming();
    if (cb) process.nextTick(cb);
    return true;
  } as ServerResponse['write'];

  res.end = function end(this: ServerResponse, chunk?: Chunk | (() => void), encoding?: BufferEncoding | (() => void), cb?: () => void) {
    if (typeof chunk === 'function') {
      cb = chunk;
      chunk = undefined;
    } else if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    ended = true;
    let tail: Buffer | undefined;
    if (chunk !== undefined && chunk !== null) {
      tail = toBuffer(chunk, encoding as BufferEncoding | undefined);
      if (!streaming) {
        chunks.push(tail);
        size += tail.length;
        if (size > core.maxStoredBytes) {
          chunks.pop();
          startStreaming();
        } else tail = undefined;
      }
    }
    restore();
    const headers = headersOf();
    const finished: HttpFinish = streaming
      ? { kind: 'unstorable', status: this.statusCode, headers }
      : { kind: 'response', response: { status: this.statusCode, headers, body: Buffer.concat(chunks) } };
    const body = streaming ? tail : Buffer.concat(chunks);
    const deliver = (settled: unknown): void => {
      // Something else ended the response meanwhile (a second `end`): do not write after it.
      if (this.writableEnded) return;
      // Transactional mode: an answer whose writes did not commit is not sent as if they had.
      const replacement = streaming ? undefined : core.replacement(run, settled as Settled | undefined, this.statusCode);
      if (replacement !== undefined) {
        for (const name of this.getHeaderNames()) this.removeHeader(name);
        this.statusCode = replacement.status;
        for (const [name, value] of replacement.headers) this.setHeader(name, value);
        rawEnd.call(this, replacement.body, cb);
        return;
      }
      if (body === undefined) rawEnd.call(this, cb);
      else rawEnd.call(this, body, cb);
    };
    let settling: Promise<unknown>;
    try {
      settling = core.finish(run, finished);
    } catch (error) {
      // A user's `outcome` function can throw synchronously.
      settling = Promise.reject(error);
    }
    settling
      .catch((error: unknown) => {
        // `finish` never rejects for store failures; anything else is a bug
        // somewhere. Nothing was stored: settle as a failure, and still answer.
        warn(`oncely: the response could not be settled and was sent unstored: ${messageOf(error)}`);
        return core.fail(run, 'finish failed');
      })
      .catch(() => undefined)
      .then(deliver)
      .catch((error: unknown) => warn(`oncely: sending the response failed: ${messageOf(error)}`));
    return this;
  } as ServerResponse['end'];
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Make POST and PATCH requests (by default) idempotent by their
 * `Idempotency-Key`. Mount it before the handlers it protects, after
 * authentication (the scope usually comes from it). Body parsers may be
 * mounted before or after it: when none has read the body yet, it reads and
 * parses the body itself (JSON and URL-encoded; others as a Buffer), within
 * `maxBodyBytes`, and later parsers leave it alone.
 *
 * A client that hangs up before the response stops the lease renewals: a
 * response the handler still produces is stored; otherwise the lease ends
 * and a retry runs again. A handler that destroys its response, or fails
 * after part of it was sent, settles as a failure.
 */
export function idempotency(options: ExpressIdempotencyOptions) {
  const core = new HttpIdempotency<Request>(options);
  const logger = options.logger ?? console;
  const warn: Warn = (message) => logger.warn(message);
  return async function oncelyExpress(req: Request, res: Response, next: NextFunction): Promise<void> {
    if (!core.applies(req.method)) return next();
    let run: HttpRun;
    try {
      const body = !bodyTaken(req) && hasBody(req) ? await readBody(req, core.maxBodyBytes) : parsedBody(req);
      const url = req.originalUrl ?? req.url;
      const q = url.indexOf('?');
      const begun = await core.begin({
        raw: req,
        method: req.method,
        path: q < 0 ? url : url.slice(0, q),
        query: q < 0 ? '' : url.slice(q + 1),
        header: (name) => fieldLines(req.headers[name]),
        body,
      });
      if (begun.kind === 'pass') return next();
      if (begun.kind === 'respond') return send(res, begun.response);
      run = begun.run;
    } catch (error) {
      if (isOncelyError(error)) {
        if (error instanceof BodyTooLargeError) res.setHeader('connection', 'close');
        return send(res, core.problem(error));
      }
      return next(error);
    }
    req.idempotency = run.context;
    capture(res, core, run, warn);
    // The client hung up while the claim was taken: its 'close' has passed already.
    if (res.destroyed) core.gone(run);
    next();
  };
}

export default idempotency;
