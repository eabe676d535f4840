/**
 * oncely: make retries safe. The engine, the store contract, the function
 * form and the errors. Front doors live in `oncely/express`,
 * `oncely/fastify`, `oncely/fetch`, `oncely/koa`, `oncely/nestjs`,
 * `oncely/lambda`, `oncely/client` and `oncely/consumer`; stores in
 * `oncely/stores/<name>`; OpenTelemetry in `oncely/otel`.
 *
 * @module
 */
export { Claim, Engine } from './engine/engine.js';
export type {
  BeginInput,
  Begun,
  EngineOptions,
  Operation,
  Performed,
  Refused,
  Settled,
  Settlement,
  StepContext,
  WaitOptions,
} from './engine/engine.js';
export type { Disposable, OncelyEventName, OncelyEvents, OncelyHooks, OncelyListener } from './engine/events.js';
export {
  canonicalJson,
  FINGERPRINT_VERSION,
  fingerprintOf,
  fingerprintV1,
  keyedRecordId,
  MAX_JSON_DEPTH,
  recordId,
  sortedQuery,
} from './engine/fingerprint.js';
export type { FingerprintInput, RecordIdSecret } from './engine/fingerprint.js';
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
  StoreSessions,
  StoreTransaction,
  StoreTransactions,
} from './engine/store.js';
export { newToken } from './engine/token.js';
export * from './errors/index.js';
export { KEY_HEADER, REPLAYED_HEADER } from './http/core.js';
export type { HttpIdempotencyOptions, IdempotencyContext, RouteOverrides } from './http/core.js';
export { DEFAULT_REPLAY_HEADERS, defaultOutcomePolicy, NEVER_REPLAYED, RELEASED_4XX } from './http/policy.js';
export type { OutcomeDecision } from './http/policy.js';
export { PROBLEM_CONTENT_TYPE } from './http/problem.js';
