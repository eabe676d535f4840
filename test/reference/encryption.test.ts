/**
 * The reference system with `ONCELY_ENCRYPTION_KEY`: the audit's attack
 * (the SQLite store file and its WAL grepped for a payment's marker: found
 * without a key, not with one), rotation across restarts ([A] → [B, A]
 * replays), a key removed ([B] alone: 503, the payment not made twice),
 * and a bad key refusing to start.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { type RunningReference, referenceOptionsFromEnv, startReference } from '../../reference/app.js';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..', '..');
const KEY_A = randomBytes(32).toString('base64');
const KEY_B = randomBytes(32).toString('base64');

const dirs: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-ref-enc-'));
  dirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** The reference system as `npm start` configures it from these variables, on files in `dir`. */
function start(dir: string, env: Record<string, string>): Promise<RunningReference> {
  return startReference(
    referenceOptionsFromEnv({ STORE_URL: `sqlite:${join(dir, 'oncely.db')}`, DATA_DIR: dir, PORT: '0', ...env }),
  );
}

async function pay(url: string, key: string, marker: string): Promise<Response> {
  return fetch(`${url}/payments`, {
    method: 'POST',
    headers: { authorization: 'Bearer acct_enc', 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify({ amount: 4200, currency: 'EUR', description: marker }),
  });
}

/** Occurrences of `marker` in the idempotency store's file and its WAL, as bytes on disk. */
function storeHits(dir: string, marker: string): number {
  let count = 0;
  for (const file of ['oncely.db', 'oncely.db-wal']) {
    const path = join(dir, file);
    if (!existsSync(path)) continue;
    const bytes = readFileSync(path);
    for (let at = bytes.indexOf(marker); at >= 0; at = bytes.indexOf(marker, at + 1)) count++;
  }
  return count;
}

describe('ONCELY_ENCRYPTION_KEY', () => {
  it('the store files grepped for a payment marker: found without a key, never with one', async () => {
    const marker = `MARKER-${randomBytes(6).toString('hex')}`;
    const plainDir = tempDir();
    const plain = await start(plainDir, {});
    try {
      expect((await pay(plain.url, 'p-1', marker)).status).toBe(201);
      expect(storeHits(plainDir, marker)).toBeGreaterThan(0);
    } finally {
      await plain.close();
    }

    const sealedDir = tempDir();
    const sealed = await start(sealedDir, { ONCELY_ENCRYPTION_KEY: KEY_A });
    try {
      const created = await pay(sealed.url, 'p-1', marker);
      expect(created.status).toBe(201);
      expect(await created.text()).toContain(marker);
      const replay = await pay(sealed.url, 'p-1', marker);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(await replay.text()).toContain(marker);
      expect(existsSync(join(sealedDir, 'oncely.db-wal'))).toBe(true);
      expect(storeHits(sealedDir, marker)).toBe(0);
    } finally {
      await sealed.close();
    }
    // And after shutdown, with the WAL checkpointed into the file.
    expect(storeHits(sealedDir, marker)).toBe(0);
  });

  it('rotation across restarts: written under A, replayed under "B,A"; with B alone a retry is 503 and charges nothing', async () => {
    const dir = tempDir();
    const marker = `ROT-${randomBytes(6).toString('hex')}`;
    let first: string;
    const underA = await start(dir, { ONCELY_ENCRYPTION_KEY: KEY_A });
    try {
      const created = await pay(underA.url, 'rot-1', marker);
      expect(created.status).toBe(201);
      first = await created.text();
    } finally {
      await underA.close();
    }

    const rotated = await start(dir, { ONCELY_ENCRYPTION_KEY: `${KEY_B},${KEY_A}` });
    try {
      const replay = await pay(rotated.url, 'rot-1', marker);
      expect(replay.status).toBe(201);
      expect(replay.headers.get('idempotent-replayed')).toBe('true');
      expect(await replay.text()).toBe(first);
      expect((await pay(rotated.url, 'rot-2', marker)).status).toBe(201); // sealed with B
    } finally {
      await rotated.close();
    }

    const onlyB = await start(dir, { ONCELY_ENCRYPTION_KEY: KEY_B });
    try {
      const refused = await pay(onlyB.url, 'rot-1', marker);
      expect(refused.status).toBe(503);
      expect(refused.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      const problem = (await refused.json()) as { type: string; status: number };
      expect(problem).toMatchObject({ type: 'https://oncely.dev/problems/decrypt-failed', status: 503 });
      expect(JSON.stringify(problem)).not.toContain(marker);
      // The record sealed with B still replays.
      expect((await pay(onlyB.url, 'rot-2', marker)).headers.get('idempotent-replayed')).toBe('true');
      // Two payments in all: rot-1 was not charged again.
      const listed = await fetch(`${onlyB.url}/payments`, { headers: { authorization: 'Bearer acct_enc' } });
      expect(((await listed.json()) as { data: unknown[] }).data).toHaveLength(2);
    } finally {
      await onlyB.close();
    }
  });

  it('reads the variable: absent is off; one or more base64 keys of 32 bytes; anything else refused without echoing it', () => {
    expect(referenceOptionsFromEnv({}).encryptionKeys).toBeUndefined();
    const keys = referenceOptionsFromEnv({ ONCELY_ENCRYPTION_KEY: `${KEY_B}, ${KEY_A}` }).encryptionKeys!;
    expect(keys.map((k) => k.id)).toHaveLength(2);
    expect(keys[0]!.id).toMatch(/^k[0-9a-f]{16}$/);
    expect(() => referenceOptionsFromEnv({ ONCELY_ENCRYPTION_KEY: '' })).toThrow(/ONCELY_ENCRYPTION_KEY must be one or more base64 keys/);
    const short = randomBytes(16).toString('base64');
    let message = '';
    try {
      referenceOptionsFromEnv({ ONCELY_ENCRYPTION_KEY: short });
    } catch (error) {
      message = (error as Error).message;
    }
    expect(message).toMatch(/ONCELY_ENCRYPTION_KEY: key 1 of 1 decodes to 16 bytes/);
    expect(message).not.toContain(short);
  });

  it('a bad key refuses to start (exit 1) with a clear message, and nothing listens', async () => {
    const dir = tempDir();
    const secret = 'my-password-is-not-a-key';
    const result = await run(process.execPath, ['--conditions=source', '--import', 'tsx', 'reference/main.ts'], {
      cwd: ROOT,
      env: { ...process.env, PORT: '0', STORE_URL: `sqlite:${join(dir, 'oncely.db')}`, DATA_DIR: dir, ONCELY_ENCRYPTION_KEY: secret },
      timeout: 45_000,
    }).then(
      () => ({ code: 0, stdout: '', stderr: '' }),
      (error: { code: number; stdout: string; stderr: string }) => error,
    );
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/cannot start: ONCELY_ENCRYPTION_KEY: key 1 of 1 decodes to \d+ bytes; each key must be 32 random bytes/);
    expect(result.stderr).not.toContain(secret);
    expect(result.stdout).not.toMatch(/listening on/);
  }, 60_000);
});
