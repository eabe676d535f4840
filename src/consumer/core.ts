import { type Begun, type Claim, type Engine, engineFrom, type Performed, type StepContext, type WaitOptions } from '../engine/engine.js';
import { type RecordIdSecret, recordIdFor } from '../engine/fingerprint.js';
import { type Disposable, TypedEmitter } from '../engine/events.js';
import type { IdempotencyStore } from '../engine/store.js';
import { isThenable } from '../engine/thenable.js';
import { ConfigError, RolledBackError, StoreUnavailableError } from '../errors/index.js';

/**
 * What a consumer handler receives for one message.
 *
 * @example
 * ```ts
 * const handler = async ({ message, id, signal, takeover }: ConsumerContext<Order>) => ship(message, { signal });
 * ```
 */
export interface ConsumerContext<M> {
  /** The broker's message, untouched. */
  message: M;
  /** The message id the record is keyed by (the broker's natural id, or what `messageId` returned). */
  id: string;
  /** The record id in the store: `recordId(id, '', 'consumer:' + name)`. */
  recordId: string;
  /** Aborts when the lease is lost (another worker took the message over): stop early, the outcome will not be stored. */
  signal: AbortSignal;
  /** True when an earlier attempt crashed or stalled holding this message and this run took over its lease. */
  takeover: boolean;
  /**
   * Transactional mode (SQL stores): the driver's handle inside one
   * transaction opened for this message; writes through it commit together
   * with the message's record, before the acknowledgement. If the commit
   * fails, nothing happened and the message is not acknowledged.
   */
  transaction<C = unknown>(): Promise<C>;
  /** A recovery point (see `Claim.step`): `fn` runs once for this message; a redelivery resumes after it. */
  step<T>(name: string, fn: (step: StepContext) => T | Promise<T>): Promise<T>;
}

/**
 * The user's message handler. Throwing means failure: the claim is released and the broker's retry or dead-letter path applies.
 *
 * @example
 * ```ts
 * const handler: ConsumerHandler<Order> = async ({ message }) => { await ship(message); };
 * ```
 */
export type ConsumerHandler<M> = (context: ConsumerContext<M>) => unknown;

/**
 * What happened to one message, and so what the adapter does with it:
 * - `processed`: the handler ran and its completion was stored: acknowledge.
 * - `duplicate`: it completed before (here or elsewhere): acknowledge without running.
 * - `in_flight`: another worker holds it right now: not run; leave it for redelivery (nak with delay, or leave pending).
 * - `failed`: the handler threw; the claim was released: the broker's retry or dead-letter path.
 * - `store_error`: the store is down or too slow: not run (or not recorded); do not acknowledge.
 * - `fenced`: the handler ran but the lease was lost meanwhile, so its completion was not stored: do not acknowledge.
 * - `skipped`: batch mode only: not run because an earlier message of the batch broke the run (ordered brokers).
 *
 * @example
 * ```ts
 * if (verdict.action === 'in_flight') msg.nak(1_000);
 * ```
 */
export type ConsumerAction = 'processed' | 'duplicate' | 'in_flight' | 'failed' | 'store_error' | 'fenced' | 'skipped';

/**
 * The verdict on one message.
 *
 * @example
 * ```ts
 * const verdict = await consumer.handle(msg, msg.properties.messageId);
 * if (shouldAcknowledge(verdict)) channel.ack(msg);
 * ```
 */
export interface ConsumerVerdict {
  /** What happened (see {@link ConsumerAction}). */
  action: ConsumerAction;
  /** The message id. */
  id: string;
  /** The record id. */
  recordId: string;
  /** The handler's error (`failed`) or the store's (`store_error`). */
  error?: unknown;
  /** `in_flight`: when the other worker's lease ends (epoch ms, store clock). */
  leaseUntil?: number;
  /** `processed`: whether this run took over a crashed worker's lease. */
  takeover?: boolean;
}

/**
 * True when the broker should be told the message is done (`processed` or
 * `duplicate`); every other verdict leaves it for redelivery.
 *
 * @example
 * ```ts
 * if (shouldAcknowledge(await consumer.handle(msg, id))) msg.ack();
 * ```
 */
