/**
 * oncely/otel without `@opentelemetry/api` installed: every entry point is a
 * no-op (no listener on the engine, no hooks, the store returned as it is),
 * so the request path costs nothing. The package's absence is simulated by a
 * `require` that cannot find it, as Node answers for a missing package.
 */
import { describe, expect, it, vi } from 'vitest';
import { Engine } from '../engine/engine.js';
import { memoryStore } from '../stores/memory.js';

vi.mock('node:module', async (importOriginal) => {
  const actual = await importOriginal<typeof import('node:module')>();
  return {
    ...actual,
    createRequire: (from: string | URL) => {
      const real = actual.createRequire(from);
      return Object.assign((id: string) => {
        if (id === '@opentelemetry/api') {
          throw Object.assign(new Error(`Cannot find module '${id}'`), { code: 'MODULE_NOT_FOUND' });
        }
        return real(id);
      }, real);
    },
  };
});

const { instrument, instrumentStore, otelAvailable, otelHooks } = await import('./index.js');

describe('oncely/otel when @opentelemetry/api is absent', () => {
  it('otelAvailable() says so', () => {
    expect(otelAvailable()).toBe(false);
  });

  it('instrument() subscribes nothing and its dispose does nothing', async () => {
    const engine = new Engine({ store: memoryStore() });
    const on = vi.spyOn(engine, 'on');
    const otel = instrument(engine);
    expect(on).not.toHaveBeenCalled();
    otel.dispose();
    const begun = await engine.begin({ id: 'absent-1', fingerprint: null });
    expect(begun.kind).toBe('run');
    if (begun.kind === 'run') expect(await begun.claim.complete('{}')).toBe(true);
  });

  it('otelHooks() is empty and instrumentStore() returns the store itself', () => {
    expect(otelHooks()).toEqual({});
    const store = memoryStore();
    expect(instrumentStore(store)).toBe(store);
  });
});
