import * as crypto from 'node:crypto';

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
 * JSON with object keys sorted and no whitespace, so that two bodies that
 * mean the same thing hash the same. Arrays keep their order.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    const text = JSON.stringify(value);
    return text === undefined ? 'null' : text;
  }
  if (Array.isArray(value)) {
    let out = '[';
    for (let i = 0; i < value.length; i++) {
      if (i > 0) out += ',';
      out += canonicalJson(value[i]);
    }
    return `${out}]`;
  }
  const toJSON = (value as { toJSON?: () => unknown }).toJSON;
  if (typeof toJSON === 'function') return canonicalJson(toJSON.call(value));
  const keys = Object.keys(value).sort();
  let out = '{';
  let first = true;
  for (const key of keys) {
    const v = (value as Record<string, unknown>)[key];
    if (v === undefined || typeof v === 'function' || typeof v === 'symbol') continue;
    if (!first) out += ',';
    first = false;
    out += `${JSON.stringify(key)}:${canonicalJson(v)}`;
  }
  return `${out}}`;
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
