/**
 * Which failures the client retries: the retry table of DESIGN.md §6, as code.
 *
 * @module
 */

import { PROBLEM_TYPE_BASE } from '../errors/index.js';
import { parseRetryAfter } from './backoff.js';

/**
 * Statuses that are retried: the server says the request did not take effect,
 * or that it may succeed later.
 */
export const RETRYABLE_STATUSES: ReadonlySet<number> = new Set([408, 425, 429, 500, 502, 503, 504]);

/**
 * Methods RFC 9110 §9.2.2 defines as idempotent: retried without an
 * `Idempotency-Key`, because repeating them has the effect of sending them once.
 */
export const IDEMPOTENT_METHODS: ReadonlySet<string> = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE']);

/** The problem `type` of oncely's "still being processed" 409: the one 409 that is retried. */
export const IN_FLIGHT_PROBLEM_TYPE = `${PROBLEM_TYPE_BASE}in-flight`;

/** Error codes (Node, undici, node-fetch) that mean the connection failed or broke. */
const NETWORK_CODES: ReadonlySet<string> = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EHOSTDOWN',
  'EAI_AGAIN',
  'ENOTFOUND',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
]);

/** Messages of the `TypeError` that fetch implementations raise for a network failure. */
const NETWORK_MESSAGES: readonly RegExp[] = [
  /^fetch failed$/i, // Node (undici)
  /^failed to fetch$/i, // Chromium
  /^networkerror when attempting to fetch resource\.?$/i, // Firefox
  /^load failed$/i, // Safari
  /^network connection was lost\.?$/i, // Safari
  /^terminated$/i, // undici: the connection broke while the body was read
  /socket hang up/i, // node:http
  /other side closed/i, // undici
];

/**
 * True when `error` (or any error in its `cause` chain) is a network failure:
 * refused, reset or dropped connections, DNS failures, fetch's `TypeError`.
 * Other `TypeError`s (an invalid URL, a GET with a body) are programming
 * errors and are not retried.
 *
 * @example
 * ```ts
 * try { await fetch(url); } catch (e) { if (isNetworkError(e)) console.log('retry me'); }
 * ```
 */
export function isNetworkError(error: unknown): boolean {
  let current: unknown = error;
  for (let depth = 0; depth < 8 && typeof current === 'object' && current !== null; depth++) {
    const { code, message } = current as { code?: unknown; message?: unknown };
    if (typeof code === 'string' && NETWORK_CODES.has(code)) return true;
    if (typeof message === 'string' && NETWORK_MESSAGES.some((pattern) => pattern.test(message))) return true;
    current = (current as { cause?: unknown }).cause;
  }
  return false;
}

/** The verdict on one answer: retry it (after `retryAfterMs` when the server said so) or return it. */
export type ResponseVerdict = { retry: false } | { retry: true; retryAfterMs: number | undefined };

/** Bodies larger than this are not parsed to classify a 409 (a problem document is small). */
const MAX_PROBLEM_BYTES = 64 * 1024;

/**
 * Decides whether an HTTP answer is retried.
 *
 * - 408, 425, 429, 500, 502, 503, 504: retried.
 * - 409: retried only when it is the in-flight conflict: a problem document
 *   whose `type` is `https://oncely.dev/problems/in-flight`, or, from a server
 *   that does not use oncely's problem types, any 409 that carries
 *   `Retry-After` (the server itself says "later"). A 409 with any other oncely
 *   problem type (`key-reused`, `already-processed`…) is never retried, with or
 *   without `Retry-After`.
 * - everything else (400, 401, 403, 404, 422, 2xx…): returned as is.
 *
 * Reading a 409's body uses a clone, so `response` stays readable.
 *
 * @example
 * ```ts
 * const verdict = await judgeResponse(await fetch(url, { method: 'POST' }));
 * if (verdict.retry) console.log('retry after', verdict.retryAfterMs ?? 'backoff');
 * ```
 */
export async function judgeResponse(response: Response, now: number = Date.now()): Promise<ResponseVerdict> {
  const retryAfter = response.headers.get('retry-after');
  if (RETRYABLE_STATUSES.has(response.status)) {
    return { retry: true, retryAfterMs: parseRetryAfter(retryAfter, now) };
  }
  if (response.status !== 409) return { retry: false };
  const type = await problemType(response);
  if (type === IN_FLIGHT_PROBLEM_TYPE) return { retry: true, retryAfterMs: parseRetryAfter(retryAfter, now) };
  if (type?.startsWith(PROBLEM_TYPE_BASE)) return { retry: false };
  if (retryAfter !== null) return { retry: true, retryAfterMs: parseRetryAfter(retryAfter, now) };
  return { retry: false };
}

/** The `type` of a JSON problem document, read from a clone; undefined when there is none. */
async function problemType(response: Response): Promise<string | undefined> {
  const contentType = response.headers.get('content-type') ?? '';
  if (!/json/i.test(contentType) || response.body === null) return undefined;
  const length = Number(response.headers.get('content-length') ?? '0');
  if (length > MAX_PROBLEM_BYTES) return undefined;
  let text: string;
  try {
    text = await response.clone().text();
  } catch (error) {
    // An abort (timeout, deadline, caller) must reach the attempt loop; a
    // broken body just means "not a problem document".
    if (isAbort(error)) throw error;
    return undefined;
  }
  if (text.length > MAX_PROBLEM_BYTES) return undefined;
  try {
    const parsed: unknown = JSON.parse(text);
    const type = (parsed as { type?: unknown } | null)?.type;
    return typeof type === 'string' ? type : undefined;
  } catch {
    return undefined;
  }
}

function isAbort(error: unknown): boolean {
  const name = (error as { name?: unknown } | null)?.name;
  return name === 'AbortError' || name === 'TimeoutError';
}
