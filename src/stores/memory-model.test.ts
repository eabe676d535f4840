/**
 * The memory store against a plain model of the store contract, over long
 * random sequences: thousands of ids filling and emptying its own hash table
 * (growth, deletions that shift later entries back, slots reused), its
 * expiry wheel (records expiring while others are renewed), and its purge.
 * Any lookup that the table loses shows up as a wrong answer for that id:
 * for an idempotency store that would be a second run.
 */
import { describe, expect, it } from 'vitest';
import { mulberry32 as random } from '../testing/random.js';
import { memoryStore } from './memory.js';

interface ModelRecord {
  state: 'in_progress' | 'completed';
  token: string | null;
  fingerprint: string | null;
  leaseUntil: number;
  expiresAt: number;
  outcome: string | null;
}

const LEASE = 50;
const TTL = 120;

async function run(seed: number, ids: number, steps: number): Promise<void> {
  const rnd = random(seed);
  let now = 1_000_000;
  const store = memoryStore({ now: () => now });
  const model = new Map<string, ModelRecord>();
  const tokens = new Map<string, string>();
  const live = (id: string): ModelRecord | undefined => {
    const r = model.get(id);
    return r !== undefined && r.expiresAt > now ? r : undefined;
  };
  const owns = (id: string, token: string): ModelRecord | undefined => {
    const r = live(id);
    return r?.state === 'in_progress' && r.token === token ? r : undefined;
  };
  for (let step = 0; step < steps; step++) {
    const id = `id-${Math.floor(rnd() * ids)}`;
    const where = `seed ${seed}, step ${step}, ${id} at ${now}`;
    const roll = rnd();
    if (roll < 0.35) {
      const fingerprint = rnd() < 0.9 ? 'f' : 'g';
      const result = await store.claim(id, { fingerprint, leaseMs: LEASE, ttlMs: TTL });
      const r = live(id);
      if (r === undefined || (r.state === 'in_progress' && r.leaseUntil <= now && r.fingerprint === fingerprint)) {
        expect(result.status, where).toBe('acquired');
        if (result.status !== 'acquired') continue;
        expect(result.takeover, where).toBe(r !== undefined);
        tokens.set(id, result.token);
        model.set(id, { state: 'in_progress', token: result.token, fingerprint, leaseUntil: now + LEASE, expiresAt: Math.max(r?.expiresAt ?? 0, now + TTL), outcome: null });
      } else if (r.state === 'completed') {
        expect(result, where).toMatchObject({ status: 'completed', record: { outcome: r.outcome, fingerprint: r.fingerprint } });
      } else {
        expect(result, where).toMatchObject({ status: 'in_progress', fingerprint: r.fingerprint });
      }
    } else if (roll < 0.55) {
      const token = tokens.get(id) ?? 'none';
      const outcome = `outcome-${step}`;
      const r = owns(id, token);
      expect(await store.complete(id, token, outcome, TTL), where).toBe(r !== undefined);
      if (r) model.set(id, { ...r, state: 'completed', token: null, outcome, expiresAt: now + TTL });
    } else if (roll < 0.65) {
      const token = tokens.get(id) ?? 'none';
      const r = owns(id, token);
      expect(await store.release(id, token), where).toBe(r !== undefined);
      if (r) model.delete(id);
    } else if (roll < 0.75) {
      const token = tokens.get(id) ?? 'none';
      const r = owns(id, token);
      expect(await store.renew(id, token, LEASE), where).toBe(r !== undefined);
      if (r) model.set(id, { ...r, leaseUntil: now + LEASE, expiresAt: Math.max(r.expiresAt, now + LEASE) });
    } else if (roll < 0.8) {
      expect(await store.delete(id), where).toBe(live(id) !== undefined);
      model.delete(id);
    } else if (roll < 0.82) {
      await store.purgeExpired(1 + Math.floor(rnd() * 50));
    } else if (roll < 0.9) {
      now += 1 + Math.floor(rnd() * 15);
    } else {
      const r = live(id);
      const got = await store.get(id);
      if (r === undefined) expect(got, where).toBeNull();
      else expect(got, where).toMatchObject({ state: r.state, fingerprint: r.fingerprint, expiresAt: r.expiresAt });
    }
  }
  // Every id, at the end: nothing lost, nothing left over.
  for (let i = 0; i < ids; i++) {
    const id = `id-${i}`;
    const r = live(id);
    const got = await store.get(id);
    if (r === undefined) expect(got, `seed ${seed}, end, ${id}`).toBeNull();
    else expect(got, `seed ${seed}, end, ${id}`).toMatchObject({ state: r.state, expiresAt: r.expiresAt });
  }
  await store.close();
}

describe('memory store against a model of the contract', () => {
  it.each([1, 2, 3])('seed %i: 300 ids, 20,000 random operations and clock steps', async (seed) => {
    await run(seed, 300, 20_000);
  });
  it('seed 7: 3,000 ids (the table grows past its first size and empties again), 40,000 operations', async () => {
    await run(7, 3_000, 40_000);
  });
});
