/**
 * `oncely verify` against the reference system (every check passes, exit 0)
 * and against a deliberately non-idempotent server (the right checks fail,
 * exit 1), in-process and through the real CLI entry; `inspect` and `purge`
 * on a SQLite store the reference system wrote.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { type AddressInfo, createServer as createNetServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type RunningReference, startReference } from '../../reference/app.js';
import { type BrokenServer, startBrokenServer } from '../../test/support/broken-server.js';
import { recordId } from '../engine/fingerprint.js';
import { sqliteStore } from '../stores/sqlite.js';
import { type Io, run } from './main.js';
import { CHECK_NAMES, type VerifyReport, verify } from './verify.js';

const run$ = promisify(execFile);
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const AUTH: [string, string] = ['authorization', 'Bearer acct_verify'];
const ORDER_BODY = '{"currency":"EUR","items":[{"sku":"tea-{{n}}","quantity":2,"price":{{n}}}]}';

/** Runs the real `oncely` entry point (`node --conditions=source --import tsx src/cli/main.ts`). */
async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run$(
      process.execPath,
      ['--conditions=source', '--import', 'tsx', 'src/cli/main.ts', ...args],
      { cwd: ROOT, timeout: 60_000 },
    );
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code?: number; stdout: string; stderr: string };
    if (typeof e.code !== 'number') throw error;
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** An Io that keeps what the command printed. */
function capture(): Io & { text: () => string } {
  const lines: string[] = [];
  return { out: (t) => lines.push(t), err: (t) => lines.push(t), text: () => lines.join('\n') };
}

function statuses(report: VerifyReport): Record<string, string> {
  return Object.fromEntries(report.checks.map((c) => [c.name, c.status]));
}

