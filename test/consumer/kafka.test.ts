/**
 * oncely/consumer/kafka through the core with KafkaJS's own payload types.
 * No Kafka broker can run here, so the payloads are built by hand in the
 * shapes kafkajs hands to `eachMessage` / `eachBatch` (typed by kafkajs's
 * declarations, so a drift in either shape fails the type check).
 */
import type { Batch, Consumer, EachBatchPayload, EachMessagePayload, KafkaMessage } from 'kafkajs';
import { kafkaEachBatch, kafkaEachMessage } from 'oncely/consumer/kafka';
import { memoryStore } from 'oncely/stores/memory';
import { describe, expect, it } from 'vitest';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function message(offset: number, eventId?: string): KafkaMessage {
  return {
    key: null,
    value: Buffer.from(`value ${offset}`),
    timestamp: String(Date.now()),
    attributes: 0,
    offset: String(offset),
    headers: eventId ? { 'event-id': Buffer.from(eventId) } : {},
  };
}

/** A partition as the KafkaJS runner serves it: fetches from the first unresolved offset. */
function partition(topic: string, records: KafkaMessage[]) {
  let resolved = -1;
  let paused = 0;
  const payload = (): EachBatchPayload => {
    const messages = records.filter((m) => Number(m.offset) > resolved);
    const batch = {
      topic,
      partition: 0,
      highWatermark: String(records.length),
      messages,
      isEmpty: () => messages.length === 0,
      firstOffset: () => messages[0]?.offset ?? null,
      lastOffset: () => messages.at(-1)?.offset ?? String(resolved),
      offsetLag: () => '0',
      offsetLagLow: () => '0',
    } as Batch;
    return {
      batch,
      resolveOffset: (offset) => {
        resolved = Number(offset);
      },
      heartbeat: async () => {},
      pause: () => {
        paused++;
        return () => {};
      },
      commitOffsetsIfNecessary: async () => {},
      uncommittedOffsets: () => ({ topics: [] }),
      isRunning: () => true,
      isStale: () => false,
    };
  };
  return { payload, resolved: () => resolved, paused: () => paused };
}

