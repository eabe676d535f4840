/**
 * The reference system under abuse, as the audit attacked it: sockets that
 * send headers and part of a body and then stall, hundreds at once, against
 * a process with 256 descriptors; a client that never finishes its headers;
 * keep-alive sockets left idle; an unauthenticated client keeping its
 * socket. And the files: every database file mode 0600, even under umask 000.
 *
 * The real `reference/main.ts` runs in a child process (started through
 * `sh` for `ulimit -n` and `umask`), with short timeouts so that each test
 * takes seconds; the child's descriptors are counted in /proc/<pid>/fd.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readdirSync, rmSync, statSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CONNECTION_DEFAULTS, referenceOptionsFromEnv, startReference } from '../../reference/app.js';

const ROOT = join(import.meta.dirname, '..', '..');
const HEADERS_TIMEOUT_MS = 1_000;
const REQUEST_TIMEOUT_MS = 1_500;
const IDLE_TIMEOUT_MS = 2_000;
/** Node checks the header and request deadlines every HEADERS_TIMEOUT_MS / 4 (see reference/app.ts). */
const CHECK_MS = HEADERS_TIMEOUT_MS / 4;
/** Slack for a loaded machine on top of a deadline and its check interval. */
const SLACK_MS = 1_500;
const STALLS = 300;

const dirs: string[] = [];
const children = new Set<ChildProcess>();
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-limits-'));
  dirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

interface Child {
  url: string;
  port: number;
  child: ChildProcess;
  /** Open descriptors of the server process now. */
  fds(): number;
  output(): string;
}

/** `reference/main.ts` through `sh -c 'ulimit -n …; umask …; exec node …'`, so the pid is the server's. */
function startChild(dir: string, env: Record<string, string>, shell: string): Promise<Child> {
  const child = spawn(
    'sh',
    ['-c', `${shell} && exec "$0" "$@"`, process.execPath, '--conditions=source', '--import', 'tsx', 'reference/main.ts'],
    {
      cwd: ROOT,
      env: {
        ...process.env,
        PORT: '0',
        HOST: '127.0.0.1',
        STORE_URL: `sqlite:${join(dir, 'oncely.db')}`,
        DATA_DIR: dir,
        HEADERS_TIMEOUT_MS: String(HEADERS_TIMEOUT_MS),
        REQUEST_TIMEOUT_MS: String(REQUEST_TIMEOUT_MS),
        IDLE_TIMEOUT_MS: String(IDLE_TIMEOUT_MS),
        ...env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  children.add(child);
  let out = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start in 45 s:\n${out}`)), 45_000);
    child.stdout!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      const match = /listening on (http:\/\/\S+)/.exec(out);
      if (match) {
        clearTimeout(timer);
        resolve({
          url: match[1]!,
          port: Number(new URL(match[1]!).port),
          child,
          fds: () => readdirSync(`/proc/${child.pid}/fd`).length,
          output: () => out,
        });
      }
    });
    child.stderr!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before listening:\n${out}`));
    });
  });
}

/** A raw client socket and what happened to it, in ms since `t0`. */
interface Raw {
  socket: Socket;
  data: string;
  /** When the server closed it (ms since t0); -1 while open. */
  closedAt: number;
  closed: Promise<void>;
}

function raw(port: number, text: string, t0 = Date.now()): Raw {
  const socket = connect(port, '127.0.0.1');
  const entry: Raw = { socket, data: '', closedAt: -1, closed: Promise.resolve() };
  entry.closed = new Promise((resolve) => {
    socket.on('close', () => {
      entry.closedAt = Date.now() - t0;
      resolve();
    });
  });
  socket.on('data', (chunk: Buffer) => {
    entry.data += chunk.toString();
  });
  socket.on('error', () => {}); // resets are expected (see the descriptor-limit test)
  socket.on('connect', () => {
    if (text !== '') socket.write(text);
  });
  return entry;
}

/** Headers of a payment that promises 1,000 bytes of body, and the first few of them: then nothing. */
const stalledPayment = (key: string): string =>
  `POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer acct_stall\r\nIdempotency-Key: ${key}\r\n` +
  'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"amount": 1';

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function pay(url: string, key: string): Promise<Response> {
  return fetch(`${url}/payments`, {
    method: 'POST',
    headers: { authorization: 'Bearer acct_ok', 'idempotency-key': key, 'content-type': 'application/json' },
    body: '{"amount": 100, "currency": "EUR"}',
    signal: AbortSignal.timeout(5_000),
  });
}

/** Wait until `condition` holds, checking every 50 ms, for at most `ms`. */
async function until(condition: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (condition()) return true;
    await sleep(50);
  }
  return condition();
}