const dirs: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-cli-'));
  dirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe('verify against the reference system', () => {
  let ref: RunningReference;
  let storePath: string;
  beforeAll(async () => {
    const dir = tempDir();
    storePath = join(dir, 'oncely.db');
    ref = await startReference({ storeUrl: `sqlite:${storePath}`, dataDir: dir, port: 0 });
  });
  afterAll(() => ref?.close());

  it('POST /payments: every check passes, with its evidence', async () => {
    const report = await verify({ url: `${ref.url}/payments`, headers: [AUTH] });
    expect(statuses(report), JSON.stringify(report, null, 2)).toEqual(Object.fromEntries(CHECK_NAMES.map((n) => [n, 'pass'])));
    expect(report.passed).toBe(true);
    const byName = Object.fromEntries(report.checks.map((c) => [c.name, c]));
    expect(byName['missing-key']!.evidence[0]).toContain('400 problem key-missing');
    expect(byName.reuse!.evidence[1]).toContain('422 problem key-reused');
    expect(byName.replay!.evidence.join('\n')).toMatch(/replayed/);
    expect(byName['dropped-retry']!.summary).toMatch(/^same resource pay_/);
    // Bounded: a fixed number of requests.
    expect(report.requests).toBeLessThan(60);

    // The payments the checks made: one per successful logical operation, none duplicated.
    const listed = await fetch(`${ref.url}/payments`, { headers: { authorization: AUTH[1] } });
    const amounts = ((await listed.json()) as { data: Array<{ amount: number }> }).data.map((p) => p.amount);
    expect(new Set(amounts).size).toBe(amounts.length);
  });

  it('POST /orders with a body template and -c 30: every check passes (exit 0)', async () => {
    const io = capture();
    const code = await run(
      ['verify', `${ref.url}/orders`, '-H', `Authorization: ${AUTH[1]}`, '-d', ORDER_BODY, '-c', '30'],
      io,
    );
    expect(code, io.text()).toBe(0);
    expect(io.text()).toMatch(/PASSED: 6\/6 checks passed/);
    for (const name of CHECK_NAMES) expect(io.text()).toMatch(new RegExp(`${name}\\s+PASS`));
  });

  it('a body without placeholders: reuse cannot run (SKIP fails the run) unless skipped on request', async () => {
    const body = '{"amount":100,"currency":"EUR"}';
    const report = await verify({ url: `${ref.url}/payments`, headers: [AUTH], body, concurrency: 5 });
    expect(statuses(report)).toMatchObject({ replay: 'pass', reuse: 'skip', concurrency: 'pass' });
    expect(report.checks.find((c) => c.name === 'reuse')!.summary).toMatch(/no \{\{n\}\} or \{\{uuid\}\}/);
    expect(report.passed).toBe(false);
    const skipped = await verify({ url: `${ref.url}/payments`, headers: [AUTH], body, concurrency: 5, skip: ['reuse'] });
    expect(skipped.passed).toBe(true);
  });

  it('through the real CLI entry with --json: exit 0, every check passed', async () => {
    const { code, stdout, stderr } = await cli(['verify', `${ref.url}/payments`, '--header', `Authorization: ${AUTH[1]}`, '--json']);
    expect(code, stderr).toBe(0);
    const report = JSON.parse(stdout) as VerifyReport;
    expect(report.passed).toBe(true);
    expect(report.checks.map((c) => c.status)).toEqual(CHECK_NAMES.map(() => 'pass'));
  });

  it('inspect shows a completed record; purge deletes only expired ones', async () => {
    const key = 'inspect-me-1';
    const res = await fetch(`${ref.url}/payments`, {
      method: 'POST',
      headers: { authorization: AUTH[1], 'idempotency-key': key, 'content-type': 'application/json' },
      body: '{"amount": 777, "currency": "EUR"}',
    });
    expect(res.status).toBe(201);
    const payment = (await res.json()) as { id: string };

    const io = capture();
    expect(await run(['inspect', '--store', `sqlite:${storePath}`, '--key', key, '--scope', 'acct_verify', '--json', '--show-body'], io)).toBe(0);
    const shown = JSON.parse(io.text()) as {
      id: string;
      state: string;
      fingerprint: string;
      expiresAt: string;
      outcome: { kind: string; status: number; bodyHead: string };
    };
    expect(shown.id).toBe(recordId(key, 'acct_verify', ''));
    expect(shown.state).toBe('completed');
    expect(shown.fingerprint).toMatch(/^v1:[0-9a-f]{64}$/);
    expect(Date.parse(shown.expiresAt)).toBeGreaterThan(Date.now());
    expect(shown.outcome).toMatchObject({ kind: 'response', status: 201 });
    expect(shown.outcome.bodyHead).toContain(payment.id);

    // Human form, through the real entry.
    const human = await cli(['inspect', '--store', `sqlite:${storePath}`, '--key', key, '--scope', 'acct_verify']);
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout).toMatch(/state\s+completed/);
    expect(human.stdout).toMatch(/outcome\s+response 201/);

    // Another scope is another record: absent.
    const other = capture();
    expect(await run(['inspect', '--store', `sqlite:${storePath}`, '--key', key, '--scope', 'acct_other'], other)).toBe(0);
    expect(other.text()).toMatch(/state\s+absent/);

    // Expire two records by hand (as time would), then purge: exactly those go.
    const db = new Database(storePath);
    try {
      const expired = db.prepare('UPDATE oncely_records SET expires_at = ? WHERE rowid IN (SELECT rowid FROM oncely_records WHERE id != ? LIMIT 2)');
      expect(expired.run(Date.now() - 1000, shown.id).changes).toBe(2);
    } finally {
      db.close();
    }
    const purged = await cli(['purge', '--store', `sqlite:${storePath}`, '--json']);
    expect(purged.code, purged.stderr).toBe(0);
    expect(JSON.parse(purged.stdout)).toMatchObject({ deleted: 2, nativeTtl: false });
    const again = capture();
    expect(await run(['purge', '--store', `sqlite:${storePath}`], again)).toBe(0);
    expect(again.text()).toBe('purged 0 expired record(s)');
    const still = capture();
    await run(['inspect', '--store', `sqlite:${storePath}`, '--key', key, '--scope', 'acct_verify'], still);
    expect(still.text()).toMatch(/state\s+completed/);
  });

  it('inspect shows the lease of an in-progress record', async () => {
    const database = new Database(storePath);
    const store = sqliteStore({ database, purgeIntervalMs: 0 });
    try {
      const claim = await store.claim(recordId('running-1', 'acct_verify', 'jobs'), { fingerprint: 'v1:abc', leaseMs: 60_000, ttlMs: 120_000 });
      expect(claim.status).toBe('acquired');
      const io = capture();
      const args = ['inspect', '--store', `sqlite:${storePath}`, '--key', 'running-1', '--scope', 'acct_verify'];
      expect(await run([...args, '--namespace', 'jobs'], io)).toBe(0);
      expect(io.text()).toMatch(/state\s+in_progress/);
      expect(io.text()).toMatch(/fingerprint v1:abc/);
      expect(io.text()).toMatch(/lease until \S+ \(\d+ ms left\)/);
      const json = capture();
      await run([...args, '--namespace', 'jobs', '--json'], json);
      expect((JSON.parse(json.text()) as { leaseRemainingMs: number }).leaseRemainingMs).toBeGreaterThan(50_000);
      // Without the namespace it is another record.
      const other = capture();
      await run(args, other);
      expect(other.text()).toMatch(/state\s+absent/);
    } finally {
      await store.close();
      database.close();
    }
  });
});

