/**
 * oncely/otel without `@opentelemetry/api` installed: every entry point is a
 * no-op (no listener on the engine, no hooks, the store returned as it is),
 * so the request path costs nothing. The package's absence is simulated by a
 * `require` that cannot find it, as Node answers for a missing package: in
 * this file's module graph (a mocked `createRequire`), and in a child
 * process whose resolver refuses it (through the package's own exports).
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
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

describe('oncely/otel in a process where @opentelemetry/api cannot be resolved', () => {
  it('imports, instruments nothing, and the engine runs', async () => {
    const root = fileURLToPath(new URL('../..', import.meta.url));
    const dir = mkdtempSync(join(tmpdir(), 'oncely-otel-absent-'));
    try {
      // Node's own resolver refuses the package, as when it is not installed.
      const preload = join(dir, 'no-otel.cjs');
      writeFileSync(
        preload,
        `const Module = require('node:module');
const resolve = Module._resolveFilename;
Module._resolveFilename = function (request, ...rest) {
  if (request === '@opentelemetry/api') throw Object.assign(new Error("Cannot find module '@opentelemetry/api'"), { code: 'MODULE_NOT_FOUND' });
  return resolve.call(this, request, ...rest);
};`,
      );
      const script = `
import { Engine } from 'oncely';
import { instrument, instrumentStore, otelAvailable, otelHooks } from 'oncely/otel';
import { memoryStore } from 'oncely/stores/memory';
const store = memoryStore();
const engine = new Engine({ store: instrumentStore(store), hooks: otelHooks() });
const otel = instrument(engine);
const begun = await engine.begin({ id: 'a', fingerprint: null });
const stored = begun.kind === 'run' && (await begun.claim.complete('{}'));
otel.dispose();
console.log(JSON.stringify({ available: otelAvailable(), sameStore: engine.store === store, stored }));
`;
      const output = await new Promise<string>((resolve, reject) => {
        execFile(
          process.execPath,
          ['--conditions=source', '--require', preload, '--import', 'tsx', '--input-type=module', '-e', script],
          { cwd: root, timeout: 60_000 },
          (error, stdout, stderr) => (error ? reject(new Error(`${error.message}\n${stderr}`)) : resolve(stdout)),
        );
      });
      expect(JSON.parse(output.trim().split('\n').at(-1)!)).toEqual({ available: false, sameStore: true, stored: true });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
