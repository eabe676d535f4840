/**
 * withEncryption: the store contract still holds through it (conformance on
 * memory and SQLite), outcomes round-trip, keys rotate, and every way an
 * outcome can fail to open (key gone, tampered, moved to another id, plain
 * text) is a DecryptFailedError, answered 503 through the HTTP core, never
 * a replay of garbage. And the audit's attack: the SQLite file and its WAL
 * grepped for a marker of a stored response.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ClaimInput, IdempotencyStore } from '../engine/store.js';
import { ConfigError, DecryptFailedError, isOncelyError } from '../errors/index.js';
import { withIdempotency } from '../fetch/index.js';
import { defineStoreConformance } from '../testing/index.js';
import {
  ENVELOPE_PREFIX,
  type EncryptionKey,
  encryptionKeysFromEnv,
  isSealed,
  outcomeCipher,
  sealedKeyId,
  withEncryption,
} from './encryption.js';
import { memoryStore } from './memory.js';
import { sqliteStore } from './sqlite.js';

const dir = mkdtempSync(join(tmpdir(), 'oncely-encryption-'));
const databases: Database.Database[] = [];
const closers: IdempotencyStore[] = [];
afterAll(async () => {
  for (const store of closers) await store.close().catch(() => {});
  for (const db of databases) if (db.open) db.close();
  rmSync(dir, { recursive: true, force: true });
});

const A: EncryptionKey = { id: 'key-a', key: randomBytes(32) };
const B: EncryptionKey = { id: 'key-b', key: randomBytes(32).toString('base64') };
const newId = (): string => randomBytes(32).toString('hex');
const INPUT: ClaimInput = { fingerprint: 'v1:fp', leaseMs: 30_000, ttlMs: 60_000 };

function sqliteAt(path: string): IdempotencyStore {
  const database = new Database(path);
  databases.push(database);
  const store = sqliteStore({ database, purgeIntervalMs: 0 });
  closers.push(store);
  return store;
}

/** Claim `id` and complete it with `outcome` through `store`. */
async function completeWith(store: IdempotencyStore, id: string, outcome: string): Promise<void> {
  const claim = await store.claim(id, INPUT);
  if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
  expect(await store.complete(id, claim.token, outcome, 60_000)).toBe(true);
}

/** The error `promise` rejects with (fails when it resolves). */
async function rejection(promise: Promise<unknown>): Promise<DecryptFailedError> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(DecryptFailedError);
    return error as DecryptFailedError;
  }
  throw new Error('expected a rejection');
}

defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  { name: 'memory, encrypted', store: () => withEncryption(memoryStore(), { keys: [A] }) },
);
defineStoreConformance(
  { describe, it, beforeAll, afterAll },
  {
    name: 'sqlite, encrypted',
    store: () => withEncryption(sqliteAt(join(dir, 'conformance.db')), { keys: [A, B] }),
    anotherClient: () => withEncryption(sqliteAt(join(dir, 'conformance.db')), { keys: [B, A] }),
  },
);

