import { createHmac } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ConfigError } from '../errors/index.js';
import { HttpIdempotency } from '../http/core.js';
import { IdempotentConsumer } from '../consumer/core.js';
import { memoryStore } from '../stores/memory.js';
import { keyedRecordId, recordId, recordIdFor } from './fingerprint.js';
import { idempotent } from './idempotent.js';

const SECRET = 'a secret of sixteen bytes or more';

describe('keyed record ids', () => {
  it('are an HMAC-SHA-256 of namespace, scope and key: stable, and not the plain SHA-256 a guess could confirm', () => {
    const idOf = keyedRecordId(SECRET);
    const expected = createHmac('sha256', SECRET).update('ns\u0000acct_x\u0000order-1001').digest('hex');
    expect(idOf('order-1001', 'acct_x', 'ns')).toBe(expected);
    expect(idOf('order-1001', 'acct_x', 'ns')).not.toBe(recordId('order-1001', 'acct_x', 'ns'));
    expect(keyedRecordId(Buffer.from(SECRET))('order-1001', 'acct_x', 'ns')).toBe(expected);
    expect(keyedRecordId('another secret, also long')('order-1001', 'acct_x', 'ns')).not.toBe(expected);
    expect(recordIdFor(undefined)).toBe(recordId);
  });

  it('refuse a secret shorter than 16 bytes', () => {
    expect(() => keyedRecordId('short')).toThrow(ConfigError);
    expect(() => keyedRecordId(new Uint8Array(15))).toThrow(ConfigError);
    expect(() => new HttpIdempotency({ store: memoryStore(), scope: false, secret: 'short' })).toThrow(ConfigError);
  });

  it('are what the HTTP core, idempotent() and the consumers store under', async () => {
    const store = memoryStore();
    const core = new HttpIdempotency<null>({ store, scope: () => 'acct_x', secret: SECRET, namespace: 'api' });
    const begun = await core.begin({
      raw: null,
      method: 'POST',
      path: '/payments',
      query: '',
      header: (name) => (name === 'idempotency-key' ? ['order-1001'] : undefined),
      body: undefined,
    });
    if (begun.kind !== 'run') throw new Error('expected run');
    expect(begun.run.context.id).toBe(keyedRecordId(SECRET)('order-1001', 'acct_x', 'api'));
    expect(await store.get(recordId('order-1001', 'acct_x', 'api'))).toBeNull();
    expect(await store.get(begun.run.context.id)).not.toBeNull();

    const fn = idempotent(async () => 1, { store, secret: SECRET, namespace: 'fn', key: () => 'k', fingerprint: false });
    await fn();
    expect(await store.get(keyedRecordId(SECRET)('k', '', 'fn'))).toMatchObject({ state: 'completed' });

    const consumer = new IdempotentConsumer({ name: 'ledger', store, secret: SECRET, handler: () => {} });
    expect(consumer.recordIdOf('m1')).toBe(keyedRecordId(SECRET)('m1', '', 'consumer:ledger'));
  });
});
