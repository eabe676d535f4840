/**
 * OpenTelemetry for oncely: metrics and one span per idempotent operation,
 * built on the engine's events, and a store wrapper that times every store
 * call. See docs/otel.md.
 *
 * `@opentelemetry/api` is an optional peer: it is loaded on the first call
 * of {@link instrument}, {@link otelHooks} or {@link instrumentStore}, never
 * when this module is imported. When it is not installed, all three are
 * no-ops (nothing is subscribed, the store is returned as it is), so the
 * request path costs nothing. The types below are small structural
 * interfaces: the SDK's `MeterProvider` and tracer providers fit them, and
 * this module's declarations import nothing from OpenTelemetry.
 *
 * @example
 * ```ts
 * import { Engine } from 'oncely';
 * import { instrument, instrumentStore } from 'oncely/otel';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * // After the OpenTelemetry SDK has started (it registers the global providers):
 * const engine = new Engine({ store: instrumentStore(memoryStore()) });
 * const otel = instrument(engine);
 * // … at shutdown:
 * otel.dispose();
 * ```
 * @module
 */
import { createRequire } from 'node:module';
import type { Engine } from '../engine/engine.js';
import type { Disposable, OncelyEventName, OncelyHooks, OncelyListener } from '../engine/events.js';
import type { ClaimInput, IdempotencyStore, StoreSessions, StoreTransactions } from '../engine/store.js';

/**
 * Attribute values oncely records: strings, numbers and booleans.
 *
 * @example
 * ```ts
 * const attributes: OtelAttributes = { 'oncely.store': 'redis', 'oncely.takeover': false };
 * ```
 */
export type OtelAttributes = Record<string, string | number | boolean>;

/**
 * The part of an OpenTelemetry counter or up-down counter oncely uses.
 *
 * @example
 * ```ts
 * const counter: CounterLike = meter.createCounter('oncely.claims');
 * counter.add(1, { 'oncely.takeover': false });
 * ```
 */
export interface CounterLike {
  add(value: number, attributes?: OtelAttributes): void;
}

/**
 * The part of an OpenTelemetry histogram oncely uses.
 *
 * @example
 * ```ts
 * const histogram: HistogramLike = meter.createHistogram('oncely.store.duration', { unit: 's' });
 * histogram.record(0.0012, { 'oncely.store.operation': 'claim' });
 * ```
 */
export interface HistogramLike {
  record(value: number, attributes?: OtelAttributes): void;
}

/**
 * Options of an instrument, as `@opentelemetry/api` takes them.
 *
 * @example
 * ```ts
 * const options: InstrumentOptionsLike = { unit: 's', advice: { explicitBucketBoundaries: [0.001, 0.01, 0.1] } };
 * ```
 */
export interface InstrumentOptionsLike {
  description?: string;
  unit?: string;
  /** Bucket boundaries a histogram should use (SDKs that do not know `advice` ignore it). */
  advice?: { explicitBucketBoundaries?: number[] };
}

/**
 * The part of an OpenTelemetry `Meter` oncely uses.
 *
 * @example
 * ```ts
 * const meter: MeterLike = metrics.getMeter('oncely'); // metrics from '@opentelemetry/api'
 * ```
 */
export interface MeterLike {
  createCounter(name: string, options?: InstrumentOptionsLike): CounterLike;
  createUpDownCounter(name: string, options?: InstrumentOptionsLike): CounterLike;
  createHistogram(name: string, options?: InstrumentOptionsLike): HistogramLike;
}

/**
 * The part of an OpenTelemetry `MeterProvider` oncely uses (the SDK's `MeterProvider` fits).
 *
 * @example
 * ```ts
 * import { MeterProvider } from '@opentelemetry/sdk-metrics';
 * const meterProvider: MeterProviderLike = new MeterProvider({ readers: [reader] });
 * ```
 */
export interface MeterProviderLike {
  getMeter(name: string, version?: string): MeterLike;
}

/**
 * The part of an OpenTelemetry `Span` oncely uses.
 *
 * @example
 * ```ts
 * const span: SpanLike = tracer.startSpan('oncely.operation', { attributes: { 'oncely.outcome': 'run' } });
 * span.setAttribute('oncely.settled', 'stored');
 * span.end();
 * ```
 */
