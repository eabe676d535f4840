/** What happens to a finished request's outcome. */
export type OutcomeDecision = 'store' | 'release';

/**
 * Statuses below 500 that are released (a retry runs again) rather than
 * stored: the request had no effect and a retry may fare differently, once
 * credentials, permissions, a route or resource, or the server's load change.
 * 404 and 405 are here so that a request that found no route or resource
 * does not use up its key for the whole retention.
 */
export const RELEASED_4XX: ReadonlySet<number> = new Set([401, 403, 404, 405, 408, 409, 425, 429]);

/**
 * The default outcome policy: store and replay 2xx, 3xx and 4xx except 401,
 * 403, 404, 405, 408, 409, 425 and 429; release 5xx and those 4xx so that a
 * retry runs.
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

/**
 * Never replayed, even when listed in `replayHeaders`: headers that belong to
 * one connection, one request or one moment, or to a session, rather than to
 * the operation's result. A replay that carried them would hand one caller
 * another request's trace or request id, a stale CSRF token or credential, or
 * an out-of-date transport policy; the live stack sets its own on the replay.
 */
export const NEVER_REPLAYED: ReadonlySet<string> = new Set([
  // Per connection (hop-by-hop) or framing.
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
  // Transport policy of the server at that moment; it sends its current one.
  'alt-svc',
  'strict-transport-security',
  // Per request: ids, traces and timings.
  'x-request-id',
  'request-id',
  'x-correlation-id',
  'traceparent',
  'tracestate',
  'baggage',
  'x-trace-id',
  'x-amzn-trace-id',
  'x-amzn-requestid',
  'x-amz-request-id',
  'x-amz-id-2',
  'x-amz-cf-id',
  'cf-ray',
  'x-cloud-trace-context',
  'b3',
  'x-b3-traceid',
  'x-b3-spanid',
  'x-b3-parentspanid',
  'x-b3-sampled',
  'x-b3-flags',
  'uber-trace-id',
  'sentry-trace',
  'x-datadog-trace-id',
  'x-datadog-parent-id',
  'server-timing',
  'x-response-time',
  'x-runtime',
  // Per session: credentials, challenges and CSRF tokens.
  'authorization',
  'proxy-authorization',
  'cookie',
  'www-authenticate',
  'proxy-authenticate',
  'authentication-info',
  'proxy-authentication-info',
  'x-csrf-token',
  'x-xsrf-token',
  'csrf-token',
  // Per moment: rate limits and back-off.
  'retry-after',
  'ratelimit',
  'ratelimit-policy',
  'ratelimit-limit',
  'ratelimit-remaining',
  'ratelimit-reset',
  'x-ratelimit-limit',
  'x-ratelimit-remaining',
  'x-ratelimit-reset',
  // Set by oncely on the replay itself.
  'idempotent-replayed',
]);
