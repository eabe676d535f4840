import * as crypto from 'node:crypto';
import { BodyInvalidError, ConfigError } from '../errors/index.js';

/**
 * One-shot SHA-256, hex. `crypto.hash` (Node 20.12+) skips the per-call
 * digest lookup that makes `createHash` an order of magnitude slower on
 * OpenSSL 3; older Nodes fall back to `createHash`.
 */
export const sha256Hex: (data: string | Uint8Array) => string =
  typeof (crypto as { hash?: unknown }).hash === 'function'
    ? (data) => crypto.hash('sha256', data, 'hex')
    : (data) => crypto.createHash('sha256').update(data).digest('hex');

/** The fingerprint algorithm version stored with every record. */
export const FINGERPRINT_VERSION = 'v1';

/**
 * The deepest nesting of arrays and objects that {@link canonicalJson}
 * accepts. Real request bodies stay far below it; the cap turns a hostile
 * body like `[[[[...]]]]` into a 400 instead of unbounded work.
 */
export const MAX_JSON_DEPTH = 512;

/**
 * JSON with object keys sorted and no whitespace, so that two bodies that
 * mean the same thing hash the same. Arrays keep their order; `toJSON` is
 * honoured; in objects, `undefined`, functions and symbols are skipped, and
 * elsewhere they read as `null`, as with `JSON.stringify`.
 *
 * Where JSON has no spelling, the output leaves JSON so that distinct values
 * stay distinct: `NaN`, `Infinity` and `-Infinity` (JSON.parse makes these
 * from a literal like `1e400`) are written bare, and a BigInt as `123n`.
 *
 * An iterative walk, so nesting cannot overflow the call stack.
 *
 * @throws BodyInvalidError when arrays and objects nest deeper than
 *   {@link MAX_JSON_DEPTH} (or a `toJSON` chain is longer than that).
 * @throws TypeError when the value is circular.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return primitiveJson(value);
  // One entry per open array or object, in parallel arrays (no frame objects
  // on the hot path): the container, its sorted keys (undefined for an
  // array) and the position of the member being written.
  const containers: object[] = [];
  const keyLists: Array<string[] | undefined> = [];
  const positions: number[] = [];
  let depth = 0;
  let out = '';
  let current: unknown = value;
  walk: for (;;) {
    // Write `current`: a primitive whole; an array or object opened, moving
    // on to its first member.
    let hops = 0;
    for (;;) {
      if (current === null || typeof current !== 'object') {
        out += primitiveJson(current);
        break;
      }
      if (Array.isArray(current)) {
        // An empty array is a level too.
        if (depth === MAX_JSON_DEPTH) tooDeep(current, containers, depth);
        if (current.length === 0) {
          out += '[]';
          break;
        }
        containers[depth] = current;
        keyLists[depth] = undefined;
        positions[depth] = 0;
        depth++;
        out += '[';
        current = current[0];
        continue walk;
      }
      const toJSON = (current as { toJSON?: () => unknown }).toJSON;
      if (typeof toJSON === 'function') {
        // Each hop may build a fresh object, so bound the chain as well.
        if (++hops > MAX_JSON_DEPTH) tooDeep(current, containers, depth);
        current = toJSON.call(current);
        continue;
      }
      if (depth === MAX_JSON_DEPTH) tooDeep(current, containers, depth);
      const object = current as Record<string, unknown>;
      const keys = sortedKeys(object);
      let i = 0;
      let member: unknown;
      for (; i < keys.length; i++) {
        member = object[keys[i]!];
        if (member !== undefined && typeof member !== 'function' && typeof member !== 'symbol') break;
      }
      if (i === keys.length) {
        out += '{}';
        break;
      }
      containers[depth] = object;
      keyLists[depth] = keys;
      positions[depth] = i;
      depth++;
      out += `{${quote(keys[i]!)}:`;
      current = member;
      continue walk;
    }
    // Move on to the next member of the innermost open container, closing
    // the ones that are finished.
    for (;;) {
      if (depth === 0) return out;
      const top = depth - 1;
      const keys = keyLists[top];
      if (keys === undefined) {
        const array = containers[top] as unknown[];
        const i = positions[top]! + 1;
        if (i < array.length) {
          positions[top] = i;
          out += ',';
          current = array[i];
          continue walk;
        }
        out += ']';
      } else {
        const object = containers[top] as Record<string, unknown>;
        for (let i = positions[top]! + 1; i < keys.length; i++) {
          const member = object[keys[i]!];
          if (member === undefined || typeof member === 'function' || typeof member === 'symbol') continue;
          positions[top] = i;
          out += `,${quote(keys[i]!)}:`;
          current = member;
          continue walk;
        }
        out += '}';
      }
      depth--;
    }
  }
}

// Object.keys sorted as `.sort()` sorts them (by UTF-16 code unit; keys are
// unique, so any correct sort agrees). Insertion sort is several times faster
// for the few keys of a typical object; beyond a few dozen, the built-in sort
// keeps the worst case at n log n.
function sortedKeys(object: object): string[] {
  const keys = Object.keys(object);
  const n = keys.length;
  if (n > 32) return keys.sort();
  for (let i = 1; i < n; i++) {
    const key = keys[i]!;
    let j = i - 1;
    while (j >= 0 && keys[j]! > key) {
      keys[j + 1] = keys[j]!;
      j--;
    }
    keys[j + 1] = key;
  }
  return keys;
}

// Characters JSON.stringify escapes: quote, backslash, controls, and (to
// find lone ones) any surrogate.
// biome-ignore lint/suspicious/noControlCharactersInRegex: the controls are what JSON escapes
const NEEDS_ESCAPE = /["\\\u0000-\u001f\ud800-\udfff]/;

// A string as JSON.stringify writes it; most need no escaping, and the test
// is cheaper than the call.
function quote(text: string): string {
  return NEEDS_ESCAPE.test(text) ? JSON.stringify(text) : `"${text}"`;
}

// A value that is not an array or object, as JSON.stringify writes it.
function primitiveJson(value: unknown): string {
  switch (typeof value) {
    case 'string':
      return quote(value);
    case 'number':
      // Number-to-string is what JSON.stringify does for finite numbers (-0
      // gives "0"). It also names NaN and ±Infinity, which JSON.stringify
      // would write as null: a 1e400 literal must not hash like null.
      return `${value}`;
    case 'boolean':
      return value ? 'true' : 'false';
    case 'bigint':
      // JSON.stringify throws on a BigInt. `123n` cannot be confused with the
      // number or a string; a BigInt with a toJSON (a patched prototype) keeps
      // the answer it always had.
      if (typeof (value as { toJSON?: unknown }).toJSON === 'function') return JSON.stringify(value) ?? 'null';
      return `${value}n`;
    case 'function':
      // JSON.stringify calls a function's `toJSON`, or gives undefined.
      return JSON.stringify(value) ?? 'null';
    default:
      // null, undefined, symbols.
      return 'null';
  }
}

// Called when one more level would pass the cap. A cycle always gets here
// (its path repeats), and is a programming error rather than a bad body.
function tooDeep(next: object, containers: readonly object[], depth: number): never {
  // Entries past `depth` are stale (closed siblings), not ancestors.
  if (containers.slice(0, depth).includes(next)) throw new TypeError('Converting circular structure to canonical JSON.');
  throw new BodyInvalidError(`The body is nested too deeply: more than ${MAX_JSON_DEPTH} levels of arrays and objects.`);
}

/** What fingerprint v1 covers. */
export interface FingerprintInput {
  method: string;
  /** Path without the query string. */
  path: string;
  /** The raw query string, with or without its leading `?`. */
  query?: string;
  /** The body: parsed JSON (hashed canonically), raw bytes or text, or nothing. */
  body?: { json: unknown } | { raw: Uint8Array | string } | undefined;
  /** Header names and values the user chose to include (names lower-cased by the caller). */
  headers?: ReadonlyArray<readonly [string, string]>;
}

