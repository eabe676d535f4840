/** Fastify: the plugin's settings are checked when it is registered and when a route is added, not at a request. */
import Fastify, { type FastifyInstance } from 'fastify';
import { ConfigError } from 'oncely';
import { oncely } from 'oncely/fastify';
import { memoryStore } from 'oncely/stores/memory';
import { afterEach, describe, expect, it } from 'vitest';

let app: FastifyInstance | undefined;
afterEach(async () => {
  await app?.close();
  app = undefined;
});

describe('oncely/fastify: registration', () => {
  it('refuses a route setting that is not a positive duration when the route is added, with a ConfigError', async () => {
    app = Fastify();
    await app.register(oncely, { store: memoryStore(), scope: false });
    const handler = async () => ({ ok: true });
    expect(() => app!.post('/a', { config: { idempotency: { ttlMs: 0 } } }, handler)).toThrow(ConfigError);
    expect(() => app!.post('/b', { config: { idempotency: { leaseMs: -1 } } }, handler)).toThrow(/leaseMs/);
    expect(() => app!.post('/c', { config: { idempotency: { wait: { timeoutMs: 0 } } } }, handler)).toThrow(ConfigError);
    expect(() => app!.post('/d', { config: { idempotency: { ttl: 1000 } as never } }, handler)).toThrow(/ttl/);
    expect(() => app!.post('/e', { config: { idempotency: true as never } }, handler)).toThrow(ConfigError);
    // Valid settings and `false` are accepted.
    app.post('/f', { config: { idempotency: { ttlMs: 60_000, leaseMs: 1_000, wait: { timeoutMs: 500 } } } }, handler);
    app.post('/g', { config: { idempotency: false } }, handler);
    await app.ready();
  });

  it('says plainly that the plugin was registered twice on one instance', async () => {
    app = Fastify();
    await app.register(oncely, { store: memoryStore(), scope: false });
    const second = app.register(oncely, { store: memoryStore(), scope: false });
    await expect(second).rejects.toThrow(ConfigError);
    await expect(Promise.resolve(second).catch((e: Error) => e.message)).resolves.toMatch(/already registered/);
  });
});
