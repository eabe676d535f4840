/**
 * Request bodies that once slipped past the fingerprint, through every front
 * door on the memory store.
 */
import { memoryStore } from 'oncely/stores/memory';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DOORS, startApp, type TestApp } from './apps.js';

let n = 0;
const newKey = () => `hostile-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;

async function post(app: TestApp, key: string, body: string, headers: Record<string, string> = {}) {
  const res = await fetch(`${app.url}/payments`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'idempotency-key': key, ...headers },
    body,
  });
  return { status: res.status, type: res.headers.get('content-type'), text: await res.text() };
}

describe.each(DOORS)('%s', (door) => {
  let app: TestApp;
  beforeAll(async () => {
    app = await startApp(door, { store: memoryStore() });
  });
  afterAll(() => app.close());

  // 4,100 levels (8 KB of brackets) overflowed the old recursive walk under a
  // server's deeper stack; 50,000 overflow it anywhere.
  it.each([4_100, 50_000])('answers a body nested %i deep with 400 body-invalid, and runs nothing', async (depth) => {
    const before = app.executions();
    for (const body of ['['.repeat(depth) + ']'.repeat(depth), `${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}`]) {
      const res = await post(app, newKey(), body);
      expect({ status: res.status, text: res.text.slice(0, 200) }).toMatchObject({ status: 400 });
      expect(res.type).toMatch(/^application\/problem\+json/);
      expect(JSON.parse(res.text).type).toBe('https://oncely.dev/problems/body-invalid');
    }
    expect(app.executions()).toBe(before);
  });

  it('tells 1e400, -1e400 and null apart: one key cannot be reused across them', async () => {
    const key = newKey();
    expect((await post(app, key, '{"amount":1e400}')).status).toBe(201);
    for (const other of ['{"amount":null}', '{"amount":-1e400}']) {
      const res = await post(app, key, other);
      expect(res.status).toBe(422);
      expect(JSON.parse(res.text).type).toBe('https://oncely.dev/problems/key-reused');
    }
    expect((await post(app, key, '{"amount":1e400}')).status).toBe(201);
  });
});
