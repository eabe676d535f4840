/**
 * `oncely/consumer/nats`: idempotent NATS JetStream consumers over the
 * user's own `@nats-io/jetstream` messages (typed structurally; the NATS
 * libraries are not dependencies).
 *
 * - Message id: the `Nats-Msg-Id` header (the publisher's id, also used by
 *   JetStream's own duplicate window), else `<stream>:<stream sequence>`;
 *   or another header (`header`), or your own `messageId(msg)`.
 * - Order: claim, run, complete, then `ack()`.
 * - While the handler runs, `working()` is sent every `workingIntervalMs`
 *   (default 5 s; keep it below the consumer's `ack_wait`) so JetStream does
 *   not redeliver a message that is still being handled, and the store lease
 *   is renewed.
 * - In flight elsewhere, or store down: not run; `nak(retryDelayMs)`.
 * - Failure: the claim is released, then `nak(failureDelayMs)`: JetStream
 *   redelivers until the consumer's `max_deliver` (its dead-letter path).
 *
 * @example
 * ```ts
 * import { connect } from '@nats-io/transport-node';
 * import { jetstream } from '@nats-io/jetstream';
 * import { consumeNats } from 'oncely/consumer/nats';
 *
 * const js = jetstream(await connect({ servers: 'localhost:4222' }));
 * const messages = await (await js.consumers.get('ORDERS', 'shipper')).consume();
 * const running = consumeNats({ messages, name: 'ship-orders', store, handler: async ({ message }) => ship(message.json()) });
 * // later: await running.stop();
 * ```
 * @module
 */
import {
  type ConsumerOptions,
  type ConsumerVerdict,
  headerValue,
  IdempotentConsumer,
  readMessageId,
  shouldAcknowledge,
} from './core.js';

/**
 * The part of a JetStream `JsMsg` the adapter uses.
 *
 * @example
 * ```ts
 * const seq = (msg satisfies JsMsgLike).info.streamSequence;
 * ```
 */
export interface JsMsgLike {
  readonly seq: number;
  readonly subject: string;
  readonly data: Uint8Array;
  readonly info: { readonly stream: string; readonly streamSequence: number };
  readonly headers?: { get(key: string): string; has(key: string): boolean } | undefined;
  ack(): void;
  nak(millis?: number): void;
  working(): void;
}

/**
 * Options of {@link natsHandler}.
 *
 * @example
 * ```ts
 * const options: NatsHandlerOptions = { name: 'ship-orders', store, header: 'Event-Id', retryDelayMs: 2_000, handler };
 * ```
 */
export interface NatsHandlerOptions<M extends JsMsgLike = JsMsgLike> extends ConsumerOptions<M> {
  /** The header carrying the message id. Default `Nats-Msg-Id`; absent → `<stream>:<sequence>`. */
  header?: string;
  /** Your own message id (wins over the header). */
  messageId?: (message: M) => string | undefined;
  /** Redelivery delay of an in-flight or store-error message, ms. Default 1 000. */
  retryDelayMs?: number;
  /** Redelivery delay of a failed message, ms. Default `retryDelayMs`. */
  failureDelayMs?: number;
}

/**
 * The natural id of a JetStream message: the `Nats-Msg-Id` header (or the
 * named one), else `<stream>:<stream sequence>`.
 *
 * @example
 * ```ts
 * natsMessageId(msg); // 'order-42' or 'ORDERS:17'
 * ```
 */
export function natsMessageId(message: JsMsgLike, header = 'Nats-Msg-Id'): string {
  return headerValue(message.headers, header) ?? `${message.info.stream}:${message.info.streamSequence}`;
}

/**
 * A JetStream message handler made by {@link natsHandler}, with its core.
 *
 * @example
 * ```ts
 * const handle: NatsHandler = natsHandler(options);
 * handle.consumer.on('duplicate', ({ id }) => console.log('again:', id));
 * ```
 */
export interface NatsHandler<M extends JsMsgLike = JsMsgLike> {
  (message: M): Promise<ConsumerVerdict | undefined>;
  /** The idempotent core (events, record ids). */
  readonly consumer: IdempotentConsumer<M>;
}

/**
 * Make a function that handles one JetStream message idempotently and acks
 * or naks it; use it in your own loop, or let {@link consumeNats} run one.
 *
 * @example
 * ```ts
 * const handle = natsHandler({ name: 'ship-orders', store, handler: async ({ message }) => ship(message.data) });
 * for await (const msg of await consumer.consume()) await handle(msg);
 * ```
 */
