import { describe, expect, it } from 'vitest';
import type { IdempotencyStore } from '../engine/store.js';
import { memoryStore } from '../stores/memory.js';
import { IdempotentConsumer, shouldAcknowledge } from './core.js';
import { kafkaEachBatch, kafkaEachMessage, type EachBatchPayloadLike, type KafkaMessageLike } from './kafka.js';

/** A store that counts round trips and can be switched off. */
function countingStore(inner: IdempotencyStore = memoryStore()) {
  const calls: string[] = [];
  let down = false;
  const wrap =
    <A extends unknown[], R>(name: string, fn: (...a: A) => Promise<R>) =>
    async (...a: A): Promise<R> => {
      calls.push(name);
      if (down) throw new Error('store down');
      return fn(...a);
    };
  const store: IdempotencyStore = {
    ...inner,
    name: 'counting',
    claim: wrap('claim', inner.claim.bind(inner)),
    claimMany: wrap('claimMany', inner.claimMany!.bind(inner)),
    renew: wrap('renew', inner.renew.bind(inner)),
    complete: wrap('complete', inner.complete.bind(inner)),
    release: wrap('release', inner.release.bind(inner)),
  };
  return { store, calls, setDown: (value: boolean) => (down = value) };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('IdempotentConsumer', () => {
  it('runs a message once, acknowledges duplicates without running', async () => {
    let runs = 0;
    const consumer = new IdempotentConsumer<string>({ name: 'c', store: memoryStore(), handler: () => void runs++ });
    const first = await consumer.handle('m', 'id-1');
    const second = await consumer.handle('m', 'id-1');
    expect(first.action).toBe('processed');
    expect(second.action).toBe('duplicate');
    expect(shouldAcknowledge(second)).toBe(true);
    expect(runs).toBe(1);
  });

  it('does not run an in-flight duplicate, and two names are two consumers', async () => {
    const store = memoryStore();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let runs = 0;
    const consumer = new IdempotentConsumer<string>({ name: 'c', store, handler: async () => { runs++; await gate; } });
    const other = new IdempotentConsumer<string>({ name: 'other', store, handler: () => void runs++ });
    const running = consumer.handle('m', 'id');
    await sleep(5);
    const dup = await consumer.handle('m', 'id');
    expect(dup.action).toBe('in_flight');
    expect(shouldAcknowledge(dup)).toBe(false);
    expect((await other.handle('m', 'id')).action).toBe('processed');
    release();
    expect((await running).action).toBe('processed');
    expect(runs).toBe(2);
  });

  it('releases on failure so that a redelivery runs again', async () => {
    let attempts = 0;
    const released: string[] = [];
    const consumer = new IdempotentConsumer<string>({
      name: 'c',
      store: memoryStore(),
      hooks: { released: (e) => released.push(e.id) },
      handler: () => {
        if (++attempts === 1) throw new Error('boom');
      },
    });
    expect((await consumer.handle('m', 'x')).action).toBe('failed');
    expect((await consumer.handle('m', 'x')).action).toBe('processed');
    expect(released).toEqual(['x']);
  });

  it('does not run when the store is down, and runs once it is back', async () => {
    const { store, setDown } = countingStore();
    let runs = 0;
    const consumer = new IdempotentConsumer<string>({ name: 'c', store, storeTimeoutMs: 200, handler: () => void runs++ });
    setDown(true);
    const verdict = await consumer.handle('m', 'x');
    expect(verdict.action).toBe('store_error');
    expect(runs).toBe(0);
    setDown(false);
    expect((await consumer.handle('m', 'x')).action).toBe('processed');
    expect(runs).toBe(1);
  });

  it('renews the lease and calls working() while the handler runs; the signal is passed', async () => {
    const { store, calls } = countingStore();
    let workings = 0;
    let sawSignal = false;
    const consumer = new IdempotentConsumer<string>({
      name: 'c',
      store,
      leaseMs: 90,
      workingIntervalMs: 20,
      handler: async ({ signal }) => {
        sawSignal = signal instanceof AbortSignal && !signal.aborted;
        await sleep(200);
      },
    });
    expect((await consumer.handle('m', 'x', { working: () => void workings++ })).action).toBe('processed');
    expect(sawSignal).toBe(true);
    expect(workings).toBeGreaterThanOrEqual(5);
    expect(calls.filter((c) => c === 'renew').length).toBeGreaterThanOrEqual(3);
  });

  it('claims a batch in one store round trip and runs a repeated id once', async () => {
    const { store, calls } = countingStore();
    const seen: string[] = [];
    const consumer = new IdempotentConsumer<string>({ name: 'c', store, handler: ({ message }) => void seen.push(message) });
    const verdicts = await consumer.handleBatch(
      ['a', 'b', 'a', 'c'].map((m) => ({ message: m, id: m })),
    );
    expect(verdicts.map((v) => v.action)).toEqual(['processed', 'processed', 'duplicate', 'processed']);
    expect(seen).toEqual(['a', 'b', 'c']);
    expect(calls.filter((c) => c.startsWith('claim'))).toEqual(['claimMany']);
    // 1 claimMany + 3 completes for 4 messages.
    expect(calls.length).toBe(4);
    const again = await consumer.handleBatch(['a', 'b'].map((m) => ({ message: m, id: m })));
    expect(again.map((v) => v.action)).toEqual(['duplicate', 'duplicate']);
  });

  it('completes a handler that outlived failed renewals when nobody took the message over (a redelivery is a duplicate)', async () => {
    const inner = memoryStore();
    // A store blip that only renewals meet: claim, complete and release stay real.
    let renewFailsUntil = 0;
    const store: IdempotencyStore = {
      ...inner,
      renew: async (id, token, leaseMs) => {
        if (Date.now() < renewFailsUntil) throw new Error('store blip');
        return inner.renew(id, token, leaseMs);
      },
    };
    let runs = 0;
    let aborted = false;
    const consumer = new IdempotentConsumer<string>({
      name: 'c',
      store,
      leaseMs: 60,
      handler: async ({ signal }) => {
        runs++;
        renewFailsUntil = Date.now() + 150;
        await sleep(200); // well past the 60 ms lease: every renewal meanwhile fails
        aborted = signal.aborted;
      },
    });
    const verdict = await consumer.handle('m', 'x');
    expect(aborted).toBe(true); // the local lease deadline passed unrenewed
    expect(verdict.action).toBe('processed');
    expect((await inner.get(consumer.recordIdOf('x')))?.state).toBe('completed');
    expect((await consumer.handle('m', 'x')).action).toBe('duplicate');
    expect(runs).toBe(1);
  });

  it('a batch that throws part-way (onVerdict, shouldContinue) releases every claim it did not run, then rethrows', async () => {
    const store = memoryStore();
    const ran: string[] = [];
    const consumer = new IdempotentConsumer<string>({ name: 'c', store, handler: ({ message }) => void ran.push(message) });
    const items = (ids: string[]) => ids.map((m) => ({ message: m, id: m }));
    const state = async (id: string) => (await store.get(consumer.recordIdOf(id)))?.state ?? 'absent';

    await expect(
      consumer.handleBatch(items(['a', 'b', 'c', 'd']), {
        onVerdict: (_verdict, i) => {
          if (i === 1) throw new Error('rebalance');
        },
      }),
    ).rejects.toThrow('rebalance');
    expect(await Promise.all(['a', 'b', 'c', 'd'].map(state))).toEqual(['completed', 'completed', 'absent', 'absent']);

    // Overlapped completions: the ones already travelling are stored before the error comes out.
    let asked = 0;
    await expect(
      consumer.handleBatch(items(['e', 'f', 'g', 'h']), {
        overlapCompletion: true,
        shouldContinue: () => {
          if (++asked === 3) throw new Error('stale');
          return true;
        },
      }),
    ).rejects.toThrow('stale');
    expect(await Promise.all(['e', 'f', 'g', 'h'].map(state))).toEqual(['completed', 'completed', 'absent', 'absent']);
    expect(ran).toEqual(['a', 'b', 'e', 'f']);
  });

  it('stops a batch at the first break and releases the claims after it', async () => {
    const store = memoryStore();
    const consumer = new IdempotentConsumer<string>({
      name: 'c',
      store,
      handler: ({ message }) => {
        if (message === 'b') throw new Error('b fails');
      },
    });
    const verdicts = await consumer.handleBatch(['a', 'b', 'c'].map((m) => ({ message: m, id: m })), { stopAtFirstBreak: true });
    expect(verdicts.map((v) => v.action)).toEqual(['processed', 'failed', 'skipped']);
    expect(await store.get(consumer.recordIdOf('c'))).toBeNull();
  });
});

function kafkaMessage(offset: number, headers: Record<string, unknown> = {}): KafkaMessageLike {
  return { offset: String(offset), key: null, value: Buffer.from(`v${offset}`), headers, timestamp: String(Date.now()) };
}

describe('Kafka adapter (KafkaJS payload shapes)', () => {
  it('eachMessage: handles once by header, throws (and pauses) while in flight', async () => {
    const store = memoryStore();
    let runs = 0;
    let gateOpen!: () => void;
    const gate = new Promise<void>((r) => (gateOpen = r));
    const eachMessage = kafkaEachMessage({
      name: 'k',
      store,
      header: 'event-id',
      retryDelayMs: 10,
      handler: async () => {
        runs++;
        await gate;
      },
    });
    let paused = 0;
    const payload = (offset: number) => ({
      topic: 't',
      partition: 0,
      message: kafkaMessage(offset, { 'event-id': Buffer.from('e1') }),
      heartbeat: async () => {},
      pause: () => {
        paused++;
        return () => {};
      },
    });
    const first = eachMessage(payload(1));
    await sleep(5);
    await expect(eachMessage(payload(2))).rejects.toMatchObject({ code: 'ONCELY_IN_FLIGHT' });
    expect(paused).toBe(1);
    gateOpen();
    await first;
    await expect(eachMessage(payload(3))).resolves.toBeUndefined();
    expect(runs).toBe(1);
  });

  it('eachBatch: resolves offsets only across the unbroken run', async () => {
    const store = memoryStore();
    const ran: string[] = [];
    const eachBatch = kafkaEachBatch({
      name: 'kb',
      store,
      retryDelayMs: 10,
      handler: ({ message }) => {
        ran.push(message.message.offset);
        if (message.message.offset === '12') throw new Error('fails');
      },
    });
    const resolved: string[] = [];
    const payload: EachBatchPayloadLike = {
      batch: { topic: 't', partition: 3, messages: [10, 11, 12, 13].map((o) => kafkaMessage(o)) },
      resolveOffset: (o) => void resolved.push(o),
      heartbeat: async () => {},
      commitOffsetsIfNecessary: async () => {},
      isRunning: () => true,
      isStale: () => false,
    };
    await expect(eachBatch(payload)).rejects.toThrow('fails');
    expect(resolved).toEqual(['10', '11']);
    expect(ran).toEqual(['10', '11', '12']);
    // Redelivery from offset 12 (KafkaJS fetches again from the first unresolved offset).
    const ok = kafkaEachBatch({ name: 'kb', store, handler: ({ message }) => void ran.push(`again-${message.message.offset}`) });
    resolved.length = 0;
    await ok({ ...payload, batch: { ...payload.batch, messages: [10, 11, 12, 13].map((o) => kafkaMessage(o)) } });
    expect(resolved).toEqual(['10', '11', '12', '13']);
    expect(ran.slice(3)).toEqual(['again-12', 'again-13']);
  });
});
