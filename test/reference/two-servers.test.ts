/**
 * Two reference-server processes behind a load balancer, sharing one store
 * (Redis, PostgreSQL, or the SQLite file): the same key sent to both at the
 * same moment runs the payment handler once between them.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { killAllServers, startServer } from '../support/reference-process.js';

const dirs: string[] = [];
afterAll(() => {
  killAllServers();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

const STORES: Record<string, (dir: string) => string> = {
  sqlite: (dir) => `sqlite:${join(dir, 'oncely.db')}`,
  redis: () => 'redis://127.0.0.1:6379',
  postgres: () => 'postgres://postgres@127.0.0.1:5432/test',
};

describe.each(Object.entries(STORES))('two reference servers on one %s store', (_name, storeUrl) => {
  it('run the handler once between them for one key sent to both at once', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'oncely-two-'));
    dirs.push(dir);
    // Shared business data (one SQLite file, as one database behind two app servers) and one store.
    const env = { STORE_URL: storeUrl(dir), PAYMENT_DELAY_MS: '300', LEASE_MS: '10000' };
    const [a, b] = await Promise.all([startServer(dir, env, 10_000), startServer(dir, env, 10_000)]);
    const account = `acct_${randomBytes(6).toString('hex')}`;
    const key = `two-${randomBytes(8).toString('hex')}`;
    const send = (url: string) =>
      fetch(`${url}/payments`, {
        method: 'POST',
        headers: { authorization: `Bearer ${account}`, 'idempotency-key': key, 'content-type': 'application/json' },
        body: JSON.stringify({ amount: 1234, currency: 'EUR' }),
      }).then(async (res) => ({ status: res.status, replayed: res.headers.get('idempotent-replayed'), body: await res.text() }));

    const answers = await Promise.all(Array.from({ length: 40 }, (_, i) => send(i % 2 === 0 ? a.url : b.url)));
    expect(answers.filter((r) => r.status !== 201 && r.status !== 409)).toEqual([]);
    const fresh = answers.filter((r) => r.status === 201 && r.replayed === null);
    expect(fresh.length).toBe(1);

    // Once the first finished, both servers replay the one payment.
    const [fromA, fromB] = await Promise.all([send(a.url), send(b.url)]);
    expect(fromA.status).toBe(201);
    expect(fromB.status).toBe(201);
    expect(fromA.body).toBe(fresh[0]!.body);
    expect(fromB.body).toBe(fresh[0]!.body);

    const list = await fetch(`${a.url}/payments`, { headers: { authorization: `Bearer ${account}` } }).then((r) => r.json());
    expect((list as { data: unknown[] }).data).toHaveLength(1);
  }, 90_000);
});