/** Query parameters sorted by name, then value, re-encoded. */
export function sortedQuery(query: string | undefined): string {
  if (!query) return '';
  const text = query.startsWith('?') ? query.slice(1) : query;
  if (text.length === 0) return '';
  const pairs = [...new URLSearchParams(text)];
  pairs.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
  return new URLSearchParams(pairs).toString();
}

/**
 * Fingerprint v1: SHA-256 over method, path, sorted query, the chosen
 * headers and the body (canonical JSON when it is JSON, raw bytes otherwise).
 * Returns `"v1:<hex>"`.
 */
export function fingerprintV1(input: FingerprintInput): string {
  let head = `${FINGERPRINT_VERSION}\n${input.method.toUpperCase()}\n${input.path}\n${sortedQuery(input.query)}\n`;
  if (input.headers && input.headers.length > 0) {
    const sorted = [...input.headers].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    for (const [name, value] of sorted) head += `${name}:${value}\n`;
  }
  const body = input.body;
  let digest: string;
  if (body === undefined) digest = sha256Hex(`${head}-`);
  else if ('json' in body) digest = sha256Hex(`${head}j${canonicalJson(body.json)}`);
  else if (typeof body.raw === 'string') digest = sha256Hex(`${head}r${body.raw}`);
  else digest = sha256Hex(Buffer.concat([Buffer.from(`${head}r`), body.raw]));
  return `${FINGERPRINT_VERSION}:${digest}`;
}

