/**
 * The raw Node response under Nest, held until its outcome is stored. Both
 * Nest platforms write to a Node `ServerResponse` in the end (Express's `res`
 * is one; Fastify's `reply.raw`), whatever produced the answer: the value a
 * handler returned, an exception filter, `@Res()`, `@Redirect()`, a
 * `StreamableFile`. Watching it settles every path with what really goes out.
 * The rules are oncely/express's (see there); this adds a stream mode.
 *
 * @internal
 * @module
 */
import type { ServerResponse } from 'node:http';
import type { HttpFinish, HttpIdempotency, HttpRun } from '../http/core.js';

type WriteCallback = (error?: Error | null) => void;
type Chunk = string | Uint8Array;
type Warn = (message: string) => void;

/** What the interceptor can still tell the capture once it knows the handler's value. */
export interface Capture {
  /**
   * The answer is a stream (a `StreamableFile`, an `@Sse()` route): its head
   * and bytes go out as they come; the run completes with the marker when
   * the first of them goes out. If `source` fails before that, the answer
   * sent in its place (the framework's error) releases the run instead.
   */
  stream(source?: { once(event: 'error', listener: () => void): unknown }): void;
}

function toBuffer(chunk: Chunk, encoding?: BufferEncoding): Buffer {
  return typeof chunk === 'string' ? Buffer.from(chunk, encoding ?? 'utf8') : Buffer.from(chunk);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Apply the headers given to `writeHead` (an object, or a flat or nested array) with `setHeader`. */
function applyHeaders(res: ServerResponse, headers: unknown): void {
  if (Array.isArray(headers)) {
    if (Array.isArray(headers[0])) for (const [n, v] of headers as string[][]) res.setHeader(n!, v!);
    else for (let i = 0; i + 1 < headers.length; i += 2) res.setHeader(String(headers[i]), String(headers[i + 1]));
  } else if (headers && typeof headers === 'object') {
    for (const [n, v] of Object.entries(headers)) if (v !== undefined) res.setHeader(n, v as string);
  }
}

/**
 * Hold the response (status, headers, body, however it is written) until
 * the outcome is stored, then send it. A body over `maxStoredBytes`, or any
 * body once {@link Capture.stream} was called, goes out as it comes, and
 * the run completes with a marker.
 *
 * Every way the response can end reaches the core: `end` (finish), the
 * response destroyed (fail), the connection closing first (gone, or fail
 * once bytes went out).
 */
export function capture<R>(res: ServerResponse, core: HttpIdempotency<R>, run: HttpRun, warn: Warn): Capture {
  const original = {
    writeHead: res.writeHead,
    write: res.write,
    end: res.end,
    flushHeaders: res.flushHeaders,
    destroy: res.destroy,
  };
  const rawWrite = original.write as (this: ServerResponse, ...args: unknown[]) => boolean;
  const rawEnd = original.end as (this: ServerResponse, ...args: unknown[]) => ServerResponse;
  const rawWriteHead = original.writeHead as (this: ServerResponse, ...args: unknown[]) => ServerResponse;
  const chunks: Buffer[] = [];
  let size = 0;
  // Pass the head and every byte through as they come (a stream).
  let streamMode = false;
  // The head went out: from here on a failure completes with the marker.
  let streaming = false;
  // The stream source failed before anything went out.
  let sourceFailed = false;
  // The response ended (finish) or was destroyed (fail): that path settles the run.
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
    if (streaming) return;
    streaming = true;
    res.writeHead = original.writeHead;
    res.flushHeaders = original.flushHeaders;
    // After a failed source, what goes out is the error answer in its place.
    if (!sourceFailed) core.answered(run, res.statusCode, headersOf());
    for (const chunk of chunks.splice(0)) rawWrite.call(res, chunk);
  };

  res.once('close', () => {
    if (ended) return;
    if (sourceFailed) {
      void core.fail(run, 'stream failed before its first byte');
    } else if (streaming || res.headersSent) {
      // Part of the answer reached the client: never released, never run again.
      if (!streaming) core.answered(run, res.statusCode, headersOf());
      void core.fail(run, 'connection closed mid-response');
    } else {
      // Nothing went out, and the handler may still answer: that answer
      // still counts; if none comes, the lease runs out and a retry runs.
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
    applyHeaders(this, headers);
    if (!streamMode) return this;
    // A stream's head goes out now (an SSE client waits for it).
    startStreaming();
    return rawWriteHead.call(this, this.statusCode, this.statusMessage);
  } as ServerResponse['writeHead'];

  res.flushHeaders = function flushHeaders(this: ServerResponse) {
    if (!streamMode) return;
    startStreaming();
    original.flushHeaders.call(this);
  } as ServerResponse['flushHeaders'];

  res.destroy = function destroy(this: ServerResponse, error?: Error) {
    if (!ended) {
      ended = true;
      restore();
      if (!streaming && !sourceFailed && this.headersSent) core.answered(run, this.statusCode, headersOf());
      void core.fail(run, 'response destroyed');
    }
    return original.destroy.call(this, error);
  } as ServerResponse['destroy'];

  res.write = function write(this: ServerResponse, chunk: Chunk, encoding?: BufferEncoding | WriteCallback, cb?: WriteCallback) {
    if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    if (!streaming && streamMode) startStreaming();
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
      tail = toBuffer(chunk, (encoding ?? undefined) as BufferEncoding | undefined);
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
    const body = streaming ? tail : Buffer.concat(chunks);
    const deliver = (): void => {
      // Something else ended the response meanwhile (a second `end`): do not write after it.
      if (this.writableEnded) return;
      if (body === undefined) rawEnd.call(this, cb);
      else rawEnd.call(this, body, cb);
    };
    let settling: Promise<unknown>;
    try {
      if (sourceFailed) {
        // The stream failed before its first byte: this is the error answer
        // sent in its place. Nothing of the real answer reached the client.
        settling = core.fail(run, 'stream failed before its first byte');
      } else {
        const finished: HttpFinish = streaming
          ? { kind: 'unstorable', status: this.statusCode, headers }
          : { kind: 'response', response: { status: this.statusCode, headers, body: body ?? Buffer.alloc(0) } };
        settling = core.finish(run, finished);
      }
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

  return {
    stream(source) {
      if (ended) return;
      streamMode = true;
      source?.once('error', () => {
        if (!streaming) sourceFailed = true;
      });
    },
  };
}
