/**
 * Every error oncely raises is an {@link OncelyError} with a stable `code`.
 * Each situation has its own subclass; the HTTP front doors turn them into
 * RFC 9457 problem responses using `status` and `type`.
 *
 * @module
 */

/** The stable, machine-readable codes of every oncely error. */
export type OncelyErrorCode =
  | 'ONCELY_KEY_MISSING'
  | 'ONCELY_KEY_MALFORMED'
  | 'ONCELY_SCOPE_MISSING'
  | 'ONCELY_FINGERPRINT_MISMATCH'
  | 'ONCELY_IN_FLIGHT'
  | 'ONCELY_ALREADY_PROCESSED'
  | 'ONCELY_NOT_REPLAYABLE'
  | 'ONCELY_STORE_UNAVAILABLE'
  | 'ONCELY_STORE_FULL'
  | 'ONCELY_LEASE_LOST'
  | 'ONCELY_BODY_INVALID'
  | 'ONCELY_BODY_TOO_LARGE'
  | 'ONCELY_CONFIG'
  | 'ONCELY_CLIENT_REQUEST_FAILED'
  | 'ONCELY_ROLLED_BACK'
  | 'ONCELY_DECRYPT_FAILED';

/** Base URI of the problem `type`s oncely answers with. */
export const PROBLEM_TYPE_BASE = 'https://oncely.dev/problems/';

/** Options accepted by every {@link OncelyError} constructor. */
export interface OncelyErrorOptions {
  /** The underlying error, when there is one. */
  cause?: unknown;
  /** Seconds after which a retry may succeed (sent as `Retry-After`). */
  retryAfter?: number;
}

/**
 * Base class of every error oncely throws.
 *
 * @example
 * ```ts
 * import { isOncelyError } from 'oncely';
 * try { await pay(); } catch (e) { if (isOncelyError(e)) console.log(e.code); }
 * ```
 */
export class OncelyError extends Error {
  /** Stable code; safe to switch on. */
  readonly code: OncelyErrorCode;
  /** HTTP status the front doors answer with. */
  readonly status: number;
  /** Short slug of the problem type (appended to {@link PROBLEM_TYPE_BASE}). */
  readonly slug: string;
  /** Human title of the problem (stable per type). */
  readonly title: string;
  /** Seconds after which a retry may succeed, when that is known. */
  readonly retryAfter: number | undefined;

