/**
 * Fingerprints and record ids are stored, so their exact bytes are part of
 * the contract: here they are computed again from the documented layout
 * (docs/http.md, "Fingerprint v1") with node:crypto, and canonicalisation is
 * checked at its edges: query and header order, the toJSON chain bound,
 * keys that sort like `undefined`, BigInt with a toJSON.
 */
import { createHash, createHmac } from 'node:crypto';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { BodyInvalidError, ConfigError } from '../errors/index.js';
import { canonicalJson, FINGERPRINT_VERSION, fingerprintOf, fingerprintV1, keyedRecordId, MAX_JSON_DEPTH, recordId, recordIdFor, sha256Hex, sortedQuery } from './fingerprint.js';

const sha = (data: string | Buffer) => createHash('sha256').update(data).digest('hex');

describe('fingerprint v1 layout', () => {
  it('is SHA-256 of version, upper-cased method, path, sorted query, sorted headers, then the body', () => {
    const head = 'v1\nPOST\n/payments\na=1&b=2\nx-a:1\nx-b:2\n';
    const input = { method: 'post', path: '/payments', query: '?b=2&a=1', headers: [['x-b', '2'] as const, ['x-a', '1'] as const] };
    expect(fingerprintV1({ ...input, body: { json: { z: 1, a: [true] } } })).toBe(`v1:${sha(`${head}j{"a":[true],"z":1}`)}`);
    expect(fingerprintV1({ ...input, body: { raw: 'plain' } })).toBe(`v1:${sha(`${head}rplain`)}`);
    expect(fingerprintV1({ ...input, body: { raw: new Uint8Array([0xff, 0x00]) } })).toBe(
      `v1:${sha(Buffer.concat([Buffer.from(`${head}r`), Buffer.from([0xff, 0x00])]))}`,
    );
    expect(fingerprintV1({ ...input, body: undefined })).toBe(`v1:${sha(`${head}-`)}`);
    expect(fingerprintV1({ method: 'PATCH', path: '/p' })).toBe(`v1:${sha('v1\nPATCH\n/p\n\n-')}`);
    expect(fingerprintV1({ method: 'PATCH', path: '/p', headers: [] })).toBe(`v1:${sha('v1\nPATCH\n/p\n\n-')}`);
    expect(FINGERPRINT_VERSION).toBe('v1');
  });

  it('an empty JSON body, a raw body and no body are three fingerprints', () => {
    const base = { method: 'POST', path: '/p' };
    const prints = [{ json: '' }, { raw: '' }, undefined, { json: null }, { raw: 'null' }].map((body) => fingerprintV1({ ...base, body }));
    expect(new Set(prints).size).toBe(5);
  });

  it('headers in any order give one fingerprint', () => {
    const headers: Array<readonly [string, string]> = [
      ['x-c', '3'],
      ['x-a', '1'],
      ['x-b', '2'],
      ['x-d', '4'],
    ];
    const expected = `v1:${sha('v1\nPOST\n/p\n\nx-a:1\nx-b:2\nx-c:3\nx-d:4\n-')}`;
    for (const order of permutations(headers)) expect(fingerprintV1({ method: 'POST', path: '/p', headers: order })).toBe(expected);
  });

  it('on a Node without crypto.hash, sha256Hex falls back to createHash with the same digests', async () => {
    const expected = fingerprintOf([1]);
    const cjs = createRequire(import.meta.url)('node:crypto') as { hash?: unknown };
    const saved = cjs.hash;
    cjs.hash = undefined;
    syncBuiltinESMExports();
    try {
      vi.resetModules();
      const fresh = await import('./fingerprint.js');
      expect(fresh.sha256Hex('abc')).toBe(sha('abc'));
      expect(fresh.fingerprintOf([1])).toBe(expected);
    } finally {
      cjs.hash = saved;
      syncBuiltinESMExports();
      vi.resetModules();
    }
  });

  it('fingerprintOf is SHA-256 of "v\\n" and the canonical JSON', () => {
    expect(fingerprintOf({ b: 1, a: 2 })).toBe(`v1:${sha('v\n{"a":2,"b":1}')}`);
    expect(sha256Hex('abc')).toBe(sha('abc'));
    expect(sha256Hex(new Uint8Array([1, 2]))).toBe(sha(Buffer.from([1, 2])));
  });
});

