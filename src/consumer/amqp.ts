/**
 * `oncely/consumer/amqp`: idempotent RabbitMQ consumers over the user's own
 * amqplib channel (typed structurally; amqplib is not a dependency).
 *
 * - Message id: the AMQP `messageId` property, or a header (`header`), or
 *   your own `messageId(msg)` function.
 * - Order: claim, run, complete, then `ack`.
 * - A completed duplicate is acked without running.
 * - In flight elsewhere: not run; nacked with requeue after `retryDelayMs`,
 *   so the copy comes back once the other worker has finished.
 * - Failure: the claim is released, then the message is nacked: requeued
 *   (after `retryDelayMs`) by default, or rejected without requeue when
 *   `deadLetter: true` says the queue has a dead-letter exchange.
 * - Store down: not run, nacked with requeue after `retryDelayMs`.
 *
 * @example
 * ```ts
 * import amqp from 'amqplib';
 * import { consumeAmqp } from 'oncely/consumer/amqp';
 * import { redisStore } from 'oncely/stores/redis';
 *
 * const channel = await (await amqp.connect('amqp://localhost')).createChannel();
 * const running = await consumeAmqp({
 *   channel, queue: 'orders', name: 'ship-orders', store: redisStore({ client }),
 *   handler: async ({ message }) => ship(JSON.parse(message.content.toString())),
 * });
 * // later: await running.stop();
 * ```
 * @module
 */
import { type ConsumerOptions, headerValue, IdempotentConsumer, readMessageId, shouldAcknowledge } from './core.js';

/**
 * The part of an amqplib `ConsumeMessage` the adapter reads.
 *
 * @example
 * ```ts
 * const id = (msg satisfies AmqpMessageLike).properties.messageId;
 * ```
 */
export interface AmqpMessageLike {
  content: Uint8Array;
  fields: { deliveryTag: number; redelivered: boolean; exchange?: string; routingKey?: string };
  properties: { messageId?: unknown; headers?: Record<string, unknown> | undefined };
}

/**
 * The part of an amqplib `Channel` (or `ConfirmChannel`) the adapter uses.
 *
 * @example
 * ```ts
 * const channel: AmqpChannelLike = await connection.createChannel();
 * ```
 */
export interface AmqpChannelLike {
  consume(
    queue: string,
    onMessage: (message: AmqpMessageLike | null) => void,
    options?: { noAck?: boolean; consumerTag?: string },
  ): Promise<{ consumerTag: string }>;
  ack(message: AmqpMessageLike): void;
  nack(message: AmqpMessageLike, allUpTo?: boolean, requeue?: boolean): void;
  cancel(consumerTag: string): Promise<unknown>;
  prefetch(count: number): Promise<unknown>;
}

/**
 * Options of {@link consumeAmqp}.
 *
 * @example
 * ```ts
 * const options: AmqpConsumerOptions = { channel, queue: 'orders', store, deadLetter: true, handler };
 * ```
 */
export interface AmqpConsumerOptions extends Omit<ConsumerOptions<AmqpMessageLike>, 'name'> {
  /** The channel to consume on (acks go back on it). */
  channel: AmqpChannelLike;
  /** The queue to consume. */
  queue: string;
  /** Consumer name for record ids. Default: the queue name. */
  name?: string;
  /** A header carrying the message id, used when the `messageId` property is absent. */
  header?: string;
  /** Your own message id (wins over `messageId` property and `header`). */
  messageId?: (message: AmqpMessageLike) => string | undefined;
  /** Channel prefetch (how many messages are handled at once). Default 16; `0` leaves the channel's setting. */
  prefetch?: number;
  /**
   * The queue has a dead-letter exchange: a failed message is nacked without
   * requeue so that it goes there. Default false: it is requeued after
   * `retryDelayMs` (nothing is lost; bound the retries with a quorum queue's
   * `x-delivery-limit` or a dead-letter exchange).
   */
  deadLetter?: boolean;
  /** Delay before an in-flight, failed or store-error message is nacked back to the queue, ms. Default 1 000. */
  retryDelayMs?: number;
}