export function shouldAcknowledge(verdict: ConsumerVerdict): boolean {
  return verdict.action === 'processed' || verdict.action === 'duplicate';
}

/**
 * Events of a consumer, by name, with what they carry.
 *
 * @example
 * ```ts
 * consumer.on('inFlight', (e: ConsumerEvents['inFlight']) => log.info('held elsewhere until', e.leaseUntil));
 * ```
 */
export interface ConsumerEvents {
  /** The handler ran and its completion was stored. */
  processed: { id: string; recordId: string; takeover: boolean; ms: number };
  /** A completed message arrived again and was acknowledged without running. */
  duplicate: { id: string; recordId: string };
  /** A message arrived while another worker held it; it is left for redelivery. */
  inFlight: { id: string; recordId: string; leaseUntil: number };
  /** The handler failed; its claim was released so that the broker's retry or dead-letter path applies. */
  released: { id: string; recordId: string; error: unknown };
  /** The lease was lost while the handler ran; its completion was not stored. */
  fenced: { id: string; recordId: string };
  /** The store failed or timed out; the message was not run (or its completion not recorded) and is left for redelivery. */
  storeError: { id: string | undefined; recordId: string | undefined; operation: string; error: unknown };
  /** The adapter's "still working" signal to the broker failed (logged, never fatal). */
  workingError: { id: string; error: unknown };
  /** A message had no usable id (the `messageId` function returned nothing or threw); it took the broker's failure path unrun. */
  missingId: { error: unknown };
  /** The adapter could not talk to the broker (ack, nack, read); the message will be redelivered. */
  brokerError: { id: string | undefined; operation: string; error: unknown };
}

/**
 * Names of the consumer events.
 *
 * @example
 * ```ts
 * const names: ConsumerEventName[] = ['processed', 'duplicate'];
 * ```
 */
export type ConsumerEventName = keyof ConsumerEvents;

/**
 * Listeners given up front, one optional function per event.
 *
 * @example
 * ```ts
 * const hooks: ConsumerHooks = { duplicate: ({ id }) => metrics.increment('consumer.duplicate', { id }) };
 * ```
 */
export type ConsumerHooks = { [E in ConsumerEventName]?: (event: ConsumerEvents[E]) => void };

/**
 * Options shared by the consumer core and every adapter.
 *
 * @example
 * ```ts
 * const options: ConsumerOptions<Order> = { name: 'ship-orders', store, leaseMs: 10_000, handler: async ({ message }) => ship(message) };
 * ```
 */
export interface ConsumerOptions<M> {
  /** The consumer's name: records are keyed by (name, message id), so two consumers of one message each handle it once. */
  name: string;
  /** The message handler. */
  handler: ConsumerHandler<M>;
  /** An engine to share; otherwise one is made from `store` and the options below. */
  engine?: Engine;
  /** Where records live (required unless `engine` is given). Use a shared store when several processes consume. */
  store?: IdempotencyStore;
  /** Lease length, ms; renewed while the handler runs. Default 30 000. */
  leaseMs?: number;
  /**
   * How long a handled message id is remembered, ms. Default 24 h. Keep it
   * longer than the broker can redeliver a message (retention, retries).
   */
  ttlMs?: number;
  /** Longest wait for one store operation, ms. Default 2 000. */
  storeTimeoutMs?: number;
  /**
   * How often the adapter's "still working" signal is sent while a handler
   * runs, ms. Default: a third of the lease (adapters lower it below the
   * broker's own ack wait).
   */
  workingIntervalMs?: number;
  /** Event listeners. */
  /** Keyed record ids: an HMAC-SHA-256 of (name, message id) under this secret (16+ bytes). */
  secret?: RecordIdSecret;
  hooks?: ConsumerHooks;
}

/**
 * One message of a batch.
 *
 * @example
 * ```ts
 * const items: BatchItem<Entry>[] = entries.map((e) => ({ message: e, id: e.fields.id }));
 * ```
 */
export interface BatchItem<M> {
  message: M;
  /** Its message id. */
  id: string;
}