export interface SpanLike {
  setAttribute(key: string, value: string | number | boolean): unknown;
  addEvent(name: string, attributes?: OtelAttributes): unknown;
  /** `code` 2 is `SpanStatusCode.ERROR`. */
  setStatus(status: { code: number; message?: string }): unknown;
  end(): void;
}

/**
 * The part of an OpenTelemetry `Tracer` oncely uses.
 *
 * @example
 * ```ts
 * const tracer: TracerLike = trace.getTracer('oncely'); // trace from '@opentelemetry/api'
 * ```
 */
export interface TracerLike {
  startSpan(name: string, options?: { attributes?: OtelAttributes }): SpanLike;
}

/**
 * The part of an OpenTelemetry `TracerProvider` oncely uses (the SDK's providers fit).
 *
 * @example
 * ```ts
 * import { BasicTracerProvider, SimpleSpanProcessor, InMemorySpanExporter } from '@opentelemetry/sdk-trace-base';
 * const tracerProvider: TracerProviderLike = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(new InMemorySpanExporter())] });
 * ```
 */
export interface TracerProviderLike {
  getTracer(name: string, version?: string): TracerLike;
}

/**
 * Options of {@link instrument}, {@link otelHooks} and {@link instrumentStore}.
 *
 * @example
 * ```ts
 * const options: OtelOptions = { meterProvider, tracerProvider, spans: true, storeName: 'redis' };
 * instrument(engine, options);
 * ```
 */
export interface OtelOptions {
  /**
   * Where metrics go [the global one, `metrics.getMeterProvider()`]. The
   * global provider is read when instrumenting: start the SDK first, or
   * pass the provider.
   */
  meterProvider?: MeterProviderLike;
  /** Where spans go [the global one, `trace.getTracerProvider()`]. */
  tracerProvider?: TracerProviderLike;
  /** Record spans [true]. `false` keeps the metrics only. */
  spans?: boolean;
  /**
   * The store's name, recorded as `oncely.store` on every metric and span
   * [with {@link instrument}: `engine.store.name`; with {@link otelHooks}: none].
   */
  storeName?: string;
}

/**
 * The name of the meter and tracer (the instrumentation scope).
 *
 * @example
 * ```ts
 * const oncelyMetrics = resourceMetrics.scopeMetrics.find((m) => m.scope.name === INSTRUMENTATION_SCOPE);
 * ```
 */
export const INSTRUMENTATION_SCOPE = 'oncely';

/**
 * The name of every operation span.
 *
 * @example
 * ```ts
 * const operations = exporter.getFinishedSpans().filter((span) => span.name === SPAN_NAME);
 * ```
 */
export const SPAN_NAME = 'oncely.operation';

/**
 * The names of the metrics, by what they count (see docs/otel.md).
 *
 * @example
 * ```ts
 * const claims = metrics.find((metric) => metric.descriptor.name === METRIC_NAMES.claims);
 * ```
 */
export const METRIC_NAMES = {
  claims: 'oncely.claims',
  takeovers: 'oncely.takeovers',
  replays: 'oncely.replays',
  conflicts: 'oncely.conflicts',
  mismatches: 'oncely.mismatches',
  inFlight: 'oncely.in_flight',
  settlements: 'oncely.settlements',
  leasesLost: 'oncely.leases_lost',
  storeErrors: 'oncely.store.errors',
  storeDuration: 'oncely.store.duration',
} as const;

/** `SpanStatusCode.ERROR` of `@opentelemetry/api` (a stable enum value). */
const STATUS_ERROR = 2;

/** Store latencies are short: buckets from 0.1 ms to 10 s, in seconds. */
const STORE_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

interface OtelApi {
  metrics: { getMeterProvider(): MeterProviderLike };
  trace: { getTracerProvider(): TracerProviderLike };
}

let loadedApi: OtelApi | null | undefined;

/**
 * `@opentelemetry/api`, or null when it is not installed. Loaded once, with
 * a synchronous require: hooks must exist before the engine is made. Its
 * CommonJS and ESM builds share one global registry, so the providers an
 * ESM app registered are the ones found here.
 */
