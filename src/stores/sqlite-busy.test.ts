import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../engine/engine.js';
import { sqliteStore } from './sqlite.js';
import { holdWriteLock } from '../../test/support/sqlite-lock.js';

const dir = mkdtempSync(join(tmpdir(), 'oncely-sqlite-busy-'));
const children: ChildProcess[] = [];
afterAll(() => {
  for (const child of children) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

/** Counts event-loop turns while `work` runs: a blocked loop counts none. */
async function ticksDuring<T>(work: Promise<T>): Promise<{ result: PromiseSettledResult<T>; ticks: number; ms: number }> {
  let ticks = 0;
  const timer = setInterval(() => ticks++, 10);
  const started = Date.now();
  const [result] = await Promise.allSettled([work]);
  clearInterval(timer);
  return { result, ticks, ms: Date.now() - started };
}

describe('SQLite: another process holding the write lock never blocks the event loop', () => {
  it('a claim waits for the lock asynchronously and wins once it is released', async () => {
    const file = join(dir, 'wait.db');
    const store = sqliteStore({ database: new Database(file), purge: false, busyTimeoutMs: 5_000 });
    const engine = new Engine({ store, sessions: false });
    await holdWriteLock(file, 600, children);
    const { result, ticks, ms } = await ticksDuring(engine.begin({ id: 'k-wait', fingerprint: null }));
    expect(result.status === 'fulfilled' && result.value.kind).toBe('run');
    expect(ms).toBeGreaterThanOrEqual(400);
    // A loop blocked in SQLite's busy handler would have counted next to nothing in 600 ms.
    expect(ticks).toBeGreaterThan(ms / 10 / 3);
    await store.close();
  });

  it('a claim that cannot get the lock within busyTimeoutMs answers unavailable, and the loop keeps turning', async () => {
    const file = join(dir, 'timeout.db');
    const store = sqliteStore({ database: new Database(file), purge: false, busyTimeoutMs: 300 });
    const engine = new Engine({ store, sessions: false });
    const child = await holdWriteLock(file, 3_000, children);
    const { result, ticks, ms } = await ticksDuring(engine.begin({ id: 'k-timeout', fingerprint: null }));
    expect(result.status === 'fulfilled' && result.value).toMatchObject({ kind: 'unavailable', error: { code: 'ONCELY_STORE_UNAVAILABLE' } });
    expect(ms).toBeLessThan(2_000);
    expect(ticks).toBeGreaterThan(ms / 10 / 3);
    child.kill('SIGKILL');
    await store.close();
  });

  it('the store turns SQLite\'s blocking busy handler off on its connection (configure), and leaves it alone without configure', async () => {
    const configured = new Database(join(dir, 'configured.db'));
    const store = sqliteStore({ database: configured, purge: false });
    expect(configured.pragma('busy_timeout', { simple: true })).toBe(0);
    await store.close();
    const own = new Database(join(dir, 'own.db'));
    own.pragma('journal_mode = WAL');
    own.pragma('busy_timeout = 1234');
    const untouched = sqliteStore({ database: own, purge: false, configure: false });
    expect(own.pragma('busy_timeout', { simple: true })).toBe(1234);
    await untouched.close();
  });
});
