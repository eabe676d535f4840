/**
 * Encryption at rest for any store: stored outcomes (the answers replayed
 * to retries, payment details and all) are sealed with AES-256-GCM before
 * they reach the store, and opened when they come back.
 *
 * - Each outcome is sealed with a fresh random 96-bit IV, and the record id
 *   as associated data: a sealed outcome copied under another id does not
 *   open.
 * - The envelope names the key it was sealed with, so keys can rotate: new
 *   records are sealed with the first key, and any listed key opens old ones.
 * - An outcome that cannot be opened (its key is not listed, the bytes were
 *   changed, it was moved) is a {@link DecryptFailedError}, never a replay of
 *   garbage: the front doors answer 503 and run nothing.
 *
 * Only outcomes are sealed. Record ids, fingerprints, tokens, leases and
 * expiry times stay readable: the store needs them to decide claims. See
 * docs/security.md for what that leaves visible, and for rotation.
 *
 * Envelope, version 1 (ASCII, stored as the outcome string):
 * ```
 * enc1:<key id>:<base64 IV, 12 bytes>:<base64 ciphertext followed by the 16-byte GCM tag>
 * ```
 *
 * @example
 * ```ts
 * import { withEncryption } from 'oncely/stores/encryption';
 * import { postgresStore } from 'oncely/stores/postgres';
 *
 * const store = withEncryption(postgresStore({ pool }), {
 *   keys: [{ id: '2025-06', key: process.env.ONCELY_KEY_2025_06! }],
 * });
 * ```
 * @module
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import type { ClaimInput, ClaimResult, CompletedRecord, IdempotencyStore, StoredRecord, StoreTransactions } from '../engine/store.js';
import { ConfigError, DecryptFailedError } from '../errors/index.js';

/** The first field of every sealed outcome: the envelope's version. */
export const ENVELOPE_PREFIX = 'enc1:';

/** Key ids: 1 to 64 of letters, digits, `_`, `-` and `.` (never `:`, the envelope's separator). */
const KEY_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const BASE64 = /^(?:[A-Za-z0-9+/]+={0,2}|[A-Za-z0-9_-]+={0,2})$/;
const IV_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;

/**
 * One key: an id written into every envelope it seals, and 32 bytes, as a
 * `Buffer` / `Uint8Array` or as base64 (`openssl rand -base64 32`).
 *
 * @example
 * ```ts
 * const key: EncryptionKey = { id: '2025-06', key: 'q3Jz…44 base64 characters…=' };
 * ```
 */
export interface EncryptionKey {
  /** Names the key in the envelope: 1 to 64 of `[A-Za-z0-9_.-]`; unique in the list. */
  readonly id: string;
  /** 32 bytes, or their base64 (standard or URL-safe alphabet). */
  readonly key: Uint8Array | string;
}

/**
 * Options of {@link withEncryption}.
 *
 * @example
 * ```ts
 * const options: EncryptionOptions = { keys: [{ id: 'new', key: newKey }, { id: 'old', key: oldKey }] };
 * ```
 */
export interface EncryptionOptions {
  /** The first seals new records; every one opens records sealed with it. At least one. */
  readonly keys: readonly EncryptionKey[];
  /**
   * Also accept outcomes stored in plain text (written before encryption was
   * switched on) and return them as they are. Default false: a plain-text
   * outcome is a {@link DecryptFailedError} (`reason: 'plaintext'`), since
   * whoever can write to the store could otherwise plant an answer. Turn it
   * on while switching encryption on for a store with live records, and off
   * again once their retention has passed.
   */
  readonly allowPlaintext?: boolean;
}

/** Seals and opens outcomes with a list of keys; what {@link withEncryption} uses. */
export interface OutcomeCipher {
  /** The id of the key new outcomes are sealed with (the first). */
  readonly sealingKeyId: string;
  /** Seal `outcome` for the record `id`. */
  seal(id: string, outcome: string): string;
  /**
   * Open an outcome sealed for the record `id`.
   * @throws {@link DecryptFailedError} when it cannot be opened.
   */
  open(id: string, stored: string): string;
}