function otelApi(): OtelApi | null {
  if (loadedApi !== undefined) return loadedApi;
  try {
    loadedApi = createRequire(import.meta.url)('@opentelemetry/api') as OtelApi;
  } catch (error) {
    const code = (error as { code?: unknown } | null)?.code;
    // Only absence means "no OpenTelemetry"; a broken install should be seen.
    if (code !== 'MODULE_NOT_FOUND' && code !== 'ERR_MODULE_NOT_FOUND') throw error;
    loadedApi = null;
  }
  return loadedApi;
}

/**
 * True when `@opentelemetry/api` can be loaded, so that instrumenting records something.
 *
 * @example
 * ```ts
 * if (!otelAvailable()) console.warn('npm install @opentelemetry/api to get oncely metrics');
 * ```
 */
export function otelAvailable(): boolean {
  return otelApi() !== null;
}

function meterOf(api: OtelApi, options: OtelOptions): MeterLike {
  return (options.meterProvider ?? api.metrics.getMeterProvider()).getMeter(INSTRUMENTATION_SCOPE);
}

/** What an error is, in one low-cardinality word: its `code` (oncely's, Node's), else its class name. */
function errorType(error: unknown): string {
  if (error !== null && typeof error === 'object') {
    const code = (error as { code?: unknown }).code;
    if (typeof code === 'string' && code !== '') return code;
    const name = (error as { name?: unknown }).name;
    if (typeof name === 'string' && name !== '') return name;
  }
  return typeof error;
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** One claim being run here: its span, open from `acquired` to its settlement. */
interface Open {
  span: SpanLike | undefined;
  /**
   * Earlier owners in this process whose lease this claim took over and
   * whose final (fenced) write has not come yet. Events carry no token:
   * while one is pending, fenced writes and lost leases are theirs.
   */
  earlierOwners: number;
  /** An earlier owner's write was fenced in this tick: the `leaseLost` it emits right after is its own too. */
  earlierJustFenced: boolean;
}

/** How a claim ended, as the `oncely.settled` attribute says it. */
type SettledAs = 'stored' | 'released' | 'fenced' | 'unsettled' | 'taken_over' | 'unobserved';

/** The listeners behind {@link instrument} and {@link otelHooks}, with the state they share. */
class Recorder {
  readonly hooks: Required<OncelyHooks>;
  readonly #open = new Map<string, Open>();
  readonly #tracer: TracerLike | undefined;
  readonly #base: OtelAttributes;
  readonly #claims: CounterLike;
  readonly #takeovers: CounterLike;
  readonly #replays: CounterLike;
  readonly #conflicts: CounterLike;
  readonly #mismatches: CounterLike;
  readonly #inFlight: CounterLike;
  readonly #settlements: CounterLike;
  readonly #leasesLost: CounterLike;
  readonly #storeErrors: CounterLike;

  constructor(api: OtelApi, options: OtelOptions, failOpen: boolean) {
    const meter = meterOf(api, options);
    this.#tracer = options.spans === false ? undefined : (options.tracerProvider ?? api.trace.getTracerProvider()).getTracer(INSTRUMENTATION_SCOPE);
    this.#base = options.storeName !== undefined ? { 'oncely.store': options.storeName } : {};
    this.#claims = meter.createCounter(METRIC_NAMES.claims, { unit: '{claim}', description: 'Claims won: operations that ran here' });
    this.#takeovers = meter.createCounter(METRIC_NAMES.takeovers, {
      unit: '{claim}',
      description: 'Claims won by taking over an expired lease or a dead session',
    });
    this.#replays = meter.createCounter(METRIC_NAMES.replays, { unit: '{request}', description: 'Stored outcomes replayed to duplicates' });
    this.#conflicts = meter.createCounter(METRIC_NAMES.conflicts, {
      unit: '{request}',
      description: 'Duplicates refused while the first copy was still running (in flight)',
    });
    this.#mismatches = meter.createCounter(METRIC_NAMES.mismatches, {
      unit: '{request}',
      description: 'Keys reused for a different request (fingerprint mismatch)',
    });
    this.#inFlight = meter.createUpDownCounter(METRIC_NAMES.inFlight, {
      unit: '{operation}',
      description: 'Operations claimed here and not yet settled',
    });
    this.#settlements = meter.createCounter(METRIC_NAMES.settlements, {
      unit: '{claim}',
      description: 'How claims ended: stored, released, fenced or unsettled',
    });
    this.#leasesLost = meter.createCounter(METRIC_NAMES.leasesLost, {
      unit: '{claim}',
      description: 'Leases that ended unrenewed or were taken over while the operation ran',
    });
    this.#storeErrors = meter.createCounter(METRIC_NAMES.storeErrors, {
      unit: '{error}',
      description: 'Store calls that failed or timed out',
    });
    const unavailable = failOpen ? 'bypass' : 'unavailable';
    this.hooks = {
      acquired: (e) => this.#acquired(e.id, e.takeover),
      replayed: (e) => {
        this.#replays.add(1, this.#base);
        this.#instant(e.id, 'replay');
      },
      conflict: (e) => {
        this.#conflicts.add(1, this.#base);
        this.#instant(e.id, 'in_flight', { 'oncely.lease_until': e.leaseUntil });
      },
      mismatch: (e) => {
        this.#mismatches.add(1, this.#base);
        this.#instant(e.id, 'mismatch');
      },
      stored: (e) => this.#settled(e.id, 'stored', { 'oncely.outcome_bytes': e.bytes }),
      released: (e) => this.#settled(e.id, 'released', { 'oncely.release_reason': e.reason }),
      fenced: (e) => {
        if (e.operation === 'renew') {
          const open = this.#open.get(e.id);
          const whose = open !== undefined && open.earlierOwners > 0 ? 'oncely.earlier_owner_fenced' : 'oncely.fenced';
          open?.span?.addEvent(whose, { 'oncely.fenced_operation': 'renew' });
          return;
        }
        this.#settled(e.id, 'fenced', { 'oncely.fenced_operation': e.operation }, 'another owner holds the record');
      },
      storeError: (e) => {
        this.#storeErrors.add(1, { ...this.#base, 'oncely.store.operation': e.operation, 'error.type': errorType(e.error) });
        if (e.id === undefined) return;
        // The claim (or the liveness check before a takeover) failed: this request is refused (or bypasses).
        if (e.operation === 'claim' || e.operation === 'alive') {
          this.#instant(e.id, unavailable, { 'error.type': errorType(e.error) }, errorMessage(e.error));
          return;
        }
        this.#open.get(e.id)?.span?.addEvent('oncely.store_error', {
          'oncely.store.operation': e.operation,
          'error.type': errorType(e.error),
          'exception.message': errorMessage(e.error),
        });
      },
      leaseLost: (e) => {
        this.#leasesLost.add(1, this.#base);
        const open = this.#open.get(e.id);
        if (open === undefined) return;
        if (open.earlierOwners > 0 || open.earlierJustFenced) {
          open.span?.addEvent('oncely.earlier_owner_lease_lost');
          return;
        }
        open.span?.addEvent('oncely.lease_lost');
        open.span?.setAttribute('oncely.lease_lost', true);
      },
      unsettled: (e) => this.#settled(e.id, 'unsettled', { 'error.type': errorType(e.error) }, errorMessage(e.error)),
    };
  }

  #acquired(id: string, takeover: boolean): void {
    this.#claims.add(1, { ...this.#base, 'oncely.takeover': takeover });
    if (takeover) this.#takeovers.add(1, this.#base);
    // An owner in this process whose lease was taken over (by this new claim): it ends here.
    const earlier = this.#open.get(id);
    if (earlier !== undefined) this.#end(id, earlier, 'taken_over', {}, 'the lease was taken over');
    this.#inFlight.add(1, this.#base);
    const span = this.#tracer?.startSpan(SPAN_NAME, {
      attributes: { ...this.#base, 'oncely.record_id': id, 'oncely.outcome': 'run', 'oncely.takeover': takeover },
    });
    this.#open.set(id, { span, earlierOwners: earlier === undefined ? 0 : earlier.earlierOwners + 1, earlierJustFenced: false });
  }

  /** A begin that ran nothing here: a span that starts and ends at once. */
  #instant(id: string, outcome: string, attributes: OtelAttributes = {}, error?: string): void {
    const span = this.#tracer?.startSpan(SPAN_NAME, {
      attributes: { ...this.#base, 'oncely.record_id': id, 'oncely.outcome': outcome, ...attributes },
    });
    if (span === undefined) return;
    if (error !== undefined) span.setStatus({ code: STATUS_ERROR, message: error });
    span.end();
  }

  #settled(id: string, settled: SettledAs, attributes: OtelAttributes, error?: string): void {
    this.#settlements.add(1, { ...this.#base, 'oncely.settled': settled });
    const open = this.#open.get(id);
    if (open === undefined) return;
    // A fenced write right after a same-process takeover is the earlier owner's, not this claim's.
    if (settled === 'fenced' && open.earlierOwners > 0) {
      open.earlierOwners--;
      open.earlierJustFenced = true;
      queueMicrotask(() => {
        open.earlierJustFenced = false;
      });
      open.span?.addEvent('oncely.earlier_owner_fenced', attributes);
      return;
    }
    this.#end(id, open, settled, attributes, error);
  }

  #end(id: string, open: Open, settled: SettledAs, attributes: OtelAttributes, error?: string): void {
    this.#open.delete(id);
    this.#inFlight.add(-1, this.#base);
    const span = open.span;
    if (span === undefined) return;
    span.setAttribute('oncely.settled', settled);
    for (const [key, value] of Object.entries(attributes)) span.setAttribute(key, value);
    if (error !== undefined) span.setStatus({ code: STATUS_ERROR, message: error });
    span.end();
  }

  /** Stop observing: claims still open end as `unobserved`, so that the in-flight count returns to zero. */
  close(): void {
    for (const [id, open] of this.#open) this.#end(id, open, 'unobserved', {});
  }
}