describe('connection limits (child process, umask 000, short timeouts)', () => {
  let server: Child;
  let dir: string;
  let baseline: number;
  beforeAll(async () => {
    dir = tempDir();
    server = await startChild(dir, { MAX_REQUESTS_PER_SOCKET: '3' }, 'umask 000');
    // One request first, so that lazily opened files and modules are open before counting.
    expect((await pay(server.url, 'warm-up')).status).toBe(201);
    baseline = server.fds();
  }, 60_000);

  it(`${STALLS} never-ending bodies: closed with 408 on time, while the server keeps serving; descriptors come back`, async () => {
    const t0 = Date.now();
    const stalls = Array.from({ length: STALLS }, (_, i) => raw(server.port, stalledPayment(`stall-${i}`), t0));
    // The server really holds them (the baseline may include a client connection since closed).
    let peak = 0;
    await until(() => {
      peak = Math.max(peak, server.fds());
      return peak >= baseline + STALLS - 5;
    }, REQUEST_TIMEOUT_MS - 200);
    expect(peak).toBeGreaterThanOrEqual(baseline + STALLS - 5);

    // Meanwhile a real client is served: a payment, created and replayed.
    const created = await pay(server.url, 'during-the-stalls');
    expect(created.status).toBe(201);
    const again = await pay(server.url, 'during-the-stalls');
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    expect(stalls.every((s) => s.closedAt === -1)).toBe(true);

    await Promise.all(stalls.map((s) => s.closed));
    const latest = Math.max(...stalls.map((s) => s.closedAt));
    expect(latest).toBeLessThan(REQUEST_TIMEOUT_MS + CHECK_MS + SLACK_MS);
    expect(Math.min(...stalls.map((s) => s.closedAt))).toBeGreaterThanOrEqual(REQUEST_TIMEOUT_MS - 100);
    for (const s of stalls) expect(s.data).toMatch(/^HTTP\/1\.1 408 /);
    expect(stalls[0]!.data).toContain('https://oncely.dev/problems/reference/request-timeout');
    // Every descriptor is given back (a few for the client connections made meanwhile).
    expect(await until(() => server.fds() <= baseline + 5, 2_000)).toBe(true);
    // None of the stalled payments ran.
    const listed = await fetch(`${server.url}/payments`, { headers: { authorization: 'Bearer acct_stall' } });
    expect(((await listed.json()) as { data: unknown[] }).data).toEqual([]);
  }, 30_000);

  it('headers that never end, and a connection that sends nothing: closed at the headers timeout', async () => {
    const t0 = Date.now();
    const partial = raw(server.port, 'POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer acct_1\r\nX-Slow: ', t0);
    const silent = raw(server.port, '', t0);
    await Promise.all([partial.closed, silent.closed]);
    for (const s of [partial, silent]) {
      expect(s.closedAt).toBeGreaterThanOrEqual(HEADERS_TIMEOUT_MS - 100);
      expect(s.closedAt).toBeLessThan(HEADERS_TIMEOUT_MS + CHECK_MS + SLACK_MS);
    }
    expect(partial.data).toMatch(/^HTTP\/1\.1 408 /);
  }, 15_000);

  it('an idle keep-alive connection is closed after the idle timeout', async () => {
    const t0 = Date.now();
    const idle = raw(server.port, 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n', t0);
    await until(() => idle.data.includes('"status":"ok"'), 3_000);
    expect(idle.data).toMatch(/^HTTP\/1\.1 200 /);
    expect(idle.data.toLowerCase()).toContain('connection: keep-alive');
    await idle.closed;
    expect(idle.closedAt).toBeGreaterThanOrEqual(IDLE_TIMEOUT_MS - 100);
    expect(idle.closedAt).toBeLessThan(IDLE_TIMEOUT_MS + SLACK_MS);
  }, 15_000);

  it('MAX_REQUESTS_PER_SOCKET: the third answer on one connection closes it', async () => {
    const t0 = Date.now();
    const conn = raw(server.port, '', t0);
    const ask = 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n';
    let third = 0;
    for (let i = 1; i <= 3; i++) {
      conn.socket.write(ask);
      expect(await until(() => conn.data.split('HTTP/1.1 200').length - 1 === i, 3_000)).toBe(true);
      third = Date.now() - t0;
    }
    await conn.closed;
    expect(conn.closedAt - third).toBeLessThan(IDLE_TIMEOUT_MS / 2); // at once, not at the idle timeout
    const answers = conn.data.toLowerCase().split('http/1.1 200').slice(1);
    expect(answers).toHaveLength(3);
    expect(answers[0]).toContain('connection: keep-alive');
    expect(answers[2]).toContain('connection: close');
  }, 15_000);

  it('a 401 closes the connection at once, even with a body still announced', async () => {
    const t0 = Date.now();
    const anonymous = raw(
      server.port,
      'POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"amount":',
      t0,
    );
    const keepAlive = raw(server.port, 'GET /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not/valid\r\n\r\n', t0);
    await Promise.all([anonymous.closed, keepAlive.closed]);
    for (const s of [anonymous, keepAlive]) {
      expect(s.data).toMatch(/^HTTP\/1\.1 401 /);
      expect(s.data.toLowerCase()).toContain('connection: close');
      expect(s.closedAt).toBeLessThan(HEADERS_TIMEOUT_MS); // long before any timeout
    }
    // An authenticated client keeps its connection.
    const fine = raw(server.port, 'GET /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer acct_1\r\n\r\n');
    await until(() => fine.data.includes('"data"'), 3_000);
    expect(fine.data.toLowerCase()).toContain('connection: keep-alive');
    expect(fine.closedAt).toBe(-1);
    fine.socket.destroy();
  }, 15_000);

  it('every database file, with its -wal and -shm, is mode 0600 under umask 000', () => {
    for (const name of ['oncely.db', 'reference.db']) {
      for (const file of [name, `${name}-wal`, `${name}-shm`]) {
        expect((statSync(join(dir, file)).mode & 0o777).toString(8), file).toBe('600');
      }
    }
    expect((statSync(dir).mode & 0o777).toString(8)).toBe('700'); // created by the server
  });
});

describe('descriptor limit: ulimit -n 256', () => {
  it(`${STALLS} never-ending bodies against 256 descriptors: beyond the limit reset at once, the rest closed on time, then served again`, async () => {
    const server = await startChild(tempDir(), {}, 'ulimit -n 256');
    try {
      expect((await pay(server.url, 'before')).status).toBe(201);
      const t0 = Date.now();
      const stalls = Array.from({ length: STALLS }, (_, i) => raw(server.port, stalledPayment(`stall-${i}`), t0));
      await sleep(300);
      expect(server.fds()).toBeLessThanOrEqual(256);
      await Promise.all(stalls.map((s) => s.closed));
      const timedOut = stalls.filter((s) => s.data.startsWith('HTTP/1.1 408 '));
      const refused = stalls.filter((s) => s.data === '');
      // Those the descriptors allowed were held and answered 408 on time; the others were reset at once, not left hanging.
      expect(timedOut.length + refused.length).toBe(STALLS);
      expect(timedOut.length).toBeGreaterThan(150);
      expect(Math.max(...timedOut.map((s) => s.closedAt))).toBeLessThan(REQUEST_TIMEOUT_MS + CHECK_MS + SLACK_MS);
      for (const s of refused) expect(s.closedAt).toBeLessThan(REQUEST_TIMEOUT_MS);

      // Alive, its descriptors given back, and serving.
      expect(server.child.exitCode).toBeNull();
      expect(await until(() => server.fds() < 100, 2_000)).toBe(true);
      expect((await pay(server.url, 'after')).status).toBe(201);
    } finally {
      server.child.kill('SIGKILL');
    }
  }, 60_000);
});

describe('database files already there', () => {
  it('an existing 0644 store file is brought down to 0600 when the server opens it', async () => {
    const dir = tempDir();
    const store = join(dir, 'oncely.db');
    closeSync(openSync(store, 'w', 0o644));
    const ref = await startReference({ storeUrl: `sqlite:${store}`, dataDir: dir, port: 0 });
    try {
      for (const file of ['oncely.db', 'oncely.db-wal', 'oncely.db-shm', 'reference.db', 'reference.db-wal']) {
        expect((statSync(join(dir, file)).mode & 0o777).toString(8), file).toBe('600');
      }
    } finally {
      await ref.close();
    }
  });
});

describe('settings from the environment', () => {
  it('defaults: 10 s headers, 30 s request, 60 s idle, 1000 requests per socket', () => {
    expect(referenceOptionsFromEnv({})).toMatchObject({
      headersTimeoutMs: 10_000,
      requestTimeoutMs: 30_000,
      idleTimeoutMs: 60_000,
      maxRequestsPerSocket: 1_000,
    });
    expect(CONNECTION_DEFAULTS).toEqual({ headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 60_000, maxRequestsPerSocket: 1_000 });
  });

  it('reads each, and refuses nonsense', () => {
    expect(
      referenceOptionsFromEnv({ HEADERS_TIMEOUT_MS: '5000', REQUEST_TIMEOUT_MS: '7000', IDLE_TIMEOUT_MS: '9000', MAX_REQUESTS_PER_SOCKET: '50' }),
    ).toMatchObject({ headersTimeoutMs: 5_000, requestTimeoutMs: 7_000, idleTimeoutMs: 9_000, maxRequestsPerSocket: 50 });
    expect(() => referenceOptionsFromEnv({ REQUEST_TIMEOUT_MS: '0' })).toThrow(/REQUEST_TIMEOUT_MS must be an integer >= 1/);
    expect(() => referenceOptionsFromEnv({ IDLE_TIMEOUT_MS: 'soon' })).toThrow(/IDLE_TIMEOUT_MS/);
    expect(() => referenceOptionsFromEnv({ HEADERS_TIMEOUT_MS: '40000' })).toThrow(
      /HEADERS_TIMEOUT_MS \(40000\) cannot be longer than REQUEST_TIMEOUT_MS \(30000\)/,
    );
  });
});