/** True when `stored` is an outcome sealed by {@link withEncryption} (any key). */
export function isSealed(stored: string): boolean {
  return stored.startsWith(ENVELOPE_PREFIX);
}

/** The key id named by a sealed outcome; undefined when `stored` is not one. */
export function sealedKeyId(stored: string): string | undefined {
  if (!isSealed(stored)) return undefined;
  const end = stored.indexOf(':', ENVELOPE_PREFIX.length);
  return end < 0 ? undefined : stored.slice(ENVELOPE_PREFIX.length, end);
}

function keyBytes(key: EncryptionKey, index: number): Buffer {
  const where = `encryption key ${index + 1} (${JSON.stringify(key.id)})`;
  let bytes: Buffer;
  if (typeof key.key === 'string') {
    // Never echo the value: it is a secret.
    const text = key.key.trim();
    if (!BASE64.test(text)) {
      throw new ConfigError(
        `${where} is not base64: give 32 random bytes as base64 (44 characters, e.g. \`openssl rand -base64 32\`) or as a Buffer.`,
      );
    }
    // Node's base64 decoder reads both alphabets.
    bytes = Buffer.from(text, 'base64');
  } else if (key.key instanceof Uint8Array) {
    bytes = Buffer.from(key.key);
  } else {
    throw new ConfigError(`${where} must be a Buffer, a Uint8Array or a base64 string.`);
  }
  if (bytes.length !== KEY_BYTES) {
    throw new ConfigError(
      `${where} is ${bytes.length} bytes; AES-256 needs exactly 32 (base64: 44 characters, e.g. \`openssl rand -base64 32\`).`,
    );
  }
  return bytes;
}

/**
 * Check the keys and make the {@link OutcomeCipher} over them.
 *
 * @throws {@link ConfigError} when the list is empty, an id is invalid or
 * repeated, or a key is not 32 bytes.
 *
 * @example
 * ```ts
 * const cipher = outcomeCipher([{ id: 'k1', key: randomBytes(32) }]);
 * const sealed = cipher.seal(recordId, outcome);
 * ```
 */
