import { describe, expect, it } from 'vitest';
import type { CompletedRecord } from '../engine/store.js';
import { ConfigError } from '../errors/index.js';
import { ReplayCache } from './replay-cache.js';

const record = (outcome: string, expiresAt: number): CompletedRecord => ({ state: 'completed', fingerprint: 'fp', outcome, expiresAt });

describe('ReplayCache', () => {
  it('answers a record until the earlier of its expiry and its maximum age', () => {
    let now = 1_000;
    const cache = new ReplayCache({ maxAgeMs: 100, now: () => now });
    cache.put('long', record('a', 10_000));
    cache.put('short', record('b', 1_050));
    expect(cache.get('long')?.outcome).toBe('a');
    expect(cache.get('short')?.outcome).toBe('b');
    now = 1_050;
    expect(cache.get('short')).toBeUndefined();
    expect(cache.get('long')?.outcome).toBe('a');
    now = 1_100;
    expect(cache.get('long')).toBeUndefined();
    expect(cache.size).toBe(0);
  });

  it('drops the oldest entries beyond maxEntries or maxBytes', () => {
    const cache = new ReplayCache({ maxEntries: 2, maxBytes: 1_000 });
    cache.put('a', record('x', Date.now() + 60_000));
    cache.put('b', record('x', Date.now() + 60_000));
    cache.put('c', record('x', Date.now() + 60_000));
    expect([cache.get('a'), cache.get('b')?.outcome, cache.get('c')?.outcome]).toEqual([undefined, 'x', 'x']);
    // 300 UTF-16 units count 600 bytes: two do not fit in 1,000.
    cache.put('d', record('y'.repeat(300), Date.now() + 60_000));
    cache.put('e', record('z'.repeat(300), Date.now() + 60_000));
    expect(cache.get('d')).toBeUndefined();
    expect(cache.get('e')?.outcome).toHaveLength(300);
    // Larger than the whole budget: never kept, nothing else dropped for it.
    cache.put('huge', record('h'.repeat(600), Date.now() + 60_000));
    expect(cache.get('huge')).toBeUndefined();
    expect(cache.get('e')).toBeDefined();
  });

  it('replaces an entry put twice and forgets deleted ones', () => {
    const cache = new ReplayCache();
    cache.put('a', record('1', Date.now() + 60_000));
    cache.put('a', record('2', Date.now() + 60_000));
    expect(cache.size).toBe(1);
    expect(cache.get('a')?.outcome).toBe('2');
    cache.delete('a');
    cache.delete('never');
    expect(cache.get('a')).toBeUndefined();
    cache.put('b', record('3', Date.now() + 60_000));
    cache.clear();
    expect(cache.size).toBe(0);
  });

  it('refuses bounds that are not positive', () => {
    expect(() => new ReplayCache({ maxEntries: 0 })).toThrow(ConfigError);
    expect(() => new ReplayCache({ maxBytes: -1 })).toThrow(ConfigError);
    expect(() => new ReplayCache({ maxAgeMs: Number.NaN })).toThrow(ConfigError);
  });
});