/**
 * Per-call options of {@link IdempotentConsumer.handle}.
 *
 * @example
 * ```ts
 * await consumer.handle(msg, id, { working: () => msg.working() });
 * ```
 */
export interface HandleOptions {
  /** The broker's "still working" signal (JetStream `working()`, a Kafka heartbeat…), called periodically while the handler runs. */
  working?: () => unknown;
  /**
   * Wait for a copy that is in flight elsewhere to settle, then answer its
   * verdict (`duplicate`, or run if it was released), instead of answering
   * `in_flight` at once. Default `false`: adapters leave such a copy to the
   * broker's redelivery rather than hold a delivery slot. The inbox
   * (`oncely/consumer/inbox`), called directly, waits.
   */
  wait?: WaitOptions | false;
}

/**
 * Per-call options of {@link IdempotentConsumer.handleBatch}.
 *
 * @example
 * ```ts
 * await consumer.handleBatch(items, { stopAtFirstBreak: true, working: () => heartbeat() });
 * ```
 */
export interface BatchOptions extends Omit<HandleOptions, 'wait'> {
  /**
   * Stop at the first message that is not handled (in flight, failed, store
   * error, fenced): later messages are not run (verdict `skipped`, their
   * claims released). For ordered logs (Kafka partitions). Default false.
   */
  stopAtFirstBreak?: boolean;
  /** Asked before each message; answering false skips the rest (e.g. Kafka's `isRunning() && !isStale()`). */
  shouldContinue?: () => boolean;
  /** Told each verdict as soon as it is known, in order (e.g. to resolve a Kafka offset at once). */
  onVerdict?: (verdict: ConsumerVerdict, index: number) => unknown;
  /**
   * Let each completion travel to the store while the next handler runs,
   * and answer once all are stored (acknowledge after the batch). Fewer
   * waits per message; ignored with `stopAtFirstBreak`. Default false.
   */
  overlapCompletion?: boolean;
}

// What a completed message stores: consumers replay nothing, only "done".
const STORED_OUTCOME = '{}';

/** A begun message that will not run here. */
type NotRun = Exclude<Begun, { kind: 'run' }>;

/** A handler started under its claim: `ran` when the handler returned or threw, `verdict` once the claim is settled. */
interface Performing {
  ran: Promise<void>;
  verdict: Promise<ConsumerVerdict>;
}

/**
 * The broker-neutral idempotent consumer: claim, run, complete, and only then
 * tell the adapter to acknowledge. Adapters (`oncely/consumer/amqp`, `nats`,
 * `redis-streams`, `kafka`) translate its verdicts into acks, naks and offsets.
 * The claim lifecycle itself (lease renewal, fencing, settling once) is the
 * engine's: the consumer begins each message on the engine and runs the
 * handler with `claim.perform`.
 *
 * @example
 * ```ts
 * import { IdempotentConsumer, shouldAcknowledge } from 'oncely/consumer';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const consumer = new IdempotentConsumer<{ id: string; body: string }>({
 *   name: 'emails',
 *   store: memoryStore(),
 *   handler: async ({ message }) => sendEmail(message.body),
 * });
 * const verdict = await consumer.handle(msg, msg.id);
 * if (shouldAcknowledge(verdict)) ack(msg);
 * ```
 */
export class IdempotentConsumer<M> {
  /** The consumer's name. */
  readonly name: string;
  /** The engine (store, lease, timeouts). */
  readonly engine: Engine;
  readonly #handler: ConsumerHandler<M>;
  readonly #recordId: (key: string, scope?: string, namespace?: string) => string;
  readonly #workingIntervalMs: number;
  readonly #events = new TypedEmitter<ConsumerEvents>();
  readonly #engineListener: { dispose(): void };

