/**
 * `oncely/consumer/kafka`: idempotent `eachMessage` and `eachBatch`
 * handlers for the KafkaJS consumer API, as offered by `kafkajs` and by
 * `@confluentinc/kafka-javascript`'s KafkaJS-compatible API (typed
 * structurally; neither is a dependency).
 *
 * - Message id: `<topic>/<partition>/<offset>`, or a header (`header`), or
 *   your own `messageId(record)`. Offsets identify a record, not an event:
 *   use a header when producers may send one event twice.
 * - Order: claim, run, complete; only then is the offset resolved (and
 *   committed by the consumer).
 * - `eachMessage`: a completed duplicate returns at once (its offset is
 *   committed). In flight elsewhere or store down: the partition is paused
 *   for `retryDelayMs` and the call throws, so the offset is not committed
 *   and the record is fetched again. Failure: the claim is released and the
 *   handler's error is thrown (KafkaJS's own retry / restart applies).
 * - `eachBatch` (run the consumer with `eachBatchAutoResolve: false`): the
 *   whole batch is claimed in one store round trip; records run in order and
 *   offsets are resolved only across the unbroken run of handled records;
 *   at the first in-flight, failed or store-error record the batch stops
 *   (later won claims are released), and the partition resumes from there.
 *   A `heartbeat()` or `isStale()` that throws (a rebalance) also releases
 *   the claims of the records not yet run before the error is thrown.
 * - While a handler runs, `heartbeat()` is sent every `workingIntervalMs`
 *   (default 3 s, below the group's session timeout) and the lease renewed.
 *
 * Tested through the core with KafkaJS payload shapes; no Kafka broker was
 * available to test against.
 *
 * @example
 * ```ts
 * import { Kafka } from 'kafkajs';
 * import { kafkaEachMessage } from 'oncely/consumer/kafka';
 *
 * const consumer = new Kafka({ brokers: ['localhost:9092'] }).consumer({ groupId: 'billing' });
 * await consumer.run({
 *   eachMessage: kafkaEachMessage({ name: 'billing', store, handler: async ({ message }) => bill(message.message.value) }),
 * });
 * ```
 * @module
 */
import {
  type ConsumerOptions,
  type ConsumerVerdict,
  headerValue,
  IdempotentConsumer,
  pause as sleep,
  readMessageId,
  shouldAcknowledge,
} from './core.js';

/**
 * The part of a KafkaJS `KafkaMessage` the adapter reads.
 *
 * @example
 * ```ts
 * const offset = (message satisfies KafkaMessageLike).offset;
 * ```
 */
export interface KafkaMessageLike {
  offset: string;
  key?: Uint8Array | string | null;
  value: Uint8Array | string | null;
  headers?: Record<string, unknown> | undefined;
  timestamp?: string;
}

/**
 * What the handler receives as `message`: the record with its topic and partition.
 *
 * @example
 * ```ts
 * const handler = ({ message }: { message: KafkaRecord }) => bill(message.topic, message.message.value);
 * ```
 */
export interface KafkaRecord<K extends KafkaMessageLike = KafkaMessageLike> {
  topic: string;
  partition: number;
  message: K;
}

/**
 * The KafkaJS `eachMessage` payload (the parts used).
 *
 * @example
 * ```ts
 * const eachMessage = (payload: EachMessagePayloadLike) => handle(payload);
 * ```
 */
export interface EachMessagePayloadLike<K extends KafkaMessageLike = KafkaMessageLike> {
  topic: string;
  partition: number;
  message: K;
  heartbeat(): Promise<void>;
  pause(): () => void;
}

/**
 * The KafkaJS `eachBatch` payload (the parts used).
 *
 * @example
 * ```ts
 * const eachBatch = (payload: EachBatchPayloadLike) => handleBatch(payload);
 * ```
 */
export interface EachBatchPayloadLike<K extends KafkaMessageLike = KafkaMessageLike> {
  batch: { topic: string; partition: number; messages: K[] };
  resolveOffset(offset: string): void;
  heartbeat(): Promise<void>;
  commitOffsetsIfNecessary(offsets?: unknown): Promise<void>;
  isRunning(): boolean;
  isStale(): boolean;
  pause?(): () => void;
}

/**
 * Options of {@link kafkaEachMessage} and {@link kafkaEachBatch}.
 *
 * @example
 * ```ts
 * const options: KafkaConsumerOptions = { name: 'billing', store, header: 'event-id', handler };
 * ```
 */
export interface KafkaConsumerOptions<K extends KafkaMessageLike = KafkaMessageLike> extends ConsumerOptions<KafkaRecord<K>> {
  /** A header carrying the message id (instead of topic/partition/offset). */
  header?: string;
  /** Your own message id (wins over `header`). */
  messageId?: (record: KafkaRecord<K>) => string | undefined;
  /** How long a partition is paused after an in-flight or store-error record, ms. Default 1 000. */
  retryDelayMs?: number;
}

/**
 * The natural id of a Kafka record: the named header, else
 * `<topic>/<partition>/<offset>`.
 *
 * @example
 * ```ts
 * kafkaMessageId({ topic: 'orders', partition: 0, message }); // 'orders/0/42'
 * ```
 */
export function kafkaMessageId(record: KafkaRecord, header?: string): string {
  const fromHeader = header ? headerValue(record.message.headers, header) : undefined;
  return fromHeader ?? `${record.topic}/${record.partition}/${record.message.offset}`;
}

function setup<K extends KafkaMessageLike>(options: KafkaConsumerOptions<K>) {
  const consumer = new IdempotentConsumer<KafkaRecord<K>>({ workingIntervalMs: 3_000, ...options });
  const readId = options.messageId ?? ((record: KafkaRecord<K>) => kafkaMessageId(record, options.header));
  return { consumer, readId, retryDelayMs: options.retryDelayMs ?? 1_000 };
}