describe('sortedQuery', () => {
  it('sorts by name, then by value, whatever the order it came in', () => {
    const pairs = ['b=1', 'a=2', 'a=1', 'c=0', 'a=10'];
    for (const order of permutations(pairs)) expect(sortedQuery(order.join('&'))).toBe('a=1&a=10&a=2&b=1&c=0');
  });

  it('drops one leading "?", and nothing else', () => {
    expect(sortedQuery('?')).toBe('');
    expect(sortedQuery(undefined)).toBe('');
    expect(sortedQuery('?b=1&a=2')).toBe('a=2&b=1');
    expect(sortedQuery('a=1&b=?')).toBe('a=1&b=%3F');
  });

  // A known bug, kept visible: the leading "?" is dropped twice (here and by
  // URLSearchParams), so `/p??a=1` (a parameter named "?a") fingerprints like
  // `/p?a=1`. Every front door passes what follows the first "?".
  it.fails('keeps a parameter named "?a" apart from one named "a" (known bug: both become a=1)', () => {
    expect(sortedQuery('??a=1')).toBe('%3Fa=1');
  });
});

describe('canonicalJson at its edges', () => {
  it('a key named "undefined" is written once', () => {
    expect(canonicalJson({ undefined: 1 })).toBe('{"undefined":1}');
    expect(canonicalJson({ b: 2, undefined: 1, a: 0 })).toBe('{"a":0,"b":2,"undefined":1}');
  });

  it('sorts by UTF-16 code unit below and above the insertion-sort threshold', () => {
    for (const n of [2, 5, 32, 33, 40]) {
      const keys = Array.from({ length: n }, (_, i) => `k${String.fromCharCode(0x7a - (i % 26))}${i}`);
      const object = Object.fromEntries(keys.map((k, i) => [k, i]));
      const sorted = [...keys].sort();
      expect(canonicalJson(object)).toBe(`{${sorted.map((k) => `"${k}":${object[k]}`).join(',')}}`);
    }
  });

  it('follows a toJSON chain of exactly MAX_JSON_DEPTH hops, and refuses one more', () => {
    const chain = (hops: number): unknown => {
      let value: unknown = 'end';
      for (let i = 0; i < hops; i++) {
        const next = value;
        value = { toJSON: () => next };
      }
      return value;
    };
    expect(canonicalJson(chain(MAX_JSON_DEPTH))).toBe('"end"');
    expect(() => canonicalJson(chain(MAX_JSON_DEPTH + 1))).toThrow(BodyInvalidError);
  });

  it('writes top-level primitives as JSON does, and NaN bare', () => {
    expect([true, false, 0, -0, 'x', null, undefined, Number.NaN].map(canonicalJson)).toEqual(['true', 'false', '0', '0', '"x"', 'null', 'null', 'NaN']);
  });

  describe('BigInt with a toJSON (a patched prototype)', () => {
    const proto = BigInt.prototype as unknown as { toJSON?: () => unknown };
    afterEach(() => {
      delete proto.toJSON;
    });

    it('keeps what JSON.stringify answers, or null when that is nothing', () => {
      proto.toJSON = function (this: bigint) {
        return `${this.toString()} as text`;
      };
      expect(canonicalJson({ n: 5n })).toBe('{"n":"5 as text"}');
      proto.toJSON = () => undefined;
      expect(canonicalJson([5n])).toBe('[null]');
    });
  });
});

describe('record ids', () => {
  it('are SHA-256 of namespace, NUL, scope, NUL, key; scope and namespace default to empty', () => {
    expect(recordId('k', 's', 'n')).toBe(sha('n\u0000s\u0000k'));
    expect(recordId('k')).toBe(sha('\u0000\u0000k'));
    expect(recordId('k', 's')).toBe(sha('\u0000s\u0000k'));
  });

  it('keyed: HMAC-SHA-256 of the same layout, defaults alike; a secret of exactly 16 bytes is enough', () => {
    const secret = '0123456789abcdef';
    const idOf = keyedRecordId(secret);
    expect(idOf('k')).toBe(createHmac('sha256', secret).update('\u0000\u0000k').digest('hex'));
    expect(idOf('k', 's')).toBe(createHmac('sha256', secret).update('\u0000s\u0000k').digest('hex'));
    expect(keyedRecordId(new Uint8Array(16).fill(7))('k')).toBe(createHmac('sha256', Buffer.alloc(16, 7)).update('\u0000\u0000k').digest('hex'));
    expect(() => keyedRecordId('0123456789abcde')).toThrow('The record id `secret` must be a string or bytes of at least 16 bytes.');
    expect(() => keyedRecordId(42 as never)).toThrow(ConfigError);
    expect(recordIdFor(secret)('k')).toBe(idOf('k'));
  });

  it('a keyed id does not change when the caller later changes its secret bytes', () => {
    const bytes = new Uint8Array(16).fill(1);
    const idOf = keyedRecordId(bytes);
    const before = idOf('k');
    bytes.fill(2);
    expect(idOf('k')).toBe(before);
  });
});

function permutations<T>(items: readonly T[]): T[][] {
  if (items.length <= 1) return [[...items]];
  return items.flatMap((item, i) => permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [item, ...rest]));
}