  constructor(options: ConsumerOptions<M>) {
    if (typeof options.name !== 'string' || options.name.length === 0) throw new ConfigError('A consumer needs a name.');
    if (typeof options.handler !== 'function') throw new ConfigError('A consumer needs a handler function.');
    this.name = options.name;
    this.#handler = options.handler;
    this.#recordId = recordIdFor(options.secret);
    // The consumer's `hooks` are its own events, not the engine's: only the store and its durations follow the engine rule.
    const { engine, store, leaseMs, ttlMs, storeTimeoutMs } = options;
    this.engine = engineFrom({ engine, store, leaseMs, ttlMs, storeTimeoutMs }, `Consumer ${JSON.stringify(options.name)}`);
    this.#workingIntervalMs = options.workingIntervalMs ?? Math.max(10, Math.floor((options.leaseMs ?? this.engine.leaseMs) / 3));
    for (const [name, listener] of Object.entries(options.hooks ?? {})) {
      if (typeof listener === 'function') this.on(name as 'processed', listener as (event: ConsumerEvents['processed']) => void);
    }
    // Store failures seen by the engine (claims, renewals, completions) surface as consumer events too.
    this.#engineListener = this.engine.on('storeError', (event) =>
      this.#events.emit('storeError', { ...event, recordId: event.id, id: undefined }),
    );
  }

  /**
   * Stop listening to the engine (matters when the engine is shared and
   * consumers come and go). The adapters' `stop()` calls it.
   *
   * @example
   * ```ts
   * consumer.close();
   * ```
   */
  close(): void {
    this.#engineListener.dispose();
  }

  /** The record id of a message id for this consumer. */
  recordIdOf(messageId: string): string {
    return this.#recordId(messageId, '', `consumer:${this.name}`);
  }

  /**
   * Subscribe to an event; dispose the result to stop.
   *
   * @example
   * ```ts
   * consumer.on('duplicate', ({ id }) => metrics.increment('duplicates'));
   * ```
   */
  on<E extends ConsumerEventName>(name: E, listener: (event: ConsumerEvents[E]) => void): Disposable {
    return this.#events.on(name, listener);
  }

  /** @internal Emit an event; used by adapters for what they observe. */
  emit<E extends ConsumerEventName>(name: E, event: ConsumerEvents[E]): void {
    this.#events.emit(name, event);
  }

  /**
   * Handle one message: claim its id, run the handler if the claim was won,
   * store the completion, and answer what the adapter must do. Never throws.
   */
  async handle(message: M, messageId: string, options: HandleOptions = {}): Promise<ConsumerVerdict> {
    const rid = this.recordIdOf(messageId);
    // By default never wait for an in-flight copy: the broker redelivers it, and a wait would hold a delivery slot.
    const begun = await this.engine.begin({ id: rid, fingerprint: null, wait: options.wait ?? false });
    if (begun.kind !== 'run') return this.#notRun(messageId, rid, begun);
    return this.#perform(message, messageId, rid, begun.claim, options.working).verdict;
  }

  /**
   * Handle a batch: claim every id in one store round trip (`claimMany`
   * when the store has it), then run the won ones in order. Verdicts are in
   * the order of `items`. A message id repeated inside the batch runs once.
   *
   * Every claim won and not run is released on every way out: a batch
   * stopped early, and also a `shouldContinue` or `onVerdict` that throws
   * (a Kafka heartbeat during a rebalance); the error is thrown after that,
   * once the completions already travelling are settled.
   */
  async handleBatch(items: ReadonlyArray<BatchItem<M>>, options: BatchOptions = {}): Promise<ConsumerVerdict[]> {
    if (items.length === 0) return [];
    const rids = items.map((item) => this.recordIdOf(item.id));
    const unique = [...new Set(rids)];
    const begun = await this.engine.beginMany(unique, { fingerprint: null });
    const first = new Map<string, Begun>();
    // Claims won and not yet run: their leases started with beginMany (and are renewed) until each is run or released.
    const waiting = new Map<string, Claim>();
    for (let i = 0; i < unique.length; i++) {
      const b = begun[i]!;
      first.set(unique[i]!, b);
      if (b.kind === 'run') waiting.set(unique[i]!, b.claim);
    }
    const overlap = options.overlapCompletion === true && !options.stopAtFirstBreak;
    const verdictOf = new Map<string, Promise<ConsumerVerdict>>();
    const pending: Array<Promise<ConsumerVerdict>> = [];
    let broken = false;
    try {
      for (let i = 0; i < items.length; i++) {
        const item = items[i]!;
        const rid = rids[i]!;
        const earlier = verdictOf.get(rid);
        let verdict: Promise<ConsumerVerdict>;
        if (earlier) {
          // A copy inside the same batch: it follows the first copy.
          verdict = earlier.then((known) => {
            const action: ConsumerAction = shouldAcknowledge(known) ? 'duplicate' : known.action === 'failed' ? 'skipped' : known.action;
            if (action === 'duplicate') this.#events.emit('duplicate', { id: item.id, recordId: rid });
            return { ...known, action, id: item.id, error: undefined };
          });
        } else {
          const b = first.get(rid)!;
          if ((broken && options.stopAtFirstBreak) || (options.shouldContinue ? !options.shouldContinue() : false)) {
            const claim = waiting.get(rid);
            waiting.delete(rid);
            if (claim) await claim.release('batch stopped before this message');
            verdict = Promise.resolve({ action: 'skipped', id: item.id, recordId: rid });
          } else if (b.kind !== 'run') {
            verdict = Promise.resolve(this.#notRun(item.id, rid, b));
          } else {
            waiting.delete(rid);
            const performing = this.#perform(item.message, item.id, rid, b.claim, options.working);
            verdict = performing.verdict;
            // Overlapped: the next handler runs while this completion travels; acks wait for all of them.
            await (overlap ? performing.ran : verdict);
          }
          verdictOf.set(rid, verdict);
        }
        pending.push(verdict);
        if (!overlap) {
          const known = await verdict;
          if (!shouldAcknowledge(known)) broken = true;
          await options.onVerdict?.(known, i);
        }
      }
      const verdicts = await Promise.all(pending);
      if (overlap && options.onVerdict) for (let i = 0; i < verdicts.length; i++) await options.onVerdict(verdicts[i]!, i);
      return verdicts;
    } finally {
      // Left unsettled, these would be renewed for ever and answer "in flight" to every redelivery.
      const left = [...waiting.values()];
      waiting.clear();
      await Promise.all([...left.map((claim) => claim.release('batch ended before this message')), Promise.allSettled(pending)]);
    }
  }

  /** The verdict on a message the engine did not hand over to run. */
  #notRun(id: string, rid: string, begun: NotRun): ConsumerVerdict {
    switch (begun.kind) {
      case 'replay':
        this.#events.emit('duplicate', { id, recordId: rid });
        return { action: 'duplicate', id, recordId: rid };
      case 'in_flight': {
        const { leaseUntil } = begun.error;
        this.#events.emit('inFlight', { id, recordId: rid, leaseUntil });
        return { action: 'in_flight', id, recordId: rid, leaseUntil, error: begun.error };
      }
      default:
        // Store down or full. A shared engine's failOpen (`bypass`) is not followed: the broker
        // redelivers, so running without idempotency would only risk a second run. A fingerprint
        // mismatch cannot happen (consumers claim without one).
        return { action: 'store_error', id, recordId: rid, error: begun.error };
    }
  }

  /** Run the handler under its claim; the engine settles the claim on every path. */
  #perform(message: M, id: string, rid: string, claim: Claim, working: (() => unknown) | undefined): Performing {
    const started = Date.now();
    let ranNow!: () => void;
    const ran = new Promise<void>((resolve) => (ranNow = resolve));
    const performed = claim.perform({
      run: async () => {
        const ticker = this.#startWorking(id, working);
        try {
          await this.#handler({
            message,
            id,
            recordId: rid,
            signal: claim.signal,
            takeover: claim.takeover,
            transaction: () => claim.transaction(),
            step: (name, fn) => claim.step(name, fn),
          });
        } finally {
          clearInterval(ticker);
          ranNow();
        }
      },
      // Always try to complete, even when renewals failed meanwhile: the store's fencing
      // decides (refused only if another worker took the record over).
      settle: () => ({ kind: 'complete', outcome: STORED_OUTCOME }),
      failure: () => ({ kind: 'release', reason: 'handler failed' }),
    });
    const verdict = performed.then((done) => this.#verdictOf(done, id, rid, claim.takeover, started));
    return { ran, verdict };
  }

  #verdictOf(performed: Performed<void>, id: string, rid: string, takeover: boolean, started: number): ConsumerVerdict {
    if (!performed.ok) {
      this.#events.emit('released', { id, recordId: rid, error: performed.error });
      return { action: 'failed', id, recordId: rid, error: performed.error };
    }
    switch (performed.settled) {
      case 'stored':
        this.#events.emit('processed', { id, recordId: rid, takeover, ms: Date.now() - started });
        return { action: 'processed', id, recordId: rid, takeover };
      case 'fenced':
        // The new owner decides; a redelivery will learn its outcome.
        this.#events.emit('fenced', { id, recordId: rid });
        return { action: 'fenced', id, recordId: rid };
      case 'rolled_back': {
        // Transactional mode: the handler's writes did not commit; the claim was released.
        const error = new RolledBackError('The handler ran, but its transaction did not commit; nothing happened.');
        this.#events.emit('released', { id, recordId: rid, error });
        return { action: 'failed', id, recordId: rid, error };
      }
      default: {
        // 'unsettled': the effect happened but is not recorded. The record stays in progress until
        // its lease ends, then a redelivery runs it again (at least once): never acknowledge.
        const error = new StoreUnavailableError('The handler ran, but its completion could not be stored before its lease ended.');
        return { action: 'store_error', id, recordId: rid, error };
      }
    }
  }

  #startWorking(id: string, working: (() => unknown) | undefined): NodeJS.Timeout | undefined {
    if (!working) return undefined;
    const timer = setInterval(() => {
      try {
        const out = working();
        if (isThenable(out)) {
          out.then(undefined, (error: unknown) => this.#events.emit('workingError', { id, error }));
        }
      } catch (error) {
        this.#events.emit('workingError', { id, error });
      }
    }, this.#workingIntervalMs);
    timer.unref();
    return timer;
  }
}

