/**
 * `oncely inspect` shows who paid what only when asked: bodies hidden
 * unless `--show-body`; the store URL (and its password) from
 * `ONCELY_STORE_URL` rather than the command line, where `ps` shows it;
 * encrypted outcomes opened only with `ONCELY_ENCRYPTION_KEY`; keyed record
 * ids found with `ONCELY_RECORD_SECRET`. On SQLite and on PostgreSQL.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyedRecordId, recordId } from '../engine/fingerprint.js';
import type { IdempotencyStore } from '../engine/store.js';
import { encodeOutcome } from '../http/outcome.js';
import { encryptionKeysFromEnv, withEncryption } from '../stores/encryption.js';
import { migratePostgres, postgresStore } from '../stores/postgres.js';
import { sqliteStore } from '../stores/sqlite.js';
import { type Io, run } from './main.js';

const run$ = promisify(execFile);
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const MARKER = `CARD-${randomBytes(6).toString('hex')}`;
const BODY = JSON.stringify({ id: 'pay_1', amount: 4200, card: MARKER });
const OUTCOME = encodeOutcome({
  kind: 'response',
  response: { status: 201, headers: [['content-type', 'application/json'], ['location', '/payments/pay_1']], body: BODY },
});
const KEY_TEXT = randomBytes(32).toString('base64');
const SECRET = 'a record secret of more than 16 bytes';

/** The real `oncely` entry, with `env` added to this process's environment. */
async function cli(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run$(process.execPath, ['--conditions=source', '--import', 'tsx', 'src/cli/main.ts', ...args], {
      cwd: ROOT,
      timeout: 60_000,
      env: { ...process.env, ONCELY_STORE_URL: '', ONCELY_ENCRYPTION_KEY: '', ONCELY_RECORD_SECRET: '', ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const e = error as { code?: number; stdout: string; stderr: string };
    if (typeof e.code !== 'number') throw error;
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** `run` in this process, with the given environment variables set for its duration. */
async function inProcess(args: string[], env: Record<string, string> = {}): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const io: Io = { out: (t) => out.push(t), err: (t) => err.push(t) };
  const names = ['ONCELY_STORE_URL', 'ONCELY_ENCRYPTION_KEY', 'ONCELY_RECORD_SECRET'];
  const saved = Object.fromEntries(names.map((n) => [n, process.env[n]]));
  for (const name of names) delete process.env[name];
  Object.assign(process.env, env);
  try {
    const code = await run(args, io);
    return { code, out: out.join('\n'), err: err.join('\n') };
  } finally {
    for (const name of names) {
      if (saved[name] === undefined) delete process.env[name];
      else process.env[name] = saved[name];
    }
  }
}

async function completeWith(store: IdempotencyStore, id: string, outcome: string): Promise<void> {
  const claim = await store.claim(id, { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 600_000 });
  if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
  if (!(await store.complete(id, claim.token, outcome, 600_000))) throw new Error('complete refused');
}

const dir = mkdtempSync(join(tmpdir(), 'oncely-inspect-'));
const file = join(dir, 'oncely.db');
const STORE = `sqlite:${file}`;

beforeAll(async () => {
  const database = new Database(file);
  const raw = sqliteStore({ database, purgeIntervalMs: 0 });
  try {
    await completeWith(raw, recordId('plain-1', 'acct_1'), OUTCOME);
    await completeWith(raw, recordId('raw-1', 'acct_1'), `not an http outcome: ${MARKER}`);
    await completeWith(withEncryption(raw, { keys: encryptionKeysFromEnv(KEY_TEXT) }), recordId('sealed-1', 'acct_1'), OUTCOME);
    await completeWith(raw, keyedRecordId(SECRET)('keyed-1', 'acct_1'), OUTCOME);
  } finally {
    await raw.close();
    database.close();
  }
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('bodies', () => {
  it('hidden by default: status, headers and size shown, not one byte of the body (human and JSON)', async () => {
    const human = await inProcess(['inspect', '--store', STORE, '--key', 'plain-1', '--scope', 'acct_1']);
    expect(human.code, human.err).toBe(0);
    expect(human.out).toMatch(/outcome\s+response 201/);
    expect(human.out).toContain('location: /payments/pay_1');
    expect(human.out).toContain(`body        (${Buffer.byteLength(BODY)} bytes, hidden: --show-body prints it)`);
    expect(human.out).not.toContain(MARKER);
    expect(human.out).not.toContain('4200');

    const json = await inProcess(['inspect', '--store', STORE, '--key', 'plain-1', '--scope', 'acct_1', '--json']);
    expect(json.out).not.toContain(MARKER);
    const shown = JSON.parse(json.out) as { outcome: Record<string, unknown> };
    expect(shown.outcome).toMatchObject({ kind: 'response', status: 201, bodyHidden: true, bodyBytes: Buffer.byteLength(BODY) });
    expect(shown.outcome.bodyHead).toBeUndefined();
  });

  it('--show-body prints it', async () => {
    const human = await inProcess(['inspect', '--store', STORE, '--key', 'plain-1', '--scope', 'acct_1', '--show-body']);
    expect(human.out).toContain(`body        ${BODY}`);
    const json = await inProcess(['inspect', '--store', STORE, '--key', 'plain-1', '--scope', 'acct_1', '--json', '--show-body']);
    expect((JSON.parse(json.out) as { outcome: { bodyHead: string; bodyHidden?: boolean } }).outcome).toMatchObject({ bodyHead: BODY });
  });

  it('an outcome that is not an HTTP response counts as a body too', async () => {
    const hidden = await inProcess(['inspect', '--store', STORE, '--key', 'raw-1', '--scope', 'acct_1']);
    expect(hidden.out).toMatch(/outcome\s+unreadable/);
    expect(hidden.out).not.toContain(MARKER);
    const shown = await inProcess(['inspect', '--store', STORE, '--key', 'raw-1', '--scope', 'acct_1', '--show-body']);
    expect(shown.out).toContain(MARKER);
  });
});

describe('the store URL', () => {
  it('from ONCELY_STORE_URL when --store is not given (the real entry); --store wins over it', async () => {
    const fromEnv = await cli(['inspect', '--key', 'plain-1', '--scope', 'acct_1'], { ONCELY_STORE_URL: STORE });
    expect(fromEnv.code, fromEnv.stderr).toBe(0);
    expect(fromEnv.stdout).toMatch(/state\s+completed/);
    expect(fromEnv.stderr).toBe('');

    const both = await inProcess(['inspect', '--store', STORE, '--key', 'plain-1', '--scope', 'acct_1'], {
      ONCELY_STORE_URL: `sqlite:${join(dir, 'absent.db')}`,
    });
    expect(both.code).toBe(0);
    expect(both.out).toMatch(/state\s+completed/);
  }, 60_000);

  it('purge takes it too', async () => {
    const purged = await inProcess(['purge', '--json'], { ONCELY_STORE_URL: STORE });
    expect(purged.code, purged.err).toBe(0);
    expect(JSON.parse(purged.out)).toMatchObject({ store: STORE, deleted: 0, nativeTtl: false });
  });

  it('neither: a usage error naming both', async () => {
    for (const command of [['inspect', '--key', 'k'], ['purge']]) {
      const result = await inProcess(command);
      expect(result.code).toBe(2);
      expect(result.err).toMatch(/needs --store <url> or ONCELY_STORE_URL/);
    }
  });

  describe('PostgreSQL, with a password in the URL', () => {
    const table = `oncely_inspect_${randomBytes(4).toString('hex')}`;
    // Trust authentication: the password is not checked, only carried.
    const url = 'postgres://postgres:s3cret-pw@127.0.0.1:5432/test';
    let pool: pg.Pool;
    beforeAll(async () => {
      pool = new pg.Pool({ connectionString: url, max: 2 });
      await migratePostgres(pool, { table });
      const store = postgresStore({ pool, table });
      await completeWith(store, recordId('pg-1', 'acct_1'), OUTCOME);
    });
    afterAll(async () => {
      await pool.query(`DROP TABLE IF EXISTS ${table}`);
      await pool.end();
    });

    it('on the command line: works, with a warning that ps shows it; from ONCELY_STORE_URL: no warning', async () => {
      const args = ['inspect', '--key', 'pg-1', '--scope', 'acct_1', '--table', table];
      const onLine = await inProcess([...args, '--store', url, '--json']);
      expect(onLine.code, onLine.err).toBe(0);
      expect(onLine.err).toMatch(/password in --store is visible to other users of this machine \(ps\); set ONCELY_STORE_URL/);
      const shown = JSON.parse(onLine.out) as { store: string; state: string };
      expect(shown.state).toBe('completed');
      expect(shown.store).not.toContain('s3cret-pw'); // redacted in the output too

      const fromEnv = await inProcess(args, { ONCELY_STORE_URL: url });
      expect(fromEnv.code, fromEnv.err).toBe(0);
      expect(fromEnv.err).toBe('');
      expect(fromEnv.out).toMatch(/state\s+completed/);
      expect(fromEnv.out).not.toContain(MARKER);
    });
  });
});

describe('encrypted outcomes and keyed ids', () => {
  it('sealed: only its key id without ONCELY_ENCRYPTION_KEY; opened with it (body still hidden); a wrong key says so', async () => {
    const args = ['inspect', '--store', STORE, '--key', 'sealed-1', '--scope', 'acct_1'];
    const keyId = encryptionKeysFromEnv(KEY_TEXT)[0]!.id;

    const locked = await inProcess(args);
    expect(locked.code).toBe(0);
    expect(locked.out).toMatch(/state\s+completed/);
    expect(locked.out).toMatch(/outcome\s+encrypted\n/);
    expect(locked.out).toContain(`sealed with ${keyId}: set ONCELY_ENCRYPTION_KEY to open it`);
    expect(locked.out).not.toContain('201');

    const opened = await inProcess([...args, '--json'], { ONCELY_ENCRYPTION_KEY: KEY_TEXT });
    const shown = JSON.parse(opened.out) as { outcome: Record<string, unknown> };
    expect(shown.outcome).toMatchObject({ kind: 'response', status: 201, keyId, bodyHidden: true });
    expect(opened.out).not.toContain(MARKER);
    const withBody = await inProcess([...args, '--show-body'], { ONCELY_ENCRYPTION_KEY: KEY_TEXT });
    expect(withBody.out).toContain(MARKER);
    expect(withBody.out).toContain(`sealed with ${keyId}\n`);

    const wrong = await inProcess([...args, '--json'], { ONCELY_ENCRYPTION_KEY: randomBytes(32).toString('base64') });
    expect((JSON.parse(wrong.out) as { outcome: unknown }).outcome).toEqual({ kind: 'encrypted', keyId, decryptError: 'unknown-key' });
    const bad = await inProcess(args, { ONCELY_ENCRYPTION_KEY: 'short' });
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/ONCELY_ENCRYPTION_KEY: key 1 of 1/);
  });

  it('keyed record ids: absent without ONCELY_RECORD_SECRET, found with it', async () => {
    const args = ['inspect', '--store', STORE, '--key', 'keyed-1', '--scope', 'acct_1', '--json'];
    const without = JSON.parse((await inProcess(args)).out) as { state: string; id: string };
    expect(without.state).toBe('absent');
    const found = JSON.parse((await inProcess(args, { ONCELY_RECORD_SECRET: SECRET })).out) as { state: string; id: string };
    expect(found.state).toBe('completed');
    expect(found.id).toBe(keyedRecordId(SECRET)('keyed-1', 'acct_1'));
    expect(found.id).not.toBe(without.id);
  });
});
