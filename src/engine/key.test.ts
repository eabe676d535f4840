import { describe, expect, it } from 'vitest';
import { parseIdempotencyKey } from './key.js';

describe('parseIdempotencyKey', () => {
  it('accepts the bare and the structured-field string forms', () => {
    expect(parseIdempotencyKey('abc-123')).toBe('abc-123');
    expect(parseIdempotencyKey('  abc  ')).toBe('abc');
    expect(parseIdempotencyKey('"8e03978e-40d5-43e8-bc93-6894a57f9324"')).toBe('8e03978e-40d5-43e8-bc93-6894a57f9324');
    expect(parseIdempotencyKey('"a\\"b\\\\c"')).toBe('a"b\\c');
    expect(parseIdempotencyKey('"a,b"')).toBe('a,b');
    expect(parseIdempotencyKey(['only-one'])).toBe('only-one');
  });

  it('answers undefined when the header is absent', () => {
    expect(parseIdempotencyKey(undefined)).toBeUndefined();
    expect(parseIdempotencyKey(null)).toBeUndefined();
    expect(parseIdempotencyKey([])).toBeUndefined();
  });

  it.each([
    ['', /empty/],
    ['""', /empty/],
    ['k'.repeat(256), /256 characters/],
    [`"${'k'.repeat(256)}"`, /256 characters/],
    ['caf\u00e9', /visible ASCII/],
    ['a b', /visible ASCII/],
    ['"a b"', /visible ASCII/],
    ['tab\there', /visible ASCII/],
    ['a,b', /list/],
    ['"a", "b"', /list/],
    ['"open', /closing quote/],
    ['"a";p=1', /after its closing quote/],
    ['"a\\n"', /escapes/],
  ])('rejects %j', (value, why) => {
    expect(() => parseIdempotencyKey(value)).toThrow(why);
    try {
      parseIdempotencyKey(value);
    } catch (error) {
      expect(error).toMatchObject({ code: 'ONCELY_KEY_MALFORMED', status: 400 });
    }
  });

  it('rejects several fields', () => {
    expect(() => parseIdempotencyKey(['a', 'b'])).toThrow(/several/);
  });

  it('accepts exactly 255 characters and every visible ASCII character', () => {
    expect(parseIdempotencyKey('k'.repeat(255))).toHaveLength(255);
    let visible = '';
    for (let c = 0x21; c <= 0x7e; c++) if (c !== 0x2c && c !== 0x22) visible += String.fromCharCode(c);
    expect(parseIdempotencyKey(visible)).toBe(visible);
  });

  it('enforces a required pattern on the whole key', () => {
    const uuid = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/;
    expect(parseIdempotencyKey('8e03978e-40d5-43e8-bc93-6894a57f9324', { pattern: uuid })).toBeDefined();
    expect(() => parseIdempotencyKey('x8e03978e-40d5-43e8-bc93-6894a57f9324', { pattern: uuid })).toThrow(/required form/);
    expect(() => parseIdempotencyKey('not-a-uuid', { pattern: uuid })).toThrow(/required form/);
  });
});

describe('parseIdempotencyKey, edge by edge', () => {
  it('a list after a quoted key is named a list, spaces before the comma or not', () => {
    expect(() => parseIdempotencyKey('"a" ,"b"')).toThrow('The Idempotency-Key must be a single key, not a list.');
    expect(() => parseIdempotencyKey('"a" x')).toThrow(/after its closing quote/);
  });

  it('a pattern must match the whole key, not a prefix of it', () => {
    const uuid = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/;
    expect(() => parseIdempotencyKey('8e03978e-40d5-43e8-bc93-6894a57f9324x', { pattern: uuid })).toThrow(/required form/);
    expect(() => parseIdempotencyKey('abc123', { pattern: /[a-z]+/ })).toThrow(/required form/);
  });

  it('a pattern keeps its other flags (i) and loses only its state (g, y): the same key passes every time', () => {
    expect(parseIdempotencyKey('ABC', { pattern: /^[a-c]+$/i })).toBe('ABC');
    const global = /[a-z]+/g;
    const sticky = /[a-z]+/y;
    for (let i = 0; i < 3; i++) {
      expect(parseIdempotencyKey('abc', { pattern: global })).toBe('abc');
      expect(parseIdempotencyKey('abc', { pattern: sticky })).toBe('abc');
    }
    expect(global.lastIndex).toBe(0);
  });
});
