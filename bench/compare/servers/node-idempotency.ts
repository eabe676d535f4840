/**
 * @node-idempotency/core with @node-idempotency/storage-adapter-redis.
 * There is no @node-idempotency/express or /fastify on npm, so this wires
 * the core the way the project's own @node-idempotency/nestjs interceptor
 * does: `onRequest` before the handler (a cached response is replayed with
 * its status and `Idempotent-Replayed: true`; IdempotencyError codes map to
 * 409 + Retry-After, 422 and 400), then `onResponse` with the body and
 * status, awaited before the answer is sent; a handler error is stored too.
 */
import { Idempotency, IdempotencyError } from '@node-idempotency/core';
import { RedisStorageAdapter } from '@node-idempotency/storage-adapter-redis';

const CODES: Record<string, number> = {
  IDEMPOTENCY_FINGERPRINT_MISSMATCH: 422,
  IDEMPOTENCY_KEY_LEN_EXEEDED: 400,
  IDEMPOTENCY_KEY_MISSING: 400,
  REQUEST_IN_PROGRESS: 409,
};

export interface Params {
  headers: Record<string, unknown>;
  body?: Record<string, unknown>;
  path: string;
  method: string;
}

export type Before =
  | { kind: 'run' }
  | { kind: 'respond'; status: number; headers: Record<string, string>; body: unknown };

export async function makeIdempotency(prefix: string) {
  const storage = new RedisStorageAdapter({ url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', name: prefix });
  await storage.connect();
  const idempotency = new Idempotency(storage, { cacheKeyPrefix: prefix });

  async function before(params: Params): Promise<Before> {
    try {
      const cached = await idempotency.onRequest(params);
      if (!cached) return { kind: 'run' };
      const additional = (cached.additional ?? {}) as Record<string, unknown>;
      const headers: Record<string, string> = { 'idempotent-replayed': 'true' };
      if (typeof additional['Content-Type'] === 'string') headers['content-type'] = additional['Content-Type'];
      const status = typeof additional.statusCode === 'number' ? additional.statusCode : 200;
      return { kind: 'respond', status, headers, body: cached.body ?? cached.error };
    } catch (error) {
      if (error instanceof IdempotencyError) {
        const status = CODES[error.code] ?? 500;
        const headers: Record<string, string> = status === 409 ? { 'retry-after': '1' } : {};
        return { kind: 'respond', status, headers, body: { error: error.message } };
      }
      throw error;
    }
  }

  async function after(params: Params, status: number, contentType: string | undefined, body: unknown): Promise<void> {
    const additional: Record<string, unknown> = { statusCode: status };
    if (contentType) additional['Content-Type'] = contentType;
    await idempotency.onResponse(params, status >= 400 ? { error: body, additional } : { body, additional });
  }

  return { before, after, close: () => storage.disconnect() };
}