describe('verify against a non-idempotent server', () => {
  let broken: BrokenServer;
  beforeAll(async () => {
    broken = await startBrokenServer();
  });
  afterAll(() => broken?.close());

  it('fails every check, each with the evidence of a second resource or a missing refusal', async () => {
    const report = await verify({ url: `${broken.url}/payments`, concurrency: 10 });
    expect(statuses(report)).toEqual(Object.fromEntries(CHECK_NAMES.map((n) => [n, 'fail'])));
    expect(report.passed).toBe(false);
    const byName = Object.fromEntries(report.checks.map((c) => [c.name, c]));
    expect(byName['missing-key']!.summary).toBe('expected 4xx, got 201');
    expect(byName['malformed-key']!.summary).toBe('3 of 3 not refused with 400');
    expect(byName.replay!.summary).toMatch(/body differs .*no Idempotent-Replayed: true/);
    expect(byName.reuse!.summary).toBe('expected 422, got 201');
    expect(byName.concurrency!.summary).toBe('11 resources from one key');
    expect(byName['dropped-retry']!.summary).toMatch(/^a second resource: res_\d+ then res_\d+$/);
  });

  it('through the real CLI entry: exit 1, JSON says which checks failed', async () => {
    const { code, stdout } = await cli(['verify', `${broken.url}/payments`, '--json', '-c', '5']);
    expect(code).toBe(1);
    const report = JSON.parse(stdout) as VerifyReport;
    expect(report.passed).toBe(false);
    expect(report.checks.filter((c) => c.status === 'fail').map((c) => c.name)).toEqual([...CHECK_NAMES]);
  });

  it('--skip leaves a check out of the verdict', async () => {
    const io = capture();
    const code = await run(
      ['verify', `${broken.url}/payments`, ...CHECK_NAMES.flatMap((n) => ['--skip', n])],
      io,
    );
    expect(code, io.text()).toBe(0);
    expect(io.text()).toMatch(/replay\s+SKIP/);
  });
});

describe('answers that say nothing about keys', () => {
  it('a 401 (bad token) is not taken for a refused key', async () => {
    const ref = await startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0 });
    try {
      const report = await verify({ url: `${ref.url}/payments`, headers: [['authorization', 'Bearer nobody!']] });
      // A bad token is 401 before any key logic: verify says the 401 is not about keys.
      expect(report.checks[0]!.status).toBe('fail');
      expect(report.checks[0]!.summary).toBe('401 says nothing about the key');
    } finally {
      await ref.close();
    }
  });
});

describe('usage', () => {
  it('exit 2 on usage errors, 0 on --help', async () => {
    const cases: string[][] = [
      [],
      ['nope'],
      ['verify'],
      ['verify', 'ftp://x'],
      ['verify', 'http://127.0.0.1:1/x', '--bogus'],
      ['verify', 'http://127.0.0.1:1/x', '-c', 'many'],
      ['verify', 'http://127.0.0.1:1/x', '--skip', 'everything'],
      ['verify', 'http://127.0.0.1:1/x', '-H', 'no colon'],
      ['inspect', '--store', 'sqlite:x.db'],
      ['purge'],
      ['purge', '--store', 'mongodb://x'],
    ];
    for (const args of cases) {
      const io = capture();
      expect(await run(args, io), args.join(' ')).toBe(2);
    }
    for (const command of ['verify', 'inspect', 'purge']) {
      const io = capture();
      expect(await run([command, '--help'], io)).toBe(0);
      expect(io.text()).toMatch(new RegExp(`^Usage: oncely ${command}`));
    }
  });

  it('a store file that does not exist is an error (exit 1), not an empty answer', async () => {
    const io = capture();
    const missing = join(tempDir(), 'absent.db');
    expect(await run(['inspect', '--store', `sqlite:${missing}`, '--key', 'k'], io)).toBe(1);
    expect(io.text()).toMatch(/cannot open sqlite:/);
  });

  it('a server that never answers: bounded by --timeout and --max-time', async () => {
    const sockets = new Set<Socket>();
    const silent = createNetServer((socket) => {
      sockets.add(socket); // accepted, never answered
      socket.on('close', () => sockets.delete(socket));
    });
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const { port } = silent.address() as AddressInfo;
      const started = Date.now();
      const report = await verify({ url: `http://127.0.0.1:${port}/x`, timeoutMs: 300, maxTimeMs: 1_000 });
      expect(Date.now() - started).toBeLessThan(3_000);
      expect(report.passed).toBe(false);
      expect(report.checks.every((c) => c.status === 'fail')).toBe(true);
      expect(report.checks[0]!.evidence[0]).toMatch(/timed out/);
      expect(report.checks.at(-1)!.evidence[0]).toMatch(/time limit of the run \(1000 ms\) ran out/);
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => silent.close(() => resolve()));
    }
  });

  it('an unreachable endpoint fails the checks (exit 1) within the timeout', async () => {
    const io = capture();
    const started = Date.now();
    expect(await run(['verify', 'http://127.0.0.1:9/payments', '--timeout', '2s'], io)).toBe(1);
    expect(Date.now() - started).toBeLessThan(20_000);
    expect(io.text()).toMatch(/FAILED: 0\/6/);
  });
});
