/**
 * Request bodies, made replayable: every attempt of one operation must send the
 * same bytes, or the server sees a different fingerprint and answers 422.
 *
 * @module
 */

/**
 * What `init.body` may be: what fetch takes (`RequestInit['body']`: a string,
 * bytes, a Blob, FormData, URLSearchParams, a `ReadableStream`), or a Node
 * `Readable`/async iterable of bytes. Named through `RequestInit`, which the
 * DOM lib and @types/node both declare, rather than `BodyInit`, which only the
 * DOM lib does: Node-only projects compile these declarations too.
 */
export type ClientBody = RequestInit['body'] | AsyncIterable<Uint8Array> | undefined;

/** A body prepared for one or more attempts. */
export interface PreparedBody {
  /** `stream`: can be sent once only, so the operation is never retried. */
  readonly kind: 'none' | 'replayable' | 'stream';
  /** The body for the next attempt (a fresh copy where fetch would consume it). */
  make(): Exclude<ClientBody, undefined>;
  /** A `Content-Type` to send when the caller set none (FormData's boundary). */
  readonly contentType?: string;
}

const NONE: PreparedBody = { kind: 'none', make: () => null };

/**
 * Prepares `body` for replay. Strings, Blobs, ArrayBuffers and views,
 * URLSearchParams and FormData are replayable: bytes are copied once (so a
 * caller mutating its buffer between attempts changes nothing), and FormData
 * is encoded once (so every attempt carries the same multipart boundary, and
 * the same fingerprint). Streams (`ReadableStream`, Node `Readable`, any async
 * iterable) are consumed by the first attempt and are never retried.
 *
 * @example
 * ```ts
 * const body = await prepareBody(JSON.stringify({ amount: 100 }));
 * await fetch(url, { method: 'POST', body: body.make() });
 * ```
 */
export async function prepareBody(body: ClientBody): Promise<PreparedBody> {
  if (body === null || body === undefined) return NONE;
  if (typeof body === 'string') return { kind: 'replayable', make: () => body };
  if (body instanceof URLSearchParams) {
    const copy = new URLSearchParams(body);
    return { kind: 'replayable', make: () => new URLSearchParams(copy) };
  }
  if (body instanceof ArrayBuffer) {
    const bytes = new Uint8Array(body.slice(0));
    return { kind: 'replayable', make: () => bytes };
  }
  if (ArrayBuffer.isView(body)) {
    const bytes = new Uint8Array(body.buffer, body.byteOffset, body.byteLength).slice();
    return { kind: 'replayable', make: () => bytes };
  }
  if (typeof Blob !== 'undefined' && body instanceof Blob) return { kind: 'replayable', make: () => body };
  if (typeof FormData !== 'undefined' && body instanceof FormData) {
    const encoded = new Response(body);
    const bytes = new Uint8Array(await encoded.arrayBuffer());
    const contentType = encoded.headers.get('content-type') ?? undefined;
    return contentType === undefined
      ? { kind: 'replayable', make: () => bytes }
      : { kind: 'replayable', make: () => bytes, contentType };
  }
  if (isStream(body)) return { kind: 'stream', make: () => body };
  // Anything else fetch would stringify; a string is replayable.
  const text = String(body);
  return { kind: 'replayable', make: () => text };
}

/** True for a web `ReadableStream`, a Node `Readable` or any async iterable. */
export function isStream(body: unknown): boolean {
  if (typeof body !== 'object' || body === null) return false;
  return (
    typeof (body as { getReader?: unknown }).getReader === 'function' ||
    typeof (body as { [Symbol.asyncIterator]?: unknown })[Symbol.asyncIterator] === 'function'
  );
}