describe('kafka adapter with KafkaJS payloads', () => {
  it('fits consumer.run({ eachMessage, eachBatch }) as typed by kafkajs', () => {
    const store = memoryStore();
    const config: Parameters<Consumer['run']>[0] = {
      eachMessage: kafkaEachMessage({ name: 'typed', store, handler: () => undefined }),
    };
    const batchConfig: Parameters<Consumer['run']>[0] = {
      eachBatchAutoResolve: false,
      eachBatch: kafkaEachBatch({ name: 'typed', store, handler: () => undefined }),
    };
    expect(typeof config.eachMessage).toBe('function');
    expect(typeof batchConfig.eachBatch).toBe('function');
  });

  it('eachMessage: an event sent three times (sequentially and concurrently) runs once; redelivered offsets replay', async () => {
    const store = memoryStore();
    const runs = new Map<string, number>();
    const eachMessage = kafkaEachMessage({
      name: 'billing',
      store,
      header: 'event-id',
      retryDelayMs: 5,
      handler: async ({ id }) => {
        runs.set(id, (runs.get(id) ?? 0) + 1);
        await sleep(20);
      },
    });
    const payload = (offset: number, eventId: string, p = 0): EachMessagePayload => ({
      topic: 'payments',
      partition: p,
      message: message(offset, eventId),
      heartbeat: async () => {},
      pause: () => () => {},
    });
    for (const offset of [0, 1, 2]) await eachMessage(payload(offset, 'evt-seq'));
    // Concurrently on three partitions: one runs, the others throw (offset not committed) while it is in flight.
    const outcomes = await Promise.allSettled([0, 1, 2].map((p) => eachMessage(payload(10 + p, 'evt-con', p))));
    expect(outcomes.filter((o) => o.status === 'fulfilled')).toHaveLength(1);
    for (const p of [0, 1, 2]) await eachMessage(payload(10 + p, 'evt-con', p)); // the redeliveries, acknowledged
    expect(Object.fromEntries(runs)).toEqual({ 'evt-seq': 1, 'evt-con': 1 });
  });

  it('eachBatch: one claimMany per batch; an in-flight record stops the run; the partition resumes from it', async () => {
    const inner = memoryStore();
    let claimManyCalls = 0;
    const store = {
      ...inner,
      claimMany: (ids: readonly string[], input: Parameters<NonNullable<typeof inner.claimMany>>[1]) => {
        claimManyCalls++;
        return inner.claimMany!(ids, input);
      },
    };
    const ran: string[] = [];
    const handler = ({ message }: { message: { message: KafkaMessage } }) => void ran.push(message.message.offset);
    const eachBatch = kafkaEachBatch({ name: 'ledger', store, retryDelayMs: 5, handler });
    const records = [0, 1, 2, 3, 4].map((o) => message(o));
    const part = partition('orders', records);
    // Another worker holds offset 2 right now.
    const other = kafkaEachBatch({
      name: 'ledger',
      store,
      handler: () => sleep(150),
    });
    const holding = other({ ...part.payload(), batch: { ...part.payload().batch, messages: [records[2]!] }, resolveOffset: () => {} });
    await sleep(10);
    await eachBatch(part.payload());
    expect(part.resolved()).toBe(1);
    expect(ran).toEqual(['0', '1']);
    expect(part.paused()).toBe(1);
    await holding;
    await eachBatch(part.payload()); // fetched again from offset 2
    expect(part.resolved()).toBe(4);
    expect(ran).toEqual(['0', '1', '3', '4']); // 2 was completed by the other worker: acknowledged, not run
    expect(claimManyCalls).toBe(3);
  });

  it('eachBatch: a record without an id fails the batch after the records before it are resolved, every time it is fetched (no silent refetch loop)', async () => {
    const store = memoryStore();
    const ran: string[] = [];
    const missing: unknown[] = [];
    const eachBatch = kafkaEachBatch({
      name: 'ids',
      store,
      // An id of its own, which this record lacks (a header falls back to topic/partition/offset).
      messageId: (record) => record.message.headers?.['event-id']?.toString(),
      retryDelayMs: 5,
      handler: ({ message }) => void ran.push(message.message.offset),
    });
    eachBatch.consumer.on('missingId', (e) => missing.push(e.error));
    const part = partition('orders', [message(0, 'evt-0'), message(1), message(2, 'evt-2')]);
    await expect(eachBatch(part.payload())).rejects.toThrow('record orders/0/1 has no message id');
    expect(ran).toEqual(['0']);
    expect(part.resolved()).toBe(0);
    // Fetched again from offset 1: it fails again at once, and nothing runs.
    await expect(eachBatch(part.payload())).rejects.toThrow('record orders/0/1 has no message id');
    expect(ran).toEqual(['0']);
    expect(part.resolved()).toBe(0);
    expect(missing).toHaveLength(2);
  });

  it('eachBatch: a heartbeat that throws mid-batch (a rebalance) releases the later claims; the refetch runs them at once', async () => {
    const store = memoryStore();
    const ran: string[] = [];
    const handler = ({ message }: { message: { message: KafkaMessage } }) => void ran.push(message.message.offset);
    const records = [0, 1, 2, 3, 4].map((o) => message(o));
    const part = partition('rebalanced', records);
    let heartbeats = 0;
    const rebalancing: EachBatchPayload = {
      ...part.payload(),
      heartbeat: async () => {
        // KafkaJS throws from heartbeat() once the group is rebalancing.
        if (++heartbeats === 2) throw Object.assign(new Error('The group is rebalancing, so a rejoin is needed'), { type: 'REBALANCE_IN_PROGRESS' });
      },
    };
    const first = kafkaEachBatch({ name: 'settle', store, retryDelayMs: 5, handler });
    await expect(first(rebalancing)).rejects.toThrow('rebalancing');
    expect(part.resolved()).toBe(1);
    expect(ran).toEqual(['0', '1']);
    // The partition goes to another member (same store, same name), fetched from the first unresolved offset,
    // and again from the start: 2, 3, 4 run at once (not in flight), 0 and 1 are duplicates.
    const next = kafkaEachBatch({ name: 'settle', store, retryDelayMs: 5, handler });
    const again = partition('rebalanced', records);
    const duplicates: string[] = [];
    next.consumer.on('duplicate', ({ id }) => duplicates.push(id));
    await next(again.payload());
    expect(duplicates).toEqual(['rebalanced/0/0', 'rebalanced/0/1']);
    expect(again.resolved()).toBe(4);
    expect(again.paused()).toBe(0);
    expect(ran).toEqual(['0', '1', '2', '3', '4']);
  });

  it('eachBatch: an isStale() that throws releases the claims not yet run; the refetch runs them at once', async () => {
    const store = memoryStore();
    const ran: string[] = [];
    const handler = ({ message }: { message: { message: KafkaMessage } }) => void ran.push(message.message.offset);
    const records = [0, 1, 2, 3].map((o) => message(o));
    const part = partition('stale', records);
    let asked = 0;
    const throwing: EachBatchPayload = {
      ...part.payload(),
      isStale: () => {
        if (++asked === 2) throw new Error('consumer group generation changed');
        return false;
      },
    };
    const first = kafkaEachBatch({ name: 'stale', store, retryDelayMs: 5, handler });
    await expect(first(throwing)).rejects.toThrow('generation changed');
    expect(part.resolved()).toBe(0);
    expect(ran).toEqual(['0']);
    const next = kafkaEachBatch({ name: 'stale', store, retryDelayMs: 5, handler });
    await next(part.payload()); // fetched again from offset 1
    expect(part.resolved()).toBe(3);
    expect(part.paused()).toBe(0);
    expect(ran).toEqual(['0', '1', '2', '3']);
  });
});