describe.each([
  ['memory', () => memoryStore()],
  ['sqlite', () => sqliteAt(join(dir, `round-${randomBytes(4).toString('hex')}.db`))],
] as const)('withEncryption on %s', (_name, make) => {
  let raw: IdempotencyStore;
  beforeAll(() => {
    raw = make();
  });

  it('round trip: complete seals, claim and get open; the store itself holds only the envelope', async () => {
    const store = withEncryption(raw, { keys: [A] });
    const id = newId();
    const outcome = '{"k":"r","s":201}\n{"card":"4242 4242 4242 4242","note":"ünïcödé ✓ \u0000"}';
    await completeWith(store, id, outcome);

    const replay = await store.claim(id, INPUT);
    expect(replay).toMatchObject({ status: 'completed', record: { state: 'completed', fingerprint: 'v1:fp', outcome } });
    expect(await store.get(id)).toMatchObject({ state: 'completed', outcome });

    const held = await raw.get(id);
    if (held?.state !== 'completed') throw new Error('expected a completed record');
    expect(held.outcome.startsWith(`${ENVELOPE_PREFIX}key-a:`)).toBe(true);
    expect(held.outcome).not.toContain('4242');
    expect(isSealed(held.outcome)).toBe(true);
    expect(sealedKeyId(held.outcome)).toBe('key-a');
    const [, keyId, iv, body] = held.outcome.split(':');
    expect(keyId).toBe('key-a');
    expect(Buffer.from(iv!, 'base64')).toHaveLength(12);
    // Ciphertext is as long as the UTF-8 plaintext, plus the 16-byte tag.
    expect(Buffer.from(body!, 'base64')).toHaveLength(Buffer.byteLength(outcome) + 16);
  });

  it('in-progress records and absent ids pass through untouched', async () => {
    const store = withEncryption(raw, { keys: [A] });
    const id = newId();
    expect(await store.get(id)).toBeNull();
    const claim = await store.claim(id, INPUT);
    expect(claim.status).toBe('acquired');
    expect(await store.get(id)).toMatchObject({ state: 'in_progress', fingerprint: 'v1:fp' });
    expect(await store.claim(id, INPUT)).toMatchObject({ status: 'in_progress' });
  });

  it('rotation: a record sealed under key A opens after rotating to [B, A]; new records are sealed with B', async () => {
    const id = newId();
    await completeWith(withEncryption(raw, { keys: [A] }), id, 'paid under A');

    const rotated = withEncryption(raw, { keys: [B, A] });
    expect(await rotated.claim(id, INPUT)).toMatchObject({ status: 'completed', record: { outcome: 'paid under A' } });
    expect(await rotated.get(id)).toMatchObject({ outcome: 'paid under A' });

    const fresh = newId();
    await completeWith(rotated, fresh, 'paid under B');
    const held = await raw.get(fresh);
    expect(held?.state === 'completed' && sealedKeyId(held.outcome)).toBe('key-b');
    expect(await rotated.get(fresh)).toMatchObject({ outcome: 'paid under B' });
  });

  it('key A removed (only [B]): claim and get reject with DecryptFailedError unknown-key, never a replay', async () => {
    const id = newId();
    await completeWith(withEncryption(raw, { keys: [A] }), id, 'paid under A');
    const onlyB = withEncryption(raw, { keys: [B] });

    const onClaim = await rejection(onlyB.claim(id, INPUT));
    expect(onClaim).toMatchObject({ code: 'ONCELY_DECRYPT_FAILED', status: 503, reason: 'unknown-key', keyId: 'key-a', recordId: id });
    expect(onClaim.message).toContain('"key-a", which is not among the configured keys');
    expect(isOncelyError(onClaim)).toBe(true);
    expect((await rejection(onlyB.get(id))).reason).toBe('unknown-key');
    // The record is untouched: the right key still opens it.
    expect(await withEncryption(raw, { keys: [A] }).get(id)).toMatchObject({ outcome: 'paid under A' });
  });

  it('another key under the same id: authentication fails', async () => {
    const id = newId();
    await completeWith(withEncryption(raw, { keys: [A] }), id, 'secret');
    const impostor = withEncryption(raw, { keys: [{ id: 'key-a', key: randomBytes(32) }] });
    const error = await rejection(impostor.claim(id, INPUT));
    expect(error).toMatchObject({ reason: 'authentication', keyId: 'key-a' });
  });

  it('tampered ciphertext, IV or tag, or a cut envelope: DecryptFailedError, never the altered text', async () => {
    const store = withEncryption(raw, { keys: [A] });
    const cipher = outcomeCipher([A]);
    const flip = (b64: string, at: number): string => {
      const bytes = Buffer.from(b64, 'base64');
      bytes[at < 0 ? bytes.length + at : at]! ^= 0x01;
      return bytes.toString('base64');
    };
    const cut = (b64: string, length: number): string => Buffer.from(b64, 'base64').subarray(0, length).toString('base64');
    const variants: Array<[string, (p: string, k: string, iv: string, body: string) => string, string]> = [
      ['a ciphertext bit', (p, k, iv, body) => `${p}:${k}:${iv}:${flip(body, 0)}`, 'authentication'],
      ['a tag bit', (p, k, iv, body) => `${p}:${k}:${iv}:${flip(body, -1)}`, 'authentication'],
      ['an IV bit', (p, k, iv, body) => `${p}:${k}:${flip(iv, 3)}:${body}`, 'authentication'],
      ['the tag cut off', (p, k, iv, body) => `${p}:${k}:${iv}:${cut(body, -2)}`, 'authentication'],
      ['shorter than a tag', (p, k, iv, body) => `${p}:${k}:${iv}:${cut(body, 10)}`, 'malformed'],
      ['a field missing', (p, k, iv) => `${p}:${k}:${iv}`, 'malformed'],
      ['not base64', (p, k, iv) => `${p}:${k}:${iv}:not*base64`, 'malformed'],
    ];
    for (const [name, tamper, reason] of variants) {
      // Sealed for this very id, then changed in place: only the bytes differ.
      const id = newId();
      const [p, k, iv, body] = cipher.seal(id, '{"amount":100,"to":"acct_1"}').split(':') as [string, string, string, string];
      await completeWith(raw, id, tamper(p, k, iv, body));
      const error = await rejection(store.claim(id, INPUT));
      expect(error.reason, name).toBe(reason);
      expect(error.recordId).toBe(id);
      expect((await rejection(store.get(id))).reason, name).toBe(reason);
    }
  });

  it('a sealed outcome copied to another record id does not open (the id is the associated data)', async () => {
    const store = withEncryption(raw, { keys: [A] });
    const original = newId();
    await completeWith(store, original, '{"id":"pay_1","amount":100}');
    const held = await raw.get(original);
    if (held?.state !== 'completed') throw new Error('expected a completed record');

    const victim = newId();
    await completeWith(raw, victim, held.outcome); // an attacker with write access to the store
    const error = await rejection(store.claim(victim, INPUT));
    expect(error).toMatchObject({ reason: 'authentication', recordId: victim });
    expect(await store.get(original)).toMatchObject({ outcome: '{"id":"pay_1","amount":100}' });
  });

  it('plain text is refused unless allowPlaintext (switching encryption on over live records)', async () => {
    const id = newId();
    await completeWith(raw, id, '{"written":"before encryption"}');
    expect((await rejection(withEncryption(raw, { keys: [A] }).claim(id, INPUT))).reason).toBe('plaintext');
    const migrating = withEncryption(raw, { keys: [A], allowPlaintext: true });
    expect(await migrating.get(id)).toMatchObject({ outcome: '{"written":"before encryption"}' });
    // New records are still sealed.
    const fresh = newId();
    await completeWith(migrating, fresh, 'new');
    const held = await raw.get(fresh);
    expect(held?.state === 'completed' && isSealed(held.outcome)).toBe(true);
  });

  it('claimMany opens every replay, and when one cannot be opened releases the claims it won', async () => {
    const sealedUnderA = newId();
    await completeWith(withEncryption(raw, { keys: [A] }), sealedUnderA, 'under A');
    const rotated = withEncryption(raw, { keys: [B, A] });
    const fresh = newId();
    const results = await rotated.claimMany!([sealedUnderA, fresh], INPUT);
    expect(results[0]).toMatchObject({ status: 'completed', record: { outcome: 'under A' } });
    expect(results[1]).toMatchObject({ status: 'acquired' });

    const onlyB = withEncryption(raw, { keys: [B] });
    const another = newId();
    const error = await rejection(onlyB.claimMany!([sealedUnderA, another], INPUT));
    expect(error.reason).toBe('unknown-key');
    // The claim of `another` was released: it can be claimed at once.
    expect(await raw.claim(another, INPUT)).toMatchObject({ status: 'acquired', takeover: false });
  });

  it('every seal uses a fresh IV: the same outcome twice gives two different envelopes', () => {
    const cipher = outcomeCipher([A]);
    const one = cipher.seal('id', 'same');
    const two = cipher.seal('id', 'same');
    expect(one).not.toBe(two);
    expect(one.split(':')[2]).not.toBe(two.split(':')[2]);
    expect(cipher.open('id', one)).toBe('same');
    expect(cipher.open('id', two)).toBe('same');
  });
});