  constructor(
    code: OncelyErrorCode,
    status: number,
    slug: string,
    title: string,
    detail: string,
    options: OncelyErrorOptions = {},
  ) {
    super(detail, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.slug = slug;
    this.title = title;
    this.retryAfter = options.retryAfter;
  }

  /** The problem `type` URI. */
  get type(): string {
    return PROBLEM_TYPE_BASE + this.slug;
  }
}

/** The request carried no `Idempotency-Key` where one is required. */
export class KeyMissingError extends OncelyError {
  constructor(detail = 'This request must carry an Idempotency-Key header.') {
    super('ONCELY_KEY_MISSING', 400, 'key-missing', 'Idempotency-Key is missing', detail);
  }
}

/** The `Idempotency-Key` is present but not acceptable; `detail` says why. */
export class KeyMalformedError extends OncelyError {
  constructor(detail: string) {
    super('ONCELY_KEY_MALFORMED', 400, 'key-malformed', 'Idempotency-Key is malformed', detail);
  }
}

/** The scope function returned nothing while a scope is required. */
export class ScopeMissingError extends OncelyError {
  constructor(detail = 'The idempotency scope (account or tenant) could not be determined for this request.') {
    super('ONCELY_SCOPE_MISSING', 400, 'scope-missing', 'Idempotency scope is missing', detail);
  }
}

/** The key was used before for a different request (another fingerprint). */
export class FingerprintMismatchError extends OncelyError {
  constructor(
    detail = 'This Idempotency-Key was already used with a different request; use a new key for a new operation.',
  ) {
    super(
      'ONCELY_FINGERPRINT_MISMATCH',
      422,
      'key-reused',
      'Idempotency-Key reused with a different request',
      detail,
    );
  }
}

/** Another request with the same key is still being processed. */
export class InFlightError extends OncelyError {
  /** When the current owner's lease ends (epoch ms), as the store reported it. */
  readonly leaseUntil: number;
  constructor(leaseUntil: number, retryAfter: number) {
    super(
      'ONCELY_IN_FLIGHT',
      409,
      'in-flight',
      'A request with this Idempotency-Key is still being processed',
      'Retry after the first request finishes; the retry will receive its answer.',
      { retryAfter },
    );
    this.leaseUntil = leaseUntil;
  }
}

/** Database-constraint strategy: the operation was already processed; its answer is not kept. */
export class AlreadyProcessedError extends OncelyError {
  constructor(detail = 'This operation was already processed; its response is not kept.') {
    super('ONCELY_ALREADY_PROCESSED', 409, 'already-processed', 'Operation already processed', detail);
  }
}

/** The operation completed, but its response was too large or streamed, so it cannot be replayed. */
export class NotReplayableError extends OncelyError {
  /** The status the original request was answered with. */
  readonly originalStatus: number;
  /** The original `Location`, when there was one. */
  readonly location: string | undefined;
  constructor(originalStatus: number, location?: string, detail?: string) {
    super(
      'ONCELY_NOT_REPLAYABLE',
      409,
      'completed-not-replayable',
      'Operation already completed',
      detail ??
        `The operation completed with status ${originalStatus}; its response was not stored (too large or streamed), so it is not repeated and cannot be replayed.`,
    );
    this.originalStatus = originalStatus;
    this.location = location;
  }
}

/** The store could not be reached, failed, or did not answer within the store timeout. */
export class StoreUnavailableError extends OncelyError {
  constructor(detail = 'The idempotency store is unavailable; nothing was done.', options: OncelyErrorOptions = {}) {
    super('ONCELY_STORE_UNAVAILABLE', 503, 'store-unavailable', 'Idempotency store unavailable', detail, {
      retryAfter: 1,
      ...options,
    });
  }
}

/** A bounded store (memory) has no room for a new claim. */
export class StoreFullError extends OncelyError {
  constructor(detail = 'The idempotency store is full of operations in progress; nothing was done.') {
    super('ONCELY_STORE_FULL', 503, 'store-full', 'Idempotency store full', detail, { retryAfter: 1 });
  }
}

/** The claim's lease was lost (taken over, or could not be renewed); the result will not be stored. */
export class LeaseLostError extends OncelyError {
  constructor(detail = 'The lease on this operation was lost; its outcome will not be stored.') {
    super('ONCELY_LEASE_LOST', 409, 'lease-lost', 'Lease lost', detail);
  }
}

/** The request body could not be parsed (for example invalid JSON). */
export class BodyInvalidError extends OncelyError {
  constructor(detail: string, options: OncelyErrorOptions = {}) {
    super('ONCELY_BODY_INVALID', 400, 'body-invalid', 'Request body is invalid', detail, options);
  }
}

/** The request body is larger than the configured limit. */
export class BodyTooLargeError extends OncelyError {
  constructor(limit: number) {
    super(
      'ONCELY_BODY_TOO_LARGE',
      413,
      'body-too-large',
      'Request body too large',
      `The request body exceeds the limit of ${limit} bytes.`,
    );
  }
}

/** oncely was configured wrongly (a programming error, raised at start-up where possible). */
export class ConfigError extends OncelyError {
  constructor(detail: string) {
    super('ONCELY_CONFIG', 500, 'config', 'oncely is misconfigured', detail);
  }
}

/**
 * A transaction that was to commit an effect together with its record rolled
 * back instead (for example a handler caught a failed statement, which
 * leaves a PostgreSQL transaction aborted). Nothing was stored; the message
 * or request runs again.
 */
export class RolledBackError extends OncelyError {
  constructor(detail: string, options: OncelyErrorOptions = {}) {
    super('ONCELY_ROLLED_BACK', 503, 'rolled-back', 'Transaction rolled back', detail, { retryAfter: 1, ...options });
  }
}

/**
 * True when `value` is an {@link OncelyError}, also across realms or duplicated
 * package copies (it checks the shape, not the prototype).
 */
export function isOncelyError(value: unknown): value is OncelyError {
  if (value instanceof OncelyError) return true;
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as { code?: unknown }).code === 'string' &&
    (value as { code: string }).code.startsWith('ONCELY_') &&
    typeof (value as { status?: unknown }).status === 'number'
  );
}

