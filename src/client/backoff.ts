/**
 * How long the client waits between attempts: exponential backoff with jitter,
 * and the server's `Retry-After`.
 *
 * @module
 */

/** The two jitter strategies of the AWS Architecture Blog's "Exponential Backoff And Jitter". */
export type Jitter = 'full' | 'decorrelated';

/** The backoff settings, all in milliseconds except `factor`. */
export interface BackoffOptions {
  /** Smallest wait between two attempts. Default 100. */
  minDelayMs: number;
  /** Largest wait produced by backoff (does not cap `Retry-After`). Default 5000. */
  maxDelayMs: number;
  /** Growth per retry. Default 2. */
  factor: number;
  /** Jitter strategy. Default `'full'`. */
  jitter: Jitter;
}

/**
 * The wait before retry number `retry` (1 for the first retry).
 *
 * - `full`: uniform in `[minDelayMs, min(maxDelayMs, minDelayMs × factor^retry)]`,
 *   so the first retry waits 100–200 ms with the defaults, the second 100–400 ms…
 * - `decorrelated`: uniform in `[minDelayMs, previous × factor]`, capped at
 *   `maxDelayMs` (AWS's formula uses 3 as the factor).
 *
 * Jitter spreads the retries of many clients that failed at the same moment,
 * so that they do not hit a recovering server in waves.
 *
 * @param retry - 1 for the first retry.
 * @param previousMs - the previous wait (for `decorrelated`); `minDelayMs` before the first.
 * @param random - a source of numbers in [0, 1); `Math.random` by default.
 *
 * @example
 * ```ts
 * backoffDelay(1, 100, { minDelayMs: 100, maxDelayMs: 5000, factor: 2, jitter: 'full' }); // 100..200
 * ```
 */
export function backoffDelay(
  retry: number,
  previousMs: number,
  options: BackoffOptions,
  random: () => number = Math.random,
): number {
  const { minDelayMs, maxDelayMs, factor, jitter } = options;
  const floor = Math.min(minDelayMs, maxDelayMs);
  const ceiling =
    jitter === 'decorrelated'
      ? Math.min(maxDelayMs, Math.max(floor, previousMs) * factor)
      : Math.min(maxDelayMs, minDelayMs * factor ** retry);
  const high = Math.max(floor, ceiling);
  return Math.round(floor + random() * (high - floor));
}

/**
 * Parses a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
 * Returns the wait in milliseconds (never negative), or `undefined` when the
 * header is absent or not understood (the caller then falls back to backoff).
 *
 * @param value - the header value.
 * @param now - the current time in epoch ms (for HTTP-dates).
 *
 * @example
 * ```ts
 * parseRetryAfter('2'); // 2000
 * parseRetryAfter(new Date(Date.now() + 3000).toUTCString()); // about 3000 (1 s resolution)
 * ```
 */
export function parseRetryAfter(value: string | null | undefined, now: number = Date.now()): number | undefined {
  if (value == null) return undefined;
  const text = value.trim();
  if (text === '') return undefined;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  // HTTP-dates always name the weekday and GMT; this keeps bare numbers with
  // signs or decimals (not allowed by the grammar) from parsing as dates.
  if (!/[a-z]/i.test(text)) return undefined;
  const at = Date.parse(text);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, at - now);
}