/**
 * A running AMQP consumer.
 *
 * @example
 * ```ts
 * const running: AmqpConsumer = await consumeAmqp(options);
 * process.on('SIGTERM', () => void running.stop());
 * ```
 */
export interface AmqpConsumer {
  /** The idempotent core (events, record ids). */
  readonly consumer: IdempotentConsumer<AmqpMessageLike>;
  /** The broker's consumer tag. */
  readonly consumerTag: string;
  /** Cancel the subscription, nack delayed messages at once, and wait for running handlers. */
  stop(): Promise<void>;
}

/**
 * The natural id of an AMQP message: the `messageId` property, else the
 * named header.
 *
 * @example
 * ```ts
 * amqpMessageId(msg, 'x-event-id');
 * ```
 */
export function amqpMessageId(message: AmqpMessageLike, header?: string): string | undefined {
  const property = message.properties.messageId;
  if (typeof property === 'string' && property.length > 0) return property;
  if (typeof property === 'number') return String(property);
  return header ? headerValue(message.properties.headers, header) : undefined;
}

/**
 * Consume a queue idempotently. See the module documentation for what
 * happens to each message.
 *
 * @example
 * ```ts
 * const running = await consumeAmqp({ channel, queue: 'payments', store, handler: async ({ message, id }) => record(id, message.content) });
 * ```
 */
export async function consumeAmqp(options: AmqpConsumerOptions): Promise<AmqpConsumer> {
  const { channel, queue, header, deadLetter = false, retryDelayMs = 1_000, prefetch = 16 } = options;
  const consumer = new IdempotentConsumer<AmqpMessageLike>({ ...options, name: options.name ?? queue });
  const readId = options.messageId ?? ((message: AmqpMessageLike) => amqpMessageId(message, header));
  const running = new Set<Promise<void>>();
  const delayed = new Map<NodeJS.Timeout, () => void>();
  let stopping = false;

  const safely = (id: string | undefined, operation: string, act: () => void): void => {
    try {
      act();
    } catch (error) {
      // A closed channel: the broker requeues every unacked message by itself.
      consumer.emit('brokerError', { id, operation, error });
    }
  };
  const nackLater = (message: AmqpMessageLike, id: string | undefined, requeue: boolean): void => {
    const nack = (): void => safely(id, 'nack', () => channel.nack(message, false, requeue));
    if (!requeue || retryDelayMs <= 0 || stopping) {
      nack();
      return;
    }
    // Holding the message a moment keeps a requeued copy from spinning while the other worker finishes.
    const timer = setTimeout(() => {
      delayed.delete(timer);
      nack();
    }, retryDelayMs);
    delayed.set(timer, nack);
  };

  const onMessage = async (message: AmqpMessageLike): Promise<void> => {
    const id = readMessageId(consumer, () => readId(message));
    if (id === undefined) {
      nackLater(message, undefined, !deadLetter);
      return;
    }
    const verdict = await consumer.handle(message, id);
    if (shouldAcknowledge(verdict)) safely(id, 'ack', () => channel.ack(message));
    else if (verdict.action === 'failed') nackLater(message, id, !deadLetter);
    else nackLater(message, id, true);
  };

  let consumerTag: string;
  try {
    if (prefetch > 0) await channel.prefetch(prefetch);
    ({ consumerTag } = await channel.consume(queue, (message) => {
      if (message === null) return; // the broker cancelled the consumer
      const task = onMessage(message).finally(() => running.delete(task));
      running.add(task);
    }));
  } catch (error) {
    // A consumer that never started must not stay subscribed to a shared engine.
    consumer.close();
    throw error;
  }

  return {
    consumer,
    consumerTag,
    async stop() {
      stopping = true;
      try {
        await channel.cancel(consumerTag);
      } catch (error) {
        consumer.emit('brokerError', { id: undefined, operation: 'cancel', error });
      }
      await Promise.allSettled([...running]);
      for (const [timer, nack] of delayed) {
        clearTimeout(timer);
        nack();
      }
      delayed.clear();
      consumer.close();
    },
  };
}
