/**
 * `oncely/consumer`: idempotent message consumers. The broker-neutral core
 * claims a message id, runs the handler, stores the completion, and only
 * then lets the adapter acknowledge. Adapters live beside it:
 * `oncely/consumer/amqp` (RabbitMQ, amqplib), `oncely/consumer/nats`
 * (JetStream), `oncely/consumer/redis-streams` (ioredis or node-redis),
 * `oncely/consumer/kafka` (KafkaJS-style API); the transactional inbox,
 * `oncely/consumer/inbox`, is transactional mode for one message (the same
 * records a consumer of the same name keeps). See docs/consumers.md.
 *
 * @example
 * ```ts
 * import { IdempotentConsumer, shouldAcknowledge } from 'oncely/consumer';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * const consumer = new IdempotentConsumer({ name: 'billing', store: memoryStore(), handler: async ({ message }) => bill(message) });
 * if (shouldAcknowledge(await consumer.handle(msg, msg.id))) ack(msg);
 * ```
 * @module
 */
export { headerValue, IdempotentConsumer, shouldAcknowledge } from './core.js';
export type {
  BatchItem,
  BatchOptions,
  ConsumerAction,
  ConsumerContext,
  ConsumerEventName,
  ConsumerEvents,
  ConsumerHandler,
  ConsumerHooks,
  ConsumerOptions,
  ConsumerVerdict,
  HandleOptions,
} from './core.js';