export function outcomeCipher(keys: readonly EncryptionKey[], options: { allowPlaintext?: boolean } = {}): OutcomeCipher {
  if (!Array.isArray(keys) || keys.length === 0) {
    throw new ConfigError('encryption needs at least one key: keys: [{ id, key }].');
  }
  const byId = new Map<string, Buffer>();
  keys.forEach((key, index) => {
    if (typeof key?.id !== 'string' || !KEY_ID.test(key.id)) {
      throw new ConfigError(
        `encryption key ${index + 1}: id must be 1 to 64 of [A-Za-z0-9_.-], got ${JSON.stringify(key?.id)}.`,
      );
    }
    if (byId.has(key.id)) throw new ConfigError(`encryption key id ${JSON.stringify(key.id)} is listed twice.`);
    byId.set(key.id, keyBytes(key, index));
  });
  const sealingKeyId = keys[0]!.id;
  const sealingKey = byId.get(sealingKeyId)!;
  const allowPlaintext = options.allowPlaintext === true;

  return {
    sealingKeyId,
    seal(id: string, outcome: string): string {
      const iv = randomBytes(IV_BYTES);
      const cipher = createCipheriv('aes-256-gcm', sealingKey, iv);
      cipher.setAAD(Buffer.from(id, 'utf8'));
      const sealed = Buffer.concat([cipher.update(outcome, 'utf8'), cipher.final(), cipher.getAuthTag()]);
      return `${ENVELOPE_PREFIX}${sealingKeyId}:${iv.toString('base64')}:${sealed.toString('base64')}`;
    },
    open(id: string, stored: string): string {
      if (!isSealed(stored)) {
        if (allowPlaintext) return stored;
        throw new DecryptFailedError(
          'The stored outcome is not encrypted while encryption is required; it is not replayed and nothing was run.',
          { recordId: id, reason: 'plaintext' },
        );
      }
      const parts = stored.slice(ENVELOPE_PREFIX.length).split(':');
      const [keyId, ivText, bodyText] = parts;
      const malformed = (why: string): DecryptFailedError =>
        new DecryptFailedError(`The stored outcome cannot be decrypted: ${why}; nothing was run.`, {
          recordId: id,
          keyId,
          reason: 'malformed',
        });
      if (parts.length !== 3 || keyId === undefined || ivText === undefined || bodyText === undefined) {
        throw malformed('the envelope does not have its four fields');
      }
      const key = byId.get(keyId);
      if (key === undefined) {
        throw new DecryptFailedError(
          `The stored outcome cannot be decrypted: it was sealed with key ${JSON.stringify(keyId)}, which is not among the configured keys; nothing was run.`,
          { recordId: id, keyId, reason: 'unknown-key' },
        );
      }
      if (!BASE64.test(ivText) || !BASE64.test(bodyText)) throw malformed('the envelope is not base64');
      const iv = Buffer.from(ivText, 'base64');
      const body = Buffer.from(bodyText, 'base64');
      if (iv.length !== IV_BYTES || body.length < TAG_BYTES) throw malformed('the IV or the tag is too short');
      try {
        const decipher = createDecipheriv('aes-256-gcm', key, iv);
        decipher.setAAD(Buffer.from(id, 'utf8'));
        decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
        const plain = Buffer.concat([decipher.update(body.subarray(0, body.length - TAG_BYTES)), decipher.final()]);
        return plain.toString('utf8');
      } catch (error) {
        throw new DecryptFailedError(
          `The stored outcome cannot be decrypted with key ${JSON.stringify(keyId)}: it was changed, moved from another record, or sealed with another key under that id; nothing was run.`,
          { recordId: id, keyId, reason: 'authentication', cause: error },
        );
      }
    },
  };
}

/**
 * Keys from one string of comma-separated base64 keys (an environment
 * variable such as `ONCELY_ENCRYPTION_KEY`): the first seals, all open. Each
 * key's id is derived from the key itself (`k` and 16 hex digits of its
 * SHA-256), so the same key gets the same id in every process and tool,
 * and rotation needs no separate names.
 *
 * @param value `<base64 key>[,<base64 key>…]`
 * @param name The variable's name, for messages.
 * @throws {@link ConfigError} naming the variable (never its value) when a key is not 32 bytes of base64.
 *
 * @example
 * ```ts
 * const keys = encryptionKeysFromEnv(process.env.ONCELY_ENCRYPTION_KEY!);
 * const store = withEncryption(sqliteStore({ database }), { keys });
 * ```
 */
export function encryptionKeysFromEnv(value: string, name = 'ONCELY_ENCRYPTION_KEY'): EncryptionKey[] {
  const texts = value.split(',').map((part) => part.trim());
  if (texts.length === 0 || texts.some((text) => text === '')) {
    throw new ConfigError(`${name} must be one or more base64 keys of 32 bytes, separated by commas (the first seals).`);
  }
  return texts.map((text, index) => {
    let key: Buffer;
    try {
      key = keyBytes({ id: 'x', key: text }, index);
    } catch {
      const decoded = BASE64.test(text) ? `decodes to ${Buffer.from(text, 'base64').length} bytes` : 'is not base64';
      throw new ConfigError(
        `${name}: key ${index + 1} of ${texts.length} ${decoded}; each key must be 32 random bytes as base64 (44 characters, e.g. \`openssl rand -base64 32\`).`,
      );
    }
    return { id: derivedKeyId(key), key };
  });
}

/** `k` and 16 hex digits of the key's SHA-256: names a key without revealing it. */
function derivedKeyId(key: Uint8Array): string {
  return `k${createHash('sha256').update(key).digest('hex').slice(0, 16)}`;
}

