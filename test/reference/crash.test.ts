/**
 * Crashes: the real `reference/main.ts` in a child process on SQLite files,
 * killed with SIGKILL at the worst moments and restarted on the same files.
 * A retry with the same key is answered correctly, the payment is made
 * exactly once, and no key stays stuck beyond its lease.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, it } from 'vitest';
import { kill9, killAllServers, startServer } from '../support/reference-process.js';

const LEASE_MS = 1000;
const dirs: string[] = [];

afterAll(() => {
  killAllServers();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

interface Answer {
  status: number;
  replayed: boolean;
  text: string;
  json: () => Record<string, unknown>;
}

async function post(url: string, account: string, key: string, body: unknown): Promise<Answer> {
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${account}`, 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  return {
    status: res.status,
    replayed: res.headers.get('idempotent-replayed') === 'true',
    text,
    json: () => JSON.parse(text) as Record<string, unknown>,
  };
}

async function list(url: string, path: string, account: string): Promise<Array<Record<string, unknown>>> {
  const res = await fetch(url + path, { headers: { authorization: `Bearer ${account}` } });
  if (res.status !== 200) throw new Error(`GET ${path} answered ${res.status}`);
  return ((await res.json()) as { data: Array<Record<string, unknown>> }).data;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** Wait until the server holds a claim (a record in progress) in the store file of `dir`. */
async function claimed(dir: string): Promise<void> {
  await until('the claim in the store', async () => {
    let db: Database.Database | undefined;
    try {
      db = new Database(join(dir, 'oncely.db'), { readonly: true, fileMustExist: true });
      const row = db.prepare('SELECT count(*) AS n FROM oncely_records WHERE state = 0').get() as { n: number };
      return row.n > 0 ? true : undefined;
    } catch {
      return undefined; // not created yet
    } finally {
      db?.close();
    }
  });
}

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-ref-crash-'));
  dirs.push(dir);
  return dir;
}