const EVENT_NAMES: readonly OncelyEventName[] = [
  'acquired',
  'replayed',
  'conflict',
  'mismatch',
  'stored',
  'released',
  'fenced',
  'storeError',
  'leaseLost',
  'unsettled',
];

/**
 * Instrument an engine: metrics and one span per operation, from its events,
 * until the result is disposed (claims still open then end as `unobserved`).
 * A no-op when `@opentelemetry/api` is not installed.
 *
 * Spans: `oncely.operation`, with `oncely.outcome` `run` (from the claim to
 * its settlement, `oncely.settled` stored, released, fenced, unsettled or
 * taken_over), or `replay`, `in_flight`, `mismatch`, `unavailable`
 * (`bypass` with `failOpen`), which end at once. Metrics: see
 * {@link METRIC_NAMES} and docs/otel.md. Store latency needs
 * {@link instrumentStore} (the engine emits no timing).
 *
 * @example
 * ```ts
 * import { Engine } from 'oncely';
 * import { instrument } from 'oncely/otel';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const engine = new Engine({ store: memoryStore() });
 * const otel = instrument(engine); // the global providers; or { meterProvider, tracerProvider }
 * otel.dispose();
 * ```
 */
export function instrument(engine: Engine, options: OtelOptions = {}): Disposable {
  const api = otelApi();
  if (api === null) return { dispose: () => {} };
  const recorder = new Recorder(api, { storeName: engine.store.name, ...options }, engine.failOpen);
  const subscriptions = EVENT_NAMES.map((name) => engine.on(name, recorder.hooks[name] as OncelyListener<typeof name>));
  let disposed = false;
  return {
    dispose: () => {
      if (disposed) return;
      disposed = true;
      for (const subscription of subscriptions) subscription.dispose();
      recorder.close();
    },
  };
}