export function natsHandler<M extends JsMsgLike = JsMsgLike>(options: NatsHandlerOptions<M>): NatsHandler<M> {
  const { header = 'Nats-Msg-Id', retryDelayMs = 1_000 } = options;
  const failureDelayMs = options.failureDelayMs ?? retryDelayMs;
  const consumer = new IdempotentConsumer<M>({ workingIntervalMs: 5_000, ...options });
  const readId = options.messageId ?? ((message: M) => natsMessageId(message, header));
  const safely = (id: string | undefined, operation: string, act: () => void): void => {
    try {
      act();
    } catch (error) {
      consumer.emit('brokerError', { id, operation, error });
    }
  };
  const handle = async (message: M): Promise<ConsumerVerdict | undefined> => {
    const id = readMessageId(consumer, () => readId(message));
    if (id === undefined) {
      safely(undefined, 'nak', () => message.nak(failureDelayMs));
      return undefined;
    }
    const verdict = await consumer.handle(message, id, { working: () => message.working() });
    if (shouldAcknowledge(verdict)) safely(id, 'ack', () => message.ack());
    else safely(id, 'nak', () => message.nak(verdict.action === 'failed' ? failureDelayMs : retryDelayMs));
    return verdict;
  };
  return Object.assign(handle, { consumer });
}

/**
 * An async iterable of messages, as `consumer.consume()` returns; `stop`/`close` end it.
 *
 * @example
 * ```ts
 * const messages: JsMessagesLike = await (await js.consumers.get('ORDERS', 'shipper')).consume();
 * ```
 */
export interface JsMessagesLike<M extends JsMsgLike = JsMsgLike> extends AsyncIterable<M> {
  stop?(error?: Error): void;
  close?(): Promise<unknown>;
}

/**
 * Options of {@link consumeNats}.
 *
 * @example
 * ```ts
 * const options: NatsConsumerOptions = { messages, name: 'ship-orders', store, concurrency: 4, handler };
 * ```
 */
export interface NatsConsumerOptions<M extends JsMsgLike = JsMsgLike> extends NatsHandlerOptions<M> {
  /** The messages, from `(await js.consumers.get(stream, durable)).consume()`. */
  messages: JsMessagesLike<M>;
  /** Messages handled at once. Default 1 (in order). */
  concurrency?: number;
}

/**
 * A running JetStream consumer.
 *
 * @example
 * ```ts
 * const running: NatsConsumer = consumeNats(options);
 * await running.stop();
 * ```
 */
export interface NatsConsumer<M extends JsMsgLike = JsMsgLike> {
  /** The idempotent core (events, record ids). */
  readonly consumer: IdempotentConsumer<M>;
  /**
   * Settles when the message iterator ends (after `stop()`, or when the
   * subscription closes), and the handlers it started have finished; rejects
   * with the iterator's error when it failed.
   */
  readonly done: Promise<void>;
  /** Stop pulling and wait for running handlers. */
  stop(): Promise<void>;
}

/**
 * Run a JetStream consumer loop with the idempotent handler.
 *
 * @example
 * ```ts
 * const messages = await (await js.consumers.get('ORDERS', 'shipper')).consume();
 * const running = consumeNats({ messages, name: 'ship-orders', store, concurrency: 4, handler });
 * ```
 */
export function consumeNats<M extends JsMsgLike = JsMsgLike>(options: NatsConsumerOptions<M>): NatsConsumer<M> {
  const handle = natsHandler(options);
  const { messages } = options;
  const concurrency = Math.max(1, options.concurrency ?? 1);
  const running = new Set<Promise<unknown>>();
  const loop = async (): Promise<void> => {
    try {
      for await (const message of messages) {
        const task = handle(message).finally(() => running.delete(task));
        running.add(task);
        if (running.size >= concurrency) await Promise.race(running);
      }
    } finally {
      // Also when the iterator fails (consumer deleted, connection closed): `done` settles only once every
      // running handler has settled its claim and acked or nakked, so exiting on `done` cuts nothing short.
      await Promise.allSettled([...running]);
    }
  };
  const done = loop();
  return {
    consumer: handle.consumer,
    done,
    async stop() {
      if (messages.close) await messages.close();
      else messages.stop?.();
      await done.catch(() => undefined);
      await Promise.allSettled([...running]);
      handle.consumer.close();
    },
  };
}
