import { describe, expect, it } from 'vitest';
import { deriveKey } from '../client/derive.js';
import { memoryStore } from '../stores/memory.js';
import { type Claim, Engine } from './engine.js';
import { idempotent } from './idempotent.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let seq = 0;
const id = () => `step-${Date.now()}-${++seq}`;

async function won(engine: Engine, key: string): Promise<Claim> {
  const begun = await engine.begin({ id: key, fingerprint: null });
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  return begun.claim;
}

describe('recovery points: claim.step', () => {
  it('a retry after a failure resumes after the last completed step', async () => {
    const engine = new Engine({ store: memoryStore() });
    const key = id();
    const calls: string[] = [];
    const attempt = async (failPay: boolean) => {
      const claim = await won(engine, key);
      return claim.perform({
        run: async () => {
          const reserved = await claim.step('reserve', () => {
            calls.push('reserve');
            return { reservation: 'r1' };
          });
          const paid = await claim.step('pay', () => {
            calls.push('pay');
            if (failPay) throw new Error('psp down');
            return { payment: 'p1' };
          });
          return { ...reserved, ...paid };
        },
        settle: (value) => ({ kind: 'complete', outcome: JSON.stringify(value) }),
      });
    };
    expect(await attempt(true)).toMatchObject({ ok: false, settled: 'released' });
    expect(await attempt(false)).toMatchObject({ ok: true, value: { reservation: 'r1', payment: 'p1' }, settled: 'stored' });
    expect(calls).toEqual(['reserve', 'pay', 'pay']);
  });

  it('after a crash between steps, the takeover replays the done step and runs the rest once', async () => {
    const store = memoryStore();
    const dead = new Engine({ store, leaseMs: 150, sessions: false });
    const key = id();
    let reserves = 0;
    let pays = 0;
    const first = await won(dead, key);
    await first.step('reserve', () => ++reserves);
    first.abandon(); // the process dies here: nothing settles the claim, its renewals stop

    await sleep(200);
    const survivor = new Engine({ store, leaseMs: 150, sessions: false });
    const second = await won(survivor, key);
    expect(second.takeover).toBe(true);
    expect(await second.step('reserve', () => ++reserves)).toBe(1);
    expect(await second.step('pay', () => ++pays)).toBe(1);
    expect(await second.complete('done')).toBe(true);
    expect({ reserves, pays }).toEqual({ reserves: 1, pays: 1 });
  });

  it('a step cut off mid-call runs again under the same derived key, after its lease', async () => {
    const store = memoryStore();
    const dead = new Engine({ store, leaseMs: 150, sessions: false });
    const key = id();
    const keys: string[] = [];
    const first = await won(dead, key);
    let cut!: () => void;
    const stalled = first.step('pay', (step) => {
      keys.push(step.key);
      return new Promise<void>((resolve) => (cut = resolve));
    });
    await sleep(20);
    first.abandon();
    await sleep(200);
    const survivor = new Engine({ store, leaseMs: 150, sessions: false });
    const second = await won(survivor, key);
    const paid = await second.step('pay', (step) => {
      keys.push(step.key);
      expect(step.takeover).toBe(true);
      return 'paid';
    });
    expect(paid).toBe('paid');
    expect(keys).toEqual([deriveKey(key, 'pay'), deriveKey(key, 'pay')]);
    cut();
    await stalled.catch(() => undefined);
  });

  it('steps of two operations with one step name are kept apart; a step name is required', async () => {
    const engine = new Engine({ store: memoryStore() });
    const a = await won(engine, id());
    const b = await won(engine, id());
    expect(await a.step('pay', () => 'a')).toBe('a');
    expect(await b.step('pay', () => 'b')).toBe('b');
    await expect(a.step('', () => 1)).rejects.toMatchObject({ code: 'ONCELY_CONFIG' });
    await a.complete('x');
    await expect(a.step('late', () => 1)).rejects.toMatchObject({ code: 'ONCELY_CONFIG' });
  });

  it('idempotent() exposes steps through currentRun()', async () => {
    const { currentRun } = await import('./idempotent.js');
    let shipped = 0;
    let fail = true;
    const order = idempotent(
      async (orderId: string) => {
        const run = currentRun()!;
        await run.step('ship', () => ++shipped);
        if (fail) throw new Error('after shipping');
        return orderId;
      },
      { store: memoryStore(), namespace: 'orders', key: (orderId) => orderId },
    );
    await expect(order('o1')).rejects.toThrow('after shipping');
    fail = false;
    expect(await order('o1')).toBe('o1');
    expect(shipped).toBe(1);
  });
});

describe('steps belong to the request, not only to its key', () => {
  it('a key released after a failure and reused for another request does not get the first one\'s step results', async () => {
    const engine = new Engine({ store: memoryStore() });
    const key = id();
    const first = await engine.begin({ id: key, fingerprint: 'order-A' });
    if (first.kind !== 'run') throw new Error('expected run');
    expect(await first.claim.step('reserve', () => 'reservation for A')).toBe('reservation for A');
    await first.claim.release('failed later');
    const second = await engine.begin({ id: key, fingerprint: 'order-B' });
    if (second.kind !== 'run') throw new Error('expected run');
    expect(await second.claim.step('reserve', () => 'reservation for B')).toBe('reservation for B');
    await second.claim.release('failed later');
    const again = await engine.begin({ id: key, fingerprint: 'order-A' });
    if (again.kind !== 'run') throw new Error('expected run');
    expect(await again.claim.step('reserve', () => 'reserved twice')).toBe('reservation for A');
  });
});