/**
 * The same instrumentation as {@link instrument}, as `hooks` for a front
 * door or engine you do not construct yourself (`oncely(app, { store,
 * hooks })`). One hooks object per engine: it keeps its open claims by
 * record id. `{}` when `@opentelemetry/api` is not installed.
 *
 * @example
 * ```ts
 * import express from 'express';
 * import { idempotency } from 'oncely/express';
 * import { instrumentStore, otelHooks } from 'oncely/otel';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const app = express();
 * app.use(express.json());
 * app.use(idempotency({ store: instrumentStore(memoryStore()), hooks: otelHooks({ storeName: 'memory' }) }));
 * ```
 */
export function otelHooks(options: OtelOptions = {}): OncelyHooks {
  const api = otelApi();
  if (api === null) return {};
  return new Recorder(api, options, false).hooks;
}

/**
 * Wrap a store so that every call is timed: the histogram
 * `oncely.store.duration` (seconds), by `oncely.store.operation` (`claim`,
 * `complete`, `release`, `renew`, `get`, `claimMany`, `heartbeat`,
 * `alive`, `commit`, …), with `error.type` when the call failed. Sessions
 * and transactions pass through, timed too. Returns `store` itself when
 * `@opentelemetry/api` is not installed.
 *
 * @example
 * ```ts
 * import { Engine } from 'oncely';
 * import { instrumentStore } from 'oncely/otel';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const engine = new Engine({ store: instrumentStore(memoryStore()) });
 * ```
 */
