/**
 * `oncely/client`: a fetch wrapper that makes retries safe. Each call is one
 * logical operation with one `Idempotency-Key`, reused on every retry, so a
 * server running oncely (or any server honouring the key) applies it once.
 * See docs/client.md.
 *
 * @example
 * ```ts
 * import { createClient, deriveKey } from 'oncely/client';
 *
 * const client = createClient({ attemptTimeoutMs: 5_000, deadlineMs: 20_000 });
 * const res = await client.fetch('http://localhost:3000/payments', {
 *   method: 'POST',
 *   headers: { 'content-type': 'application/json' },
 *   body: JSON.stringify({ amount: 4200, currency: 'EUR' }),
 * });
 * console.log(res.status, res.key, res.attempts, res.replayed);
 * ```
 *
 * @module
 */

export { ClientRequestError } from '../errors/index.js';
export type { ClientFailureReason, ClientRequestErrorOptions } from '../errors/index.js';
export { backoffDelay, parseRetryAfter } from './backoff.js';
export type { BackoffOptions, Jitter } from './backoff.js';
export type { ClientBody } from './body.js';
export { OncelyResponse, createClient, idempotentFetch } from './client.js';
export type {
  ClientOptions,
  ClientRequestInit,
  FetchFunction,
  OncelyClient,
  OncelyFetch,
  RequestOptions,
  RetryReason,
  RetryRequest,
  RetryState,
} from './client.js';
export { deriveKey } from './derive.js';
export { IDEMPOTENT_METHODS, IN_FLIGHT_PROBLEM_TYPE, RETRYABLE_STATUSES, isNetworkError } from './retry.js';
