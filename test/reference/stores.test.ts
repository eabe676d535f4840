/**
 * The reference system on each network store that `STORE_URL` selects
 * (Redis, PostgreSQL, MySQL/MariaDB), against the real local servers: a
 * payment, its replay, the 422, and 50 concurrent duplicates making one
 * payment. A server that is not running is skipped, and an unreachable
 * STORE_URL fails start-up fast with a clear message.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startReference } from '../../reference/app.js';
import { openStore } from '../../reference/store-url.js';

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

const urls: Array<[string, string]> = [
  ['redis', process.env.REFERENCE_REDIS_URL ?? 'redis://127.0.0.1:6379'],
  ['postgres', process.env.REFERENCE_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test'],
  ['mysql', process.env.REFERENCE_MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/test'],
];

async function reachable(url: string): Promise<boolean> {
  try {
    const opened = await openStore(url);
    await opened.close();
    return true;
  } catch {
    return false;
  }
}

async function post(url: string, account: string, key: string, body: unknown) {
  const res = await fetch(`${url}/payments`, {
    method: 'POST',
    headers: { authorization: `Bearer ${account}`, 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: res.status, replayed: res.headers.get('idempotent-replayed') === 'true', text: await res.text() };
}

describe.each(urls)('STORE_URL on %s', async (kind, storeUrl) => {
  const up = await reachable(storeUrl);

  it.skipIf(!up)('pays once, replays, refuses a changed body, and makes one payment from 50 concurrent duplicates', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'oncely-ref-store-'));
    dirs.push(dataDir);
    const ref = await startReference({ storeUrl, dataDir, port: 0, paymentDelayMs: 200 });
    try {
      const health = (await (await fetch(`${ref.url}/healthz`)).json()) as { store: string };
      expect(health.store).toBe(kind);
      const account = `acct-${kind}-${process.pid}-${Date.now()}`;
      const key = `k-${Math.random().toString(36).slice(2)}`;
      const body = { amount: 321, currency: 'EUR' };
      const first = await post(ref.url, account, key, body);
      expect(first.status, first.text).toBe(201);
      const again = await post(ref.url, account, key, body);
      expect(again).toMatchObject({ status: 201, replayed: true, text: first.text });
      expect((await post(ref.url, account, key, { ...body, amount: 322 })).status).toBe(422);

      const dupKey = `k-${Math.random().toString(36).slice(2)}`;
      const answers = await Promise.all(Array.from({ length: 50 }, () => post(ref.url, account, dupKey, body)));
      expect(answers.filter((a) => a.status >= 500)).toEqual([]);
      expect(answers.filter((a) => a.status === 201 && !a.replayed)).toHaveLength(1);
      expect(answers.filter((a) => a.status !== 201 && a.status !== 409)).toEqual([]);
      const list = await fetch(`${ref.url}/payments`, { headers: { authorization: `Bearer ${account}` } });
      expect(((await list.json()) as { data: unknown[] }).data).toHaveLength(2);
    } finally {
      await ref.close();
    }
  });
});

describe('an unreachable STORE_URL', () => {
  it.each([
    'redis://127.0.0.1:1',
    'postgres://postgres@127.0.0.1:1/test',
    'mysql://root@127.0.0.1:1/test',
  ])('%s fails start-up fast with a clear message', async (storeUrl) => {
    const started = Date.now();
    await expect(openStore(storeUrl)).rejects.toThrow(/cannot reach/);
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('an unknown scheme is refused', async () => {
    await expect(openStore('mongodb://x')).rejects.toThrow(/not supported/);
    await expect(openStore('sqlite:')).rejects.toThrow(/file path/);
  });
});