const pauseFor = (pause: (() => () => void) | undefined, ms: number): boolean => {
  if (!pause) return false;
  const resume = pause();
  setTimeout(resume, ms).unref();
  return true;
};

const errorOf = (verdict: ConsumerVerdict): unknown =>
  verdict.error ?? new Error(`oncely: message ${verdict.id} was not handled (${verdict.action}); it will be fetched again.`);

/**
 * A KafkaJS `eachMessage` handler made by {@link kafkaEachMessage}, with its core.
 *
 * @example
 * ```ts
 * const eachMessage: KafkaEachMessage = kafkaEachMessage(options);
 * eachMessage.consumer.on('inFlight', () => metrics.increment('held'));
 * ```
 */
export interface KafkaEachMessage<K extends KafkaMessageLike = KafkaMessageLike> {
  (payload: EachMessagePayloadLike<K>): Promise<void>;
  /** The idempotent core (events, record ids). */
  readonly consumer: IdempotentConsumer<KafkaRecord<K>>;
}

/**
 * An idempotent KafkaJS `eachMessage` handler.
 *
 * @example
 * ```ts
 * await consumer.run({ eachMessage: kafkaEachMessage({ name: 'billing', store, header: 'event-id', handler }) });
 * ```
 */
export function kafkaEachMessage<K extends KafkaMessageLike = KafkaMessageLike>(options: KafkaConsumerOptions<K>): KafkaEachMessage<K> {
  const { consumer, readId, retryDelayMs } = setup(options);
  const eachMessage = async (payload: EachMessagePayloadLike<K>): Promise<void> => {
    const record: KafkaRecord<K> = { topic: payload.topic, partition: payload.partition, message: payload.message };
    const id = readMessageId(consumer, () => readId(record));
    if (id === undefined) throw new Error(`oncely: record ${kafkaMessageId(record)} has no message id.`);
    const verdict = await consumer.handle(record, id, { working: () => payload.heartbeat() });
    if (shouldAcknowledge(verdict)) return;
    // Pausing keeps the retry from spinning while another worker finishes; throwing keeps the offset uncommitted.
    if (verdict.action !== 'failed') pauseFor(() => payload.pause(), retryDelayMs);
    throw errorOf(verdict);
  };
  return Object.assign(eachMessage, { consumer });
}

/**
 * A KafkaJS `eachBatch` handler made by {@link kafkaEachBatch}, with its core.
 *
 * @example
 * ```ts
 * const eachBatch: KafkaEachBatch = kafkaEachBatch(options);
 * await consumer.run({ eachBatchAutoResolve: false, eachBatch });
 * ```
 */
export interface KafkaEachBatch<K extends KafkaMessageLike = KafkaMessageLike> {
  (payload: EachBatchPayloadLike<K>): Promise<void>;
  /** The idempotent core (events, record ids). */
  readonly consumer: IdempotentConsumer<KafkaRecord<K>>;
}

/**
 * An idempotent KafkaJS `eachBatch` handler; run the consumer with
 * `eachBatchAutoResolve: false` so that only handled offsets are resolved.
 *
 * @example
 * ```ts
 * await consumer.run({ eachBatchAutoResolve: false, eachBatch: kafkaEachBatch({ name: 'billing', store, handler }) });
 * ```
 */
export function kafkaEachBatch<K extends KafkaMessageLike = KafkaMessageLike>(options: KafkaConsumerOptions<K>): KafkaEachBatch<K> {
  const { consumer, readId, retryDelayMs } = setup(options);
  const eachBatch = async (payload: EachBatchPayloadLike<K>): Promise<void> => {
    const { topic, partition, messages } = payload.batch;
    const items: Array<{ message: KafkaRecord<K>; id: string }> = [];
    let missing: KafkaRecord<K> | undefined;
    for (const message of messages) {
      const record: KafkaRecord<K> = { topic, partition, message };
      const id = readMessageId(consumer, () => readId(record));
      // A record without an id ends the run: it and everything after it stay unresolved.
      if (id === undefined) {
        missing = record;
        break;
      }
      items.push({ message: record, id });
    }
    let unbroken = true;
    let failure: ConsumerVerdict | undefined;
    let lastBreak: ConsumerVerdict | undefined;
    await consumer.handleBatch(items, {
      stopAtFirstBreak: true,
      working: () => payload.heartbeat(),
      shouldContinue: () => payload.isRunning() && !payload.isStale(),
      onVerdict: async (verdict, i) => {
        if (unbroken && shouldAcknowledge(verdict)) {
          payload.resolveOffset(items[i]!.message.message.offset);
          await payload.heartbeat();
          return;
        }
        if (unbroken) lastBreak = verdict;
        unbroken = false;
        if (verdict.action === 'failed') failure ??= verdict;
      },
    });
    await payload.commitOffsetsIfNecessary();
    if (failure) throw errorOf(failure);
    if (lastBreak && lastBreak.action !== 'skipped') {
      // The partition is fetched again from the first unresolved record; wait a moment first.
      if (!pauseFor(payload.pause ? () => payload.pause!() : undefined, retryDelayMs)) await sleep(retryDelayMs);
      return;
    }
    // Every record before it is resolved; the one without an id fails as in
    // eachMessage, so that KafkaJS's retry policy (backoff, then a restart)
    // applies. Returning would have the runner fetch it again at once, in a loop.
    if (missing !== undefined && unbroken) throw new Error(`oncely: record ${kafkaMessageId(missing)} has no message id.`);
  };
  return Object.assign(eachBatch, { consumer });
}