/**
 * Why an `oncely/client` operation ended without an answer: every attempt
 * failed on the network, the last attempt timed out, the overall deadline
 * passed, or fetch failed in a way that is not retried (an invalid URL…).
 */
export type ClientFailureReason = 'network' | 'timeout' | 'deadline' | 'unexpected';

/** What a {@link ClientRequestError} knows about the operation that failed. */
export interface ClientRequestErrorOptions {
  /** The Idempotency-Key sent on every attempt; undefined when none was sent. */
  key: string | undefined;
  /** How many attempts were made. */
  attempts: number;
  /** Why the client gave up. */
  reason: ClientFailureReason;
  /** The status of the last HTTP answer received, when one was received before the failure. */
  lastStatus?: number | undefined;
  /** The error of the last attempt. */
  cause?: unknown;
}

/**
 * An `oncely/client` operation got no HTTP answer it could return: network
 * failures or timeouts outlasted the retries, or the deadline passed. (HTTP
 * error statuses are returned as responses, not thrown; a caller's abort
 * rejects with the abort reason, like fetch.) The operation may or may not
 * have taken effect: retry it later with the same `key` to find out safely.
 *
 * @example
 * ```ts
 * import { ClientRequestError } from 'oncely';
 * try { await client.fetch(url, { method: 'POST', body }); }
 * catch (e) { if (e instanceof ClientRequestError) console.log(e.key, e.attempts, e.reason, e.cause); }
 * ```
 */
export class ClientRequestError extends OncelyError {
  /** The Idempotency-Key sent on every attempt (reuse it to retry the operation later). */
  readonly key: string | undefined;
  /** How many attempts were made. */
  readonly attempts: number;
  /** The status of the last HTTP answer received, if any. */
  readonly lastStatus: number | undefined;
  /** Why the client gave up. */
  readonly reason: ClientFailureReason;

  constructor(detail: string, options: ClientRequestErrorOptions) {
    const timedOut = options.reason === 'timeout' || options.reason === 'deadline';
    super(
      'ONCELY_CLIENT_REQUEST_FAILED',
      timedOut ? 504 : 502,
      'client-request-failed',
      'Downstream request failed',
      detail,
      { cause: options.cause },
    );
    this.key = options.key;
    this.attempts = options.attempts;
    this.lastStatus = options.lastStatus;
    this.reason = options.reason;
  }
}

/**
 * Why a sealed outcome could not be opened: its key id is not among the
 * configured keys, the authentication tag did not verify (another key under
 * the same id, tampered bytes, or an envelope moved to another record), the
 * envelope is malformed, or the outcome is plain text where only sealed
 * outcomes are accepted.
 */
export type DecryptFailureReason = 'unknown-key' | 'authentication' | 'malformed' | 'plaintext';

/**
 * A stored outcome is encrypted (`withEncryption` from
 * `oncely/stores/encryption`) and cannot be opened with the configured keys.
 * It is never replayed as garbage, and the operation is not run again (it
 * completed): the front doors answer 503, like a store that cannot answer,
 * until the right key is configured. It is not a {@link StoreUnavailableError},
 * so `failOpen` never runs the handler for it.
 *
 * @example
 * ```ts
 * import { DecryptFailedError } from 'oncely';
 * engine.on('storeError', ({ error }) => {
 *   if (error instanceof DecryptFailedError) console.error(error.reason, error.keyId, error.recordId);
 * });
 * ```
 */
export class DecryptFailedError extends OncelyError {
  /** The record whose outcome could not be opened. */
  readonly recordId: string;
  /** The key id named in the envelope, when it could be read. */
  readonly keyId: string | undefined;
  /** Why it could not be opened. */
  readonly reason: DecryptFailureReason;

  constructor(
    detail: string,
    options: { recordId: string; keyId?: string | undefined; reason: DecryptFailureReason; cause?: unknown },
  ) {
    super('ONCELY_DECRYPT_FAILED', 503, 'decrypt-failed', 'Stored outcome cannot be decrypted', detail, {
      cause: options.cause,
    });
    this.recordId = options.recordId;
    this.keyId = options.keyId;
    this.reason = options.reason;
  }
}
