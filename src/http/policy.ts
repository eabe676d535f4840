/** What happens to a finished request's outcome. */
export type OutcomeDecision = 'store' | 'release';

/** Statuses below 500 that are released (a retry runs again) rather than stored. */
export const RELEASED_4XX: ReadonlySet<number> = new Set([401, 403, 408, 409, 425, 429]);

/**
 * The default outcome policy: store and replay 2xx, 3xx and 4xx except 401,
 * 403, 408, 409, 425 and 429; release 5xx and those 4xx so that a retry runs.
 */
export function defaultOutcomePolicy(status: number): OutcomeDecision {
  return status >= 500 || RELEASED_4XX.has(status) ? 'release' : 'store';
}

/** Response headers replayed by default; every other header is dropped from the record. */
export const DEFAULT_REPLAY_HEADERS: readonly string[] = [
  'content-type',
  'content-language',
  'content-encoding',
  'content-disposition',
  'location',
  'etag',
  'last-modified',
  'link',
];

/** Never replayed, even when listed: per-connection, per-request or per-moment headers. */
export const NEVER_REPLAYED: ReadonlySet<string> = new Set([
  'set-cookie',
  'date',
  'content-length',
  'transfer-encoding',
  'connection',
  'keep-alive',
  'proxy-connection',
  'upgrade',
  'trailer',
  'te',
  'x-request-id',
  'request-id',
  'x-correlation-id',
  'traceparent',
  'tracestate',
  'retry-after',
  'ratelimit',
  'ratelimit-policy',
  'ratelimit-limit',
  'ratelimit-remaining',
  'ratelimit-reset',
  'x-ratelimit-limit',
  'x-ratelimit-remaining',
  'x-ratelimit-reset',
  'idempotent-replayed',
]);
