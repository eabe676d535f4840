import { describe, expect, it } from 'vitest';
import { canonicalJson, fingerprintOf, fingerprintV1, recordId, sortedQuery } from './fingerprint.js';

describe('canonicalJson', () => {
  it('sorts keys at every depth and drops whitespace', () => {
    expect(canonicalJson({ b: 1, a: { d: [3, { z: 1, y: 2 }], c: 'x' } })).toBe('{"a":{"c":"x","d":[3,{"y":2,"z":1}]},"b":1}');
    expect(canonicalJson(JSON.parse('{ "b" : 2 , "a" : 1 }'))).toBe('{"a":1,"b":2}');
  });
  it('treats undefined members as absent, like JSON', () => {
    expect(canonicalJson({ a: undefined, b: null })).toBe('{"b":null}');
    expect(canonicalJson([undefined])).toBe('[null]');
  });
});

describe('fingerprintV1', () => {
  const base = { method: 'POST', path: '/payments', query: '', body: { json: { amount: 1, currency: 'EUR' } } };
  it('is versioned and stable across key order and query order', () => {
    const a = fingerprintV1(base);
    expect(a).toMatch(/^v1:[0-9a-f]{64}$/);
    expect(fingerprintV1({ ...base, body: { json: { currency: 'EUR', amount: 1 } } })).toBe(a);
    expect(fingerprintV1({ ...base, query: '?b=2&a=1' })).toBe(fingerprintV1({ ...base, query: 'a=1&b=2' }));
  });
  it('changes with method, path, query, body and chosen headers', () => {
    const a = fingerprintV1(base);
    expect(fingerprintV1({ ...base, method: 'PATCH' })).not.toBe(a);
    expect(fingerprintV1({ ...base, path: '/orders' })).not.toBe(a);
    expect(fingerprintV1({ ...base, query: 'x=1' })).not.toBe(a);
    expect(fingerprintV1({ ...base, body: { json: { amount: 2, currency: 'EUR' } } })).not.toBe(a);
    expect(fingerprintV1({ ...base, body: undefined })).not.toBe(a);
    expect(fingerprintV1({ ...base, headers: [['x-tenant', 'a']] })).not.toBe(a);
  });
  it('hashes raw bodies byte for byte and never confuses them with JSON', () => {
    const raw = fingerprintV1({ ...base, body: { raw: '{"amount":1,"currency":"EUR"}' } });
    expect(raw).not.toBe(fingerprintV1(base));
    expect(fingerprintV1({ ...base, body: { raw: new TextEncoder().encode('{"amount":1,"currency":"EUR"}') } })).toBe(raw);
  });
});

describe('sortedQuery', () => {
  it('sorts by name then value', () => {
    expect(sortedQuery('?b=2&a=2&a=1')).toBe('a=1&a=2&b=2');
    expect(sortedQuery('')).toBe('');
  });
});

describe('recordId and fingerprintOf', () => {
  it('separates scopes and namespaces, and never stores the raw key', () => {
    const id = recordId('key-1', 'acct_a');
    expect(id).toMatch(/^[0-9a-f]{64}$/);
    expect(id).not.toContain('key-1');
    expect(recordId('key-1', 'acct_b')).not.toBe(id);
    expect(recordId('key-1', 'acct_a', 'orders')).not.toBe(id);
    expect(recordId('key-1', 'acct_a')).toBe(id);
    // The separator keeps ("a", "bc") and ("ab", "c") apart.
    expect(recordId('bc', 'a')).not.toBe(recordId('c', 'ab'));
  });
  it('fingerprints values canonically', () => {
    expect(fingerprintOf({ a: 1, b: 2 })).toBe(fingerprintOf({ b: 2, a: 1 }));
    expect(fingerprintOf([1, 2])).not.toBe(fingerprintOf([2, 1]));
  });
});