export function instrumentStore(store: IdempotencyStore, options: Pick<OtelOptions, 'meterProvider' | 'storeName'> = {}): IdempotencyStore {
  const api = otelApi();
  if (api === null) return store;
  const histogram = meterOf(api, options).createHistogram(METRIC_NAMES.storeDuration, {
    unit: 's',
    description: 'Duration of store calls',
    advice: { explicitBucketBoundaries: STORE_BUCKETS },
  });
  const base: OtelAttributes = { 'oncely.store': options.storeName ?? store.name };
  const timed = <T>(operation: string, call: () => Promise<T>): Promise<T> => {
    const started = performance.now();
    const record = (error?: unknown): void => {
      const attributes: OtelAttributes = { ...base, 'oncely.store.operation': operation };
      if (error !== undefined) attributes['error.type'] = errorType(error);
      histogram.record((performance.now() - started) / 1000, attributes);
    };
    let pending: Promise<T>;
    try {
      pending = call();
    } catch (error) {
      record(error);
      throw error;
    }
    return pending.then(
      (value) => {
        record();
        return value;
      },
      (error: unknown) => {
        record(error ?? 'rejected');
        throw error;
      },
    );
  };

  // Closures over `store`, never `this` (like the other store wrappers).
  const wrapped: IdempotencyStore = {
    name: store.name,
    capabilities: store.capabilities,
    claim: (id: string, input: ClaimInput) => timed('claim', () => store.claim(id, input)),
    renew: (id, token, leaseMs) => timed('renew', () => store.renew(id, token, leaseMs)),
    complete: (id, token, outcome, ttlMs) => timed('complete', () => store.complete(id, token, outcome, ttlMs)),
    release: (id, token) => timed('release', () => store.release(id, token)),
    get: (id) => timed('get', () => store.get(id)),
    delete: (id) => timed('delete', () => store.delete(id)),
    purgeExpired: (limit) => timed('purgeExpired', () => store.purgeExpired(limit)),
    close: () => store.close(),
  };
  const claimMany = store.claimMany;
  if (claimMany !== undefined) wrapped.claimMany = (ids, input) => timed('claimMany', () => claimMany.call(store, ids, input));
  const sessions = store.sessions;
  if (sessions !== undefined) {
    const timedSessions: StoreSessions = {
      heartbeat: (session, ttlMs) => timed('heartbeat', () => sessions.heartbeat(session, ttlMs)),
      alive: (session) => timed('alive', () => sessions.alive(session)),
      end: (session) => timed('end', () => sessions.end(session)),
    };
    Object.assign(wrapped, { sessions: timedSessions });
  }
  const transactions = store.transactions;
  if (transactions !== undefined) {
    const timedTransactions: StoreTransactions = {
      async open(id, token) {
        const transaction = await timed('transaction', () => transactions.open(id, token));
        return {
          client: transaction.client,
          commit: (outcome, ttlMs) => timed('commit', () => transaction.commit(outcome, ttlMs)),
          rollback: () => timed('rollback', () => transaction.rollback()),
        };
      },
    };
    Object.assign(wrapped, { transactions: timedTransactions });
  }
  return wrapped;
}
