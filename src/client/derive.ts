/**
 * Derived keys: a stable child key for each downstream call of an operation.
 *
 * @module
 */

import { createHash } from 'node:crypto';
import { ConfigError } from '../errors/index.js';

/** Version tag mixed into every derived key, so a future scheme cannot collide with this one. */
const DERIVE_VERSION = 'oncely-derive-v1';

/**
 * Derives the `Idempotency-Key` of one downstream call from the key of the
 * operation that makes it.
 *
 * When a handler that was called with key `K` is executed again (its first run
 * crashed after calling the payments service, its lease was taken over, its
 * answer was lost), it calls the payments service again with
 * `deriveKey(K, 'payment')`: the same child key as the first run, so the
 * payments service replays its answer instead of charging twice.
 *
 * The result is `SHA-256(version, parentKey, step)` in base64url: 43
 * characters of `[A-Za-z0-9_-]`, always a valid Idempotency-Key (1–255 visible
 * ASCII). It is deterministic (same inputs, same key, on every machine and
 * version of Node) and different steps give different keys. The parent key is
 * length-prefixed, so `('a:b', 'c')` and `('a', 'b:c')` give different keys.
 * Name each step after what it does and keep the name stable across deploys;
 * a step called twice in one operation needs two names (`'refund:1'`, `'refund:2'`).
 *
 * @param parentKey - the key of the operation being executed (non-empty).
 * @param step - names the downstream call within that operation (non-empty).
 * @throws {ConfigError} when either argument is empty or not a string.
 *
 * @example
 * ```ts
 * import { createClient, deriveKey } from 'oncely/client';
 * const client = createClient();
 * // inside POST /orders, whose own Idempotency-Key is `orderKey`:
 * await client.fetch('http://payments/payments', {
 *   method: 'POST',
 *   headers: { 'content-type': 'application/json', 'idempotency-key': deriveKey(orderKey, 'payment') },
 *   body: JSON.stringify({ amount: 4200, currency: 'EUR' }),
 * });
 * ```
 */
export function deriveKey(parentKey: string, step: string): string {
  if (typeof parentKey !== 'string' || parentKey === '') {
    throw new ConfigError('deriveKey: the parent key must be a non-empty string.');
  }
  if (typeof step !== 'string' || step === '') {
    throw new ConfigError('deriveKey: the step must be a non-empty string naming the downstream call.');
  }
  return createHash('sha256')
    .update(`${DERIVE_VERSION}\n${Buffer.byteLength(parentKey)}:${parentKey}\n${step}`, 'utf8')
    .digest('base64url');
}
