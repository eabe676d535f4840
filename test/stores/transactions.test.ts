/**
 * Transactional mode on the SQL stores, with real processes killed by
 * SIGKILL through the store child's fault hook: at any point a crash leaves
 * the business writes and the record's completion both or neither, never a
 * business row without its completed record, and the retry (another
 * engine, taking the dead process's claim over thanks to its session)
 * writes exactly once. The business table has no unique constraint: a
 * second run would show as a second row.
 */
import { randomBytes } from 'node:crypto';
import { Engine, type IdempotencyStore } from 'oncely';
import { afterAll, describe, expect, it } from 'vitest';
import { type Backend, killStoreChildren, openBackend, spawnStoreChild } from '../support/store-children.js';

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const FINGERPRINT = 'v1:store-child'; // the child's
const engines: Engine[] = [];
const backends: Backend[] = [];

afterAll(async () => {
  killStoreChildren();
  for (const engine of engines) await engine.close();
  for (const backend of backends) await backend.teardown();
});

/** The invariant after any crash: a business row only with its completed record, and never two. */
async function checkBothOrNeither(backend: Backend, store: IdempotencyStore, id: string): Promise<'both' | 'neither'> {
  const rows = await backend.businessRows(id);
  const record = await store.get(id);
  expect(rows).toBeLessThanOrEqual(1);
  if (rows === 1) {
    expect(record?.state, 'a business row has its completed record').toBe('completed');
    return 'both';
  }
  expect(record?.state, 'no business row: the record is not completed').not.toBe('completed');
  return 'neither';
}

describe.each(['postgres', 'mysql', 'sqlite'] as const)('transactional mode on %s, with SIGKILL', (name) => {
  let backend: Backend;
  const setup = async (): Promise<Engine> => {
    backend ??= await openBackend(name);
    if (!backends.includes(backend)) backends.push(backend);
    const engine = new Engine({ store: backend.store });
    engines.push(engine);
    return engine;
  };

  /** The retry, in this process: poll until the dead owner's claim is taken over, then run the same operation transactionally. */
  const retry = async (engine: Engine, id: string): Promise<{ ms: number; settled: string }> => {
    const started = Date.now();
    for (;;) {
      const begun = await engine.begin({ id, fingerprint: FINGERPRINT });
      if (begun.kind === 'replay') return { ms: Date.now() - started, settled: 'replayed' };
      if (begun.kind === 'run') {
        const performed = await begun.claim.perform({
          run: async (claim) => {
            await backend.write(await claim.transaction(), id);
            return { paid: 42, by: 'retry' };
          },
          settle: (value) => ({ kind: 'complete', outcome: JSON.stringify(value) }),
        });
        return { ms: Date.now() - started, settled: performed.settled };
      }
      expect(begun.kind).toBe('in_flight');
      expect(Date.now() - started, 'taken over within 5 s').toBeLessThan(5_000);
      await sleep(50);
    }
  };

  it('a SIGKILL between the business write and the commit leaves neither; the retry takes over within 2 s and writes once', async () => {
    const engine = await setup();
    const id = newId();
    const child = spawnStoreChild({ ...backend.env, ID: id, FAULT: 'before-commit' });
    await child.line('written');
    expect(await child.exited()).toBe('SIGKILL');
    expect(await checkBothOrNeither(backend, backend.store, id)).toBe('neither');
    expect((await backend.store.get(id))?.state, 'the record stays in progress for a takeover').toBe('in_progress');
    const { ms, settled } = await retry(engine, id);
    console.log(`${name}: killed before the commit; the retry took over and committed after ${ms} ms`);
    expect(settled).toBe('stored');
    expect(ms).toBeLessThan(2_000);
    expect(await backend.businessRows(id)).toBe(1);
    expect(await checkBothOrNeither(backend, backend.store, id)).toBe('both');
  }, 60_000);

  it('a SIGKILL right after the commit leaves both; the retry replays and writes nothing', async () => {
    const engine = await setup();
    const id = newId();
    const child = spawnStoreChild({ ...backend.env, ID: id, FAULT: 'after-commit' });
    await child.line('written');
    expect(await child.exited()).toBe('SIGKILL');
    expect(await checkBothOrNeither(backend, backend.store, id)).toBe('both');
    const { settled } = await retry(engine, id);
    expect(settled).toBe('replayed');
    expect(await backend.businessRows(id)).toBe(1);
  }, 60_000);

  it('crash after crash (after the claim, before the commit), then a run to the end: one business row, one completion', async () => {
    await setup();
    const id = newId();
    for (const fault of ['after-claim', 'before-commit', 'none']) {
      // Each child waits for the previous one's claim to be taken over (its session dies within 1 s).
      const child = spawnStoreChild({ ...backend.env, ID: id, FAULT: fault, WAIT_MS: '10000' });
      const claimed = await child.line('claimed');
      expect(claimed).toBe(fault === 'after-claim' ? 'claimed false' : 'claimed true');
      expect(await child.exited()).toBe(fault === 'none' ? 0 : 'SIGKILL');
      if (fault === 'none') expect(child.output()).toContain('done stored');
      expect(await checkBothOrNeither(backend, backend.store, id)).toBe(fault === 'none' ? 'both' : 'neither');
    }
    expect(await backend.businessRows(id)).toBe(1);
    const record = await backend.store.get(id);
    if (record?.state !== 'completed') throw new Error('expected completed');
    expect(JSON.parse(record.outcome)).toMatchObject({ paid: 42 });
  }, 120_000);
});