// The scenarios use separate files and ports, so they run side by side to keep the file short.
describe.concurrent('the reference server killed with SIGKILL and restarted on the same SQLite files', { timeout: 120_000 }, () => {
  it('while the payment handler runs (before it charges): the retry charges once, after the lease at the latest', async ({ expect }) => {
    const dir = tempDir();
    const env = { PAYMENT_DELAY_MS: '3000' };
    const account = 'crash-before';
    const key = `k-${Date.now()}`;
    const body = { amount: 1234, currency: 'EUR' };

    let server = await startServer(dir, env);
    const inFlight = post(`${server.url}/payments`, account, key, body).catch((error: unknown) => error);
    await claimed(dir);
    await sleep(200); // claimed and sleeping in the "PSP call"
    await kill9(server);
    const killedAt = Date.now();
    expect(await inFlight).toBeInstanceOf(Error); // the connection died with the server

    server = await startServer(dir, env);
    // Right after the restart: still leased (409, retry later) or already taken over (201).
    const early = await post(`${server.url}/payments`, account, key, body);
    expect([409, 201], early.text).toContain(early.status);
    if (early.status === 409) {
      expect(early.json().type).toBe('https://oncely.dev/problems/in-flight');
      // No key stays stuck beyond its lease: once it has run out, the retry takes over and runs.
      await sleep(Math.max(0, killedAt + LEASE_MS + 100 - Date.now()));
    }
    const retry = early.status === 201 ? early : await post(`${server.url}/payments`, account, key, body);
    expect(retry.status, retry.text).toBe(201);
    expect(retry.replayed).toBe(false);
    expect(retry.json()).toMatchObject({ amount: 1234, currency: 'EUR', status: 'succeeded' });

    const payments = await list(server.url, '/payments', account);
    expect(payments).toHaveLength(1);
    expect(payments[0]!.id).toBe(retry.json().id);
    const replay = await post(`${server.url}/payments`, account, key, body);
    expect(replay.status).toBe(201);
    expect(replay.replayed).toBe(true);
    expect(replay.text).toBe(retry.text);
    await kill9(server);
  });

  it('after the payment committed but before the answer: the retry returns that same payment, not a second one', async ({ expect }) => {
    const dir = tempDir();
    const env = { PAYMENT_DELAY_AFTER_MS: '3000' };
    const account = 'crash-after';
    const key = `k-${Date.now()}`;
    const body = { amount: 5000, currency: 'GBP', customer: 'cus_9' };

    let server = await startServer(dir, env);
    const inFlight = post(`${server.url}/payments`, account, key, body).catch((error: unknown) => error);
    const committed = await until('the payment row', async () => {
      const payments = await list(server.url, '/payments', account);
      return payments.length === 1 ? payments[0] : undefined;
    });
    await kill9(server);
    const killedAt = Date.now();
    expect(await inFlight).toBeInstanceOf(Error);

    server = await startServer(dir, env);
    // Wait out the dead server's lease, then retry: the takeover finds the committed payment.
    await sleep(Math.max(0, killedAt + LEASE_MS + 100 - Date.now()));
    const retry = await post(`${server.url}/payments`, account, key, body);
    expect(retry.status, retry.text).toBe(201);
    // Not a replay: the handler ran again (takeover) and found the payment by its idempotency record id.
    expect(retry.replayed).toBe(false);
    expect(retry.json()).toEqual(committed);
    expect(await list(server.url, '/payments', account)).toHaveLength(1);
    const replay = await post(`${server.url}/payments`, account, key, body);
    expect(replay.replayed).toBe(true);
    expect(replay.text).toBe(retry.text);
    // The ledger event committed with the payment is relayed after the restart, and applied once.
    const ledger = await until('the ledger entry', async () => {
      const res = await fetch(`${server.url}/ledger`, { headers: { authorization: `Bearer ${account}` } });
      const view = (await res.json()) as { data: Array<{ payment: string }>; balance: Record<string, number> };
      return view.data.length > 0 ? view : undefined;
    });
    await sleep(300);
    const settled = (await (await fetch(`${server.url}/ledger`, { headers: { authorization: `Bearer ${account}` } })).json()) as typeof ledger;
    expect(settled.data.map((e) => e.payment)).toEqual([committed.id]);
    expect(settled.balance).toEqual({ GBP: 5000 });
    await kill9(server);
  });

  it('an order killed after paying and before recording: the retried order reuses the payment (derived key)', async ({ expect }) => {
    const dir = tempDir();
    const env = { ORDER_DELAY_MS: '3000' };
    const account = 'crash-order';
    const key = `o-${Date.now()}`;
    const body = { currency: 'EUR', items: [{ sku: 'book', quantity: 2, price: 1500 }] };

    let server = await startServer(dir, env);
    const inFlight = post(`${server.url}/orders`, account, key, body).catch((error: unknown) => error);
    const paid = await until('the order payment', async () => {
      const payments = await list(server.url, '/payments', account);
      return payments.length === 1 ? payments[0] : undefined;
    });
    expect(await list(server.url, '/orders', account)).toHaveLength(0);
    await kill9(server);
    const killedAt = Date.now();
    expect(await inFlight).toBeInstanceOf(Error);

    server = await startServer(dir, env);
    await sleep(Math.max(0, killedAt + LEASE_MS + 100 - Date.now()));
    const retry = await post(`${server.url}/orders`, account, key, body);
    expect(retry.status, retry.text).toBe(201);
    expect(retry.replayed).toBe(false);
    expect(retry.json()).toMatchObject({ status: 'paid', total: 3000, payment: paid.id });
    expect(await list(server.url, '/payments', account)).toEqual([paid]);
    expect(await list(server.url, '/orders', account)).toHaveLength(1);
    await kill9(server);
  });

  it('a second server on the same files answers 409 while the dead one holds the lease, and takes over within the lease', async ({ expect }) => {
    const dir = tempDir();
    const env = { PAYMENT_DELAY_MS: '2000' };
    const account = 'crash-peer';
    const key = `k-${Date.now()}`;
    const body = { amount: 777, currency: 'SEK' };
    const a = await startServer(dir, env);
    const b = await startServer(dir, env);
    const inFlight = post(`${a.url}/payments`, account, key, body).catch((error: unknown) => error);
    await claimed(dir);
    await sleep(200);
    await kill9(a);
    const killedAt = Date.now();
    expect(await inFlight).toBeInstanceOf(Error);

    const first = await post(`${b.url}/payments`, account, key, body);
    expect(first.status, first.text).toBe(409);
    // Retry until the lease the dead server held runs out; the retry that takes over runs the payment.
    let conflicts = 1;
    let sentAt = Date.now();
    let answer = first;
    while (answer.status === 409) {
      await sleep(100);
      sentAt = Date.now();
      answer = await post(`${b.url}/payments`, account, key, body);
      if (answer.status === 409) conflicts++;
    }
    expect(answer.status, answer.text).toBe(201);
    expect(conflicts).toBeGreaterThanOrEqual(1);
    // Renewed every LEASE_MS/3, so the lease ends at most LEASE_MS after the kill; the rest is
    // poll interval and request latency on a busy machine (a stuck key would never get through:
    // it would stay in progress until its 24 h retention).
    expect(sentAt - killedAt).toBeLessThanOrEqual(LEASE_MS + 2000);
    expect(await list(b.url, '/payments', account)).toHaveLength(1);
    await kill9(b);
  });

  it('SIGTERM lets the payment in flight finish, then exits with code 0', async ({ expect }) => {
    const dir = tempDir();
    const server = await startServer(dir, { PAYMENT_DELAY_MS: '1500' });
    const exited = new Promise<number | null>((resolve) => server.child.once('exit', (code) => resolve(code)));
    const inFlight = post(`${server.url}/payments`, 'graceful', `k-${Date.now()}`, { amount: 1, currency: 'EUR' });
    await claimed(dir);
    server.child.kill('SIGTERM');
    await sleep(200);
    // A request arriving during the shutdown is refused with a problem, and runs nothing.
    const late = await post(`${server.url}/payments`, 'graceful', `late-${Date.now()}`, { amount: 2, currency: 'EUR' }).catch(
      () => undefined, // or the listener is already closed
    );
    if (late) {
      expect(late.status, late.text).toBe(503);
      expect(late.json().type).toBe('https://oncely.dev/problems/reference/shutting-down');
    }
    const answer = await inFlight;
    expect(answer.status, answer.text).toBe(201);
    expect(await exited).toBe(0);
    expect(server.output()).toMatch(/SIGTERM: shutting down/);
  });
});