describe('keys', () => {
  const memory = memoryStore();
  const bad: Array<[string, () => unknown, RegExp]> = [
    ['no keys', () => withEncryption(memory, { keys: [] }), /at least one key/],
    ['no options', () => withEncryption(memory, undefined as never), /at least one key/],
    ['a 31-byte key', () => withEncryption(memory, { keys: [{ id: 'k', key: randomBytes(31) }] }), /is 31 bytes; AES-256 needs exactly 32/],
    ['a 33-byte key', () => withEncryption(memory, { keys: [{ id: 'k', key: randomBytes(33) }] }), /is 33 bytes/],
    ['a passphrase of 32 characters', () => withEncryption(memory, { keys: [{ id: 'k', key: 'correct horse battery staple!!!!' }] }), /not base64/],
    ['base64 of 24 bytes', () => withEncryption(memory, { keys: [{ id: 'k', key: randomBytes(24).toString('base64') }] }), /is 24 bytes/],
    ['a number', () => withEncryption(memory, { keys: [{ id: 'k', key: 42 as never }] }), /Buffer, a Uint8Array or a base64 string/],
    ['an id with a colon', () => withEncryption(memory, { keys: [{ id: 'a:b', key: randomBytes(32) }] }), /id must be 1 to 64/],
    ['an empty id', () => withEncryption(memory, { keys: [{ id: '', key: randomBytes(32) }] }), /id must be 1 to 64/],
    ['a repeated id', () => withEncryption(memory, { keys: [A, { id: 'key-a', key: randomBytes(32) }] }), /listed twice/],
  ];
  it.each(bad)('%s is a ConfigError', (_name, make, message) => {
    let thrown: unknown;
    try {
      make();
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(ConfigError);
    expect((thrown as Error).message).toMatch(message);
  });

  it('never puts a key into an error message', () => {
    const secret = randomBytes(24).toString('base64');
    try {
      withEncryption(memory, { keys: [{ id: 'k', key: secret }] });
    } catch (error) {
      expect((error as Error).message).not.toContain(secret);
    }
    try {
      encryptionKeysFromEnv(secret);
    } catch (error) {
      expect((error as Error).message).not.toContain(secret);
      expect((error as Error).message).toMatch(/ONCELY_ENCRYPTION_KEY: key 1 of 1 decodes to 24 bytes/);
    }
  });

  it('accepts a Buffer, a Uint8Array, standard and URL-safe base64 of 32 bytes', async () => {
    const bytes = randomBytes(32);
    for (const key of [bytes, new Uint8Array(bytes), bytes.toString('base64'), bytes.toString('base64url')]) {
      const raw = memoryStore();
      const id = newId();
      await completeWith(withEncryption(raw, { keys: [{ id: 'k', key }] }), id, 'ok');
      // The Buffer opens what each form sealed: they are the same key.
      expect(outcomeCipher([{ id: 'k', key: bytes }]).open(id, ((await raw.get(id)) as { outcome: string }).outcome)).toBe('ok');
    }
  });

  it('encryptionKeysFromEnv: comma-separated base64, ids derived from the keys, first seals', () => {
    const one = randomBytes(32);
    const two = randomBytes(32);
    const keys = encryptionKeysFromEnv(`${one.toString('base64')}, ${two.toString('base64')}`);
    expect(keys).toHaveLength(2);
    expect(keys[0]!.id).toMatch(/^k[0-9a-f]{16}$/);
    expect(keys[0]!.id).not.toBe(keys[1]!.id);
    // The same key always gets the same id (other processes, the CLI).
    expect(encryptionKeysFromEnv(one.toString('base64'))[0]!.id).toBe(keys[0]!.id);
    expect(outcomeCipher(keys).sealingKeyId).toBe(keys[0]!.id);
    expect(() => encryptionKeysFromEnv('')).toThrow(ConfigError);
    expect(() => encryptionKeysFromEnv(`${one.toString('base64')},`)).toThrow(/one or more base64 keys/);
    expect(() => encryptionKeysFromEnv('%%%', 'MY_KEY')).toThrow(/MY_KEY: key 1 of 1 is not base64/);
  });
});

describe('through the HTTP core (fetch front door) on SQLite', () => {
  const MARKER = `CARD-${randomBytes(6).toString('hex')}`;
  let runs = 0;
  const handler = async (request: Request): Promise<Response> => {
    runs++;
    const body = (await request.json()) as { amount: number };
    return Response.json({ id: `pay_${runs}`, amount: body.amount, card: MARKER }, { status: 201 });
  };
  const post = (app: (r: Request) => Promise<Response>, key: string): Promise<Response> =>
    app(
      new Request('http://oncely.test/payments', {
        method: 'POST',
        headers: { 'idempotency-key': key, 'content-type': 'application/json' },
        body: JSON.stringify({ amount: 4200, card: MARKER }),
      }),
    );
  /** Occurrences of the marker in the SQLite file and its WAL, read as bytes (what an attacker with the files sees). */
  const hits = (path: string): number => {
    let count = 0;
    for (const file of [path, `${path}-wal`]) {
      if (!existsSync(file)) continue;
      const bytes = readFileSync(file);
      for (let at = bytes.indexOf(MARKER); at >= 0; at = bytes.indexOf(MARKER, at + 1)) count++;
    }
    return count;
  };

  it('the files grepped for a stored payment marker: hits without encryption, none with it', async () => {
    const plainPath = join(dir, 'plain.db');
    const plain = withIdempotency(handler, { store: sqliteAt(plainPath), scope: false });
    expect((await post(plain, 'pay-plain')).status).toBe(201);
    expect(hits(plainPath)).toBeGreaterThan(0);

    const sealedPath = join(dir, 'sealed.db');
    const sealed = withIdempotency(handler, { store: withEncryption(sqliteAt(sealedPath), { keys: [A] }), scope: false });
    const first = await post(sealed, 'pay-sealed');
    expect(first.status).toBe(201);
    expect(await first.text()).toContain(MARKER);
    const replay = await post(sealed, 'pay-sealed');
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.text()).toContain(MARKER);
    expect(existsSync(`${sealedPath}-wal`)).toBe(true);
    expect(hits(sealedPath)).toBe(0);
  });

  it('rotated to [B, A] the replay is served; with only [B] the answer is 503 decrypt-failed and nothing runs', async () => {
    const path = join(dir, 'rotate.db');
    const raw = sqliteAt(path);
    const underA = withIdempotency(handler, { store: withEncryption(raw, { keys: [A] }), scope: false });
    const created = await post(underA, 'pay-rotate');
    expect(created.status).toBe(201);
    const createdBody = await created.text();

    const rotated = withIdempotency(handler, { store: withEncryption(raw, { keys: [B, A] }), scope: false });
    const replay = await post(rotated, 'pay-rotate');
    expect(replay.status).toBe(201);
    expect(replay.headers.get('idempotent-replayed')).toBe('true');
    expect(await replay.text()).toBe(createdBody);

    const before = runs;
    const onlyB = withIdempotency(handler, { store: withEncryption(raw, { keys: [B] }), scope: false });
    const refused = await post(onlyB, 'pay-rotate');
    expect(refused.status).toBe(503);
    expect(refused.headers.get('content-type')).toBe('application/problem+json');
    expect(refused.headers.get('idempotent-replayed')).toBeNull();
    const problem = (await refused.json()) as { type: string; title: string; status: number; detail: string };
    expect(problem).toMatchObject({ type: 'https://oncely.dev/problems/decrypt-failed', status: 503 });
    expect(problem.detail).toMatch(/not among the configured keys/);
    expect(JSON.stringify(problem)).not.toContain(MARKER);
    expect(runs).toBe(before); // not run again: the operation completed, its answer just cannot be read

    // failOpen does not turn it into a second run either.
    const failOpen = withIdempotency(handler, { store: withEncryption(raw, { keys: [B] }), scope: false, failOpen: true });
    expect((await post(failOpen, 'pay-rotate')).status).toBe(503);
    expect(runs).toBe(before);
  });
});