/**
 * Seal every outcome `store` keeps (see the module documentation). `complete`
 * seals; `claim`, `claimMany` and `get` open the completed records they
 * return. Everything else passes through. The wrapped store's name and
 * capabilities are kept.
 *
 * To cache replays in this process as well, put the replay cache outside:
 * `withReplayCache(withEncryption(store, …))` keeps opened outcomes in
 * memory; the other way round it caches sealed ones and opens them on each
 * hit.
 *
 * @param store The store to wrap.
 * @param options The keys; see {@link EncryptionOptions}.
 * @returns A store with the same contract as `store`, whose `claim`,
 * `claimMany` and `get` reject with {@link DecryptFailedError} for an
 * outcome that cannot be opened.
 * @throws {@link ConfigError} for a missing, malformed or repeated key.
 *
 * @example
 * ```ts
 * import Database from 'better-sqlite3';
 * import { withEncryption } from 'oncely/stores/encryption';
 * import { sqliteStore } from 'oncely/stores/sqlite';
 *
 * const store = withEncryption(sqliteStore({ database: new Database('oncely.db') }), {
 *   keys: [{ id: 'k2', key: process.env.KEY_2! }, { id: 'k1', key: process.env.KEY_1! }],
 * });
 * ```
 */
export function withEncryption(store: IdempotencyStore, options: EncryptionOptions): IdempotencyStore {
  const cipher = outcomeCipher(options?.keys, { allowPlaintext: options?.allowPlaintext === true });
  const openRecord = (id: string, record: CompletedRecord): CompletedRecord => ({
    state: 'completed',
    fingerprint: record.fingerprint,
    outcome: cipher.open(id, record.outcome),
    expiresAt: record.expiresAt,
  });
  const openResult = (id: string, result: ClaimResult): ClaimResult =>
    result.status === 'completed' ? { status: 'completed', record: openRecord(id, result.record) } : result;

  // Closures over `store`, never `this`, like withReplayCache: the object may be spread into a richer one.
  const wrapped: IdempotencyStore = {
    name: store.name,
    capabilities: store.capabilities,
    async claim(id: string, input: ClaimInput): Promise<ClaimResult> {
      return openResult(id, await store.claim(id, input));
    },
    renew: (id, token, leaseMs) => store.renew(id, token, leaseMs),
    complete: (id, token, outcome, ttlMs) => store.complete(id, token, cipher.seal(id, outcome), ttlMs),
    release: (id, token) => store.release(id, token),
    async get(id: string): Promise<StoredRecord | null> {
      const record = await store.get(id);
      return record?.state === 'completed' ? openRecord(id, record) : record;
    },
    delete: (id) => store.delete(id),
    purgeExpired: (limit) => store.purgeExpired(limit),
    close: () => store.close(),
  };
  if (store.sessions !== undefined) Object.assign(wrapped, { sessions: store.sessions });
  const transactions = store.transactions;
  if (transactions !== undefined) {
    // Transactional mode: the outcome committed with the business writes is sealed like any other.
    const sealed: StoreTransactions = {
      async open(id, token) {
        const transaction = await transactions.open(id, token);
        return {
          client: transaction.client,
          commit: (outcome, ttlMs) => transaction.commit(cipher.seal(id, outcome), ttlMs),
          rollback: () => transaction.rollback(),
        };
      },
    };
    Object.assign(wrapped, { transactions: sealed });
  }
  const claimMany = store.claimMany;
  if (claimMany !== undefined) {
    wrapped.claimMany = async (ids, input) => {
      const results = await claimMany.call(store, ids, input);
      try {
        return results.map((result, i) => openResult(ids[i]!, result));
      } catch (error) {
        // The batch fails as a whole (the engine refuses every id of it), so
        // the claims it won must not stay held until their leases end.
        await Promise.all(
          results.map((result, i) =>
            result.status === 'acquired' ? store.release(ids[i]!, result.token).catch(() => false) : false,
          ),
        );
        throw error;
      }
    };
  }
  return wrapped;
}