/** Fingerprint of any value (function arguments, a chosen set of fields): SHA-256 of its canonical JSON. */
export function fingerprintOf(value: unknown): string {
  return `${FINGERPRINT_VERSION}:${sha256Hex(`v\n${canonicalJson(value)}`)}`;
}

/**
 * The record id: SHA-256 of namespace, scope and key, hex. Stores index
 * this; the raw key is not stored. The same key in two scopes names two
 * operations.
 */
export function recordId(key: string, scope = '', namespace = ''): string {
  return sha256Hex(`${namespace}\u0000${scope}\u0000${key}`);
}

/** The secret behind keyed record ids: at least 16 bytes (a string counts its UTF-8 bytes). */
export type RecordIdSecret = string | Uint8Array;

/**
 * Keyed record ids: the same id layout as {@link recordId}, but an
 * HMAC-SHA-256 under `secret`, so that someone who can read the store (or a
 * dump of it) cannot confirm a guessed (scope, key) pair offline. Every
 * process sharing a store must use the same secret; changing it makes every
 * existing record unreachable (its keys run again once), so rotate it only
 * with the retention window in mind.
 *
 * @throws {@link ConfigError} for a secret shorter than 16 bytes.
 * @example
 * ```ts
 * const idOf = keyedRecordId(process.env.ONCELY_RECORD_SECRET ?? 'a secret of 16+ bytes');
 * idOf('order-1001', 'acct_1'); // 64 hex characters
 * ```
 */
export function keyedRecordId(secret: RecordIdSecret): (key: string, scope?: string, namespace?: string) => string {
  const bytes = typeof secret === 'string' ? Buffer.from(secret, 'utf8') : secret;
  if (!(bytes instanceof Uint8Array) || bytes.byteLength < 16) {
    throw new ConfigError('The record id `secret` must be a string or bytes of at least 16 bytes.');
  }
  const material = Buffer.from(bytes);
  return (key, scope = '', namespace = '') =>
    crypto.createHmac('sha256', material).update(`${namespace}\u0000${scope}\u0000${key}`).digest('hex');
}

/** The record id function for an optional secret: {@link keyedRecordId} with one, {@link recordId} without. */
export function recordIdFor(secret: RecordIdSecret | undefined): (key: string, scope?: string, namespace?: string) => string {
  return secret === undefined ? recordId : keyedRecordId(secret);
}