/**
 * Read a header value from the header shapes brokers use: a plain object
 * (amqplib, KafkaJS: strings, Buffers or arrays of them) or a `get`-able map
 * (NATS `MsgHdrs`). Answers `undefined` when absent or empty.
 *
 * @example
 * ```ts
 * headerValue({ 'event-id': Buffer.from('e1') }, 'event-id'); // 'e1'
 * ```
 */
export function headerValue(headers: unknown, name: string): string | undefined {
  if (headers === null || headers === undefined) return undefined;
  let value: unknown;
  const h = headers as { get?: (k: string) => unknown; has?: (k: string) => boolean };
  if (typeof h.get === 'function') {
    if (typeof h.has === 'function' && !h.has(name)) return undefined;
    value = h.get(name);
  } else {
    const record = headers as Record<string, unknown>;
    value = record[name];
    if (value === undefined) {
      const lower = name.toLowerCase();
      for (const key of Object.keys(record)) {
        if (key.toLowerCase() === lower) {
          value = record[key];
          break;
        }
      }
    }
  }
  if (Array.isArray(value)) value = value[0];
  if (value === null || value === undefined) return undefined;
  const text = typeof value === 'string' ? value : value instanceof Uint8Array ? Buffer.from(value).toString('utf8') : String(value);
  return text.length > 0 ? text : undefined;
}

/**
 * Run an adapter's message-id function safely: a missing, empty or throwing
 * id is reported as a `missingId` event and answers `undefined`.
 * @internal Shared by the adapters.
 *
 * @example
 * ```ts
 * const id = readMessageId(consumer, () => msg.properties.messageId);
 * ```
 */
export function readMessageId(
  consumer: { emit(name: 'missingId', event: ConsumerEvents['missingId']): void },
  read: () => unknown,
): string | undefined {
  let error: unknown;
  try {
    const id = read();
    if (typeof id === 'string' && id.length > 0) return id;
    if (typeof id === 'number' || typeof id === 'bigint') return String(id);
    error = new ConfigError('The message has no id (the messageId function returned nothing).');
  } catch (e) {
    error = e;
  }
  consumer.emit('missingId', { error });
  return undefined;
}

/**
 * Sleep that does not keep the process alive. @internal
 *
 * @example
 * ```ts
 * await pause(100);
 * ```
 */
export function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}
