/**
 * oncely: make retries safe. The engine, the store contract, the function
 * form and the errors. Front doors live in `oncely/express`,
 * `oncely/fastify`, `oncely/fetch`, `oncely/client` and `oncely/consumer`;
 * stores in `oncely/stores/<name>`.
 *
 * @module
 */
export { Claim, Engine } from './engine/engine.js';
export type { Begin, BeginInput, EngineOptions, WaitOptions } from './engine/engine.js';
export { OncelyEmitter } from './engine/events.js';
export type { Disposable, OncelyEventName, OncelyEvents, OncelyHooks, OncelyListener } from './engine/events.js';
export { canonicalJson, FINGERPRINT_VERSION, fingerprintOf, fingerprintV1, recordId, sortedQuery } from './engine/fingerprint.js';
export type { FingerprintInput } from './engine/fingerprint.js';
export { currentRun, idempotent } from './engine/idempotent.js';
export type { IdempotentOptions, RunContext } from './engine/idempotent.js';
export { MAX_KEY_LENGTH, parseIdempotencyKey } from './engine/key.js';
export type { KeyRules } from './engine/key.js';
export type {
  ClaimAcquired,
  ClaimCompleted,
  ClaimInProgress,
  ClaimInput,
  ClaimResult,
  CompletedRecord,
  IdempotencyStore,
  InProgressRecord,
  StoreCapabilities,
  StoredRecord,
} from './engine/store.js';
export { newToken } from './engine/token.js';
export * from './errors/index.js';
export { HttpIdempotency, KEY_HEADER, REPLAYED_HEADER } from './http/core.js';
export type {
  HttpBegin,
  HttpFinish,
  HttpIdempotencyOptions,
  HttpRequestView,
  HttpRun,
  IdempotencyContext,
  RouteOverrides,
} from './http/core.js';
export { decodeOutcome, encodeOutcome } from './http/outcome.js';
export type { HttpOutcome, HttpResponse } from './http/outcome.js';
export { DEFAULT_REPLAY_HEADERS, defaultOutcomePolicy, NEVER_REPLAYED, RELEASED_4XX } from './http/policy.js';
export type { OutcomeDecision } from './http/policy.js';
export { PROBLEM_CONTENT_TYPE, problemResponse } from './http/problem.js';
