import { describe, expect, it } from 'vitest';
import { BodyInvalidError } from '../errors/index.js';
import { mulberry32 as random } from '../testing/random.js';
import { canonicalJson, fingerprintOf, fingerprintV1, MAX_JSON_DEPTH, recordId, sortedQuery } from './fingerprint.js';

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

/** 0…n-1 in a fixed scrambled order (a permutation: 7 is prime to every n used here). */
const scrambled = (n: number): number[] => Array.from({ length: n }, (_, i) => (i * 7 + 3) % n);

describe('sortedQuery', () => {
  it('sorts by name then value', () => {
    expect(sortedQuery('?b=2&a=2&a=1')).toBe('a=1&a=2&b=2');
    expect(sortedQuery('')).toBe('');
    expect(sortedQuery('?')).toBe('');
  });
  it('orders many values of one name, whatever order they came in (both halves of the comparison count)', () => {
    // Long enough that the engine's sort compares in both directions (short arrays only ask "greater?").
    const values = scrambled(64).map((i) => `v${String(i).padStart(2, '0')}`);
    const query = [...values.map((v) => `a=${v}`), 'b=1', ...values.map((v) => `c=${v}`)].join('&');
    const sorted = [...values].sort();
    expect(sortedQuery(query)).toBe([...sorted.map((v) => `a=${v}`), 'b=1', ...sorted.map((v) => `c=${v}`)].join('&'));
    expect(sortedQuery([...values].reverse().map((v) => `a=${v}`).join('&'))).toBe(sorted.map((v) => `a=${v}`).join('&'));
  });
});

describe('fingerprintV1 headers', () => {
  it('does not depend on the order the chosen headers are listed in', () => {
    const names = scrambled(48).map((i) => `x-h${String(i).padStart(2, '0')}`);
    const headers = names.map((name, i) => [name, `value-${i % 5}`] as const);
    const input = { method: 'POST', path: '/p' };
    const a = fingerprintV1({ ...input, headers });
    expect(fingerprintV1({ ...input, headers: [...headers].reverse() })).toBe(a);
    expect(fingerprintV1({ ...input, headers: [...headers].sort((x, y) => (x[0] < y[0] ? -1 : 1)) })).toBe(a);
    // The values are hashed with their names: swapping two values changes it.
    const swapped = headers.map(([name, value], i) => [name, i === 0 ? headers[1]![1] : i === 1 ? headers[0]![1] : value] as const);
    expect(fingerprintV1({ ...input, headers: swapped })).not.toBe(a);
  });
});

describe('canonicalJson strings', () => {
  it('escapes strings made only of characters that need it, as JSON does', () => {
    for (const text of ['"', '\\', '\n', '\u0000', '\u001f', '\ud800', '"\\', '\udfff\ud800']) {
      expect(canonicalJson(text)).toBe(JSON.stringify(text));
      expect(canonicalJson({ [text]: text })).toBe(`{${JSON.stringify(text)}:${JSON.stringify(text)}}`);
    }
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

// Today's (pre-iterative) implementation, copied verbatim: stored fingerprints
// depend on its output, so the iterative walk must match it byte for byte.
function recursiveCanonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    const text = JSON.stringify(value);
    return text === undefined ? 'null' : text;
  }
  if (Array.isArray(value)) {
    let out = '[';
    for (let i = 0; i < value.length; i++) {
      if (i > 0) out += ',';
      out += recursiveCanonicalJson(value[i]);
    }
    return `${out}]`;
  }
  const toJSON = (value as { toJSON?: () => unknown }).toJSON;
  if (typeof toJSON === 'function') return recursiveCanonicalJson(toJSON.call(value));
  const keys = Object.keys(value).sort();
  let out = '{';
  let first = true;
  for (const key of keys) {
    const v = (value as Record<string, unknown>)[key];
    if (v === undefined || typeof v === 'function' || typeof v === 'symbol') continue;
    if (!first) out += ',';
    first = false;
    out += `${JSON.stringify(key)}:${recursiveCanonicalJson(v)}`;
  }
  return `${out}}`;
}


const STRING_PARTS = [
  '', 'a', 'Z', 'key', ' ', '"', '\\', '/', '\n', '\r', '\t', '\b', '\f', '\u0000', '\u001f', '\u007f',
  '\u2028', '\u2029', 'é', 'ß', '中文', '😀', '\ud800', '\udfff', '\udfff\ud800', '10', '2', '-1', '1.5',
  '__proto__', 'constructor', 'toJSON', 'null', 'true', '{}', '[]',
];
const NUMBERS = [
  0, -0, 1, -1, 2, 10, 255, 0.1, -0.5, 1.5e-7, 1e21, 1e-7, 123456789012, 2 ** 53, -(2 ** 53), 5e-324,
  Number.MAX_VALUE, -Number.MAX_VALUE, Number.MIN_VALUE, Math.PI,
];

function generate(next: () => number, depth: number): unknown {
  const pick = <T>(list: readonly T[]): T => list[Math.floor(next() * list.length)]!;
  const text = () => {
    let s = '';
    for (let n = Math.floor(next() * 4); n > 0; n--) s += pick(STRING_PARTS);
    return s;
  };
  const roll = next();
  if (depth <= 0 || roll < 0.35) {
    const kind = Math.floor(next() * 8);
    if (kind === 0) return null;
    if (kind === 1) return next() < 0.5;
    if (kind === 2) return pick(NUMBERS);
    if (kind === 3) return (next() - 0.5) * 10 ** Math.floor(next() * 40 - 20);
    if (kind === 4) return Math.floor((next() - 0.5) * 1e6);
    if (kind === 5) return pick([undefined, () => 1, Symbol('s')]);
    return text();
  }
  if (roll < 0.6) {
    const length = Math.floor(next() * 6);
    const array: unknown[] = [];
    for (let i = 0; i < length; i++) array.push(generate(next, depth - 1));
    if (next() < 0.05) array.length += 2; // holes read as undefined
    return array;
  }
  if (roll < 0.9) {
    // Own `__proto__` keys as JSON.parse makes them, hence defineProperty.
    const object: Record<string, unknown> = next() < 0.1 ? Object.create(null) : {};
    for (let n = Math.floor(next() * 6); n > 0; n--) {
      Object.defineProperty(object, text(), { value: generate(next, depth - 1), enumerable: true, configurable: true });
    }
    return object;
  }
  const kind = Math.floor(next() * 6);
  if (kind === 0) return new Date(Math.floor(next() * 4e12));
  if (kind === 1) return new Date(Number.NaN); // toJSON gives null
  if (kind === 2) {
    const inner = generate(next, depth - 1);
    return { toJSON: () => inner, ignored: 1 };
  }
  if (kind === 3) return { toJSON: () => undefined };
  if (kind === 4) return new Map([[1, 2]]);
  return [new Number(3), new String('s'), new Boolean(false)];
}

describe('canonicalJson compared with the recursive implementation', () => {
  it('gives the same bytes for many generated values, as built and as parsed from JSON', () => {
    for (let seed = 1; seed <= 3000; seed++) {
      const value = generate(random(seed), 6);
      const expected = recursiveCanonicalJson(value);
      if (canonicalJson(value) !== expected) expect({ seed, got: canonicalJson(value) }).toEqual({ seed, got: expected });
      const text = JSON.stringify(value);
      if (text === undefined) continue;
      const parsed = JSON.parse(text);
      const expectedParsed = recursiveCanonicalJson(parsed);
      if (canonicalJson(parsed) !== expectedParsed) {
        expect({ seed, got: canonicalJson(parsed) }).toEqual({ seed, got: expectedParsed });
      }
    }
  });

  it('keeps known outputs (pinned, independent of the copy above)', () => {
    expect(canonicalJson({ b: [1, 'x', null, true], a: { d: -0, c: 1e21 } })).toBe('{"a":{"c":1e+21,"d":0},"b":[1,"x",null,true]}');
    expect(canonicalJson({ f: () => 1, s: Symbol('x'), u: undefined, n: null })).toBe('{"n":null}');
    expect(canonicalJson([() => 1, Symbol('x'), undefined])).toBe('[null,null,null]');
    expect(canonicalJson(undefined)).toBe('null');
    // JSON.stringify calls a function's own toJSON outside objects; so did the old code.
    expect(canonicalJson([Object.assign(() => 1, { toJSON: () => 'f' })])).toBe('["f"]');
    expect(canonicalJson('\u2028"\\\ud800')).toBe('"\u2028\\"\\\\\\ud800"');
    expect(canonicalJson({ at: new Date(0), t: { toJSON: () => ({ z: 1, y: [2] }) } })).toBe(
      '{"at":"1970-01-01T00:00:00.000Z","t":{"y":[2],"z":1}}',
    );
    expect(canonicalJson({ t: { toJSON: () => undefined } })).toBe('{"t":null}');
    expect(canonicalJson(JSON.parse('{"__proto__":{"b":1,"a":2},"10":0,"9":0}'))).toBe('{"10":0,"9":0,"__proto__":{"a":2,"b":1}}');
    expect(canonicalJson([[], {}, [[]], { a: {} }])).toBe('[[],{},[[]],{"a":{}}]');
  });

  it('escapes every UTF-16 code unit as JSON.stringify does, in values and keys', () => {
    for (let c = 0; c <= 0xffff; c++) {
      const text = `a${String.fromCharCode(c)}`;
      const expected = `{${JSON.stringify(text)}:${JSON.stringify(text)}}`;
      if (canonicalJson({ [text]: text }) !== expected) expect({ c, got: canonicalJson({ [text]: text }) }).toEqual({ c, got: expected });
    }
    expect(canonicalJson('😀\ud83d\ude00')).toBe(JSON.stringify('😀\ud83d\ude00'));
  });

  it('sorts many keys (the built-in sort past a few dozen) as before', () => {
    const object: Record<string, number> = {};
    const next = random(7);
    for (let i = 0; i < 500; i++) object[`${Math.floor(next() * 1e6).toString(36)}${String.fromCharCode(0xd7ff + (i % 3))}`] = i;
    expect(canonicalJson(object)).toBe(recursiveCanonicalJson(object));
  });

  it('matches at exactly MAX_JSON_DEPTH levels, arrays and objects', () => {
    const arrays = JSON.parse(`${'['.repeat(MAX_JSON_DEPTH)}1${']'.repeat(MAX_JSON_DEPTH)}`);
    expect(canonicalJson(arrays)).toBe(recursiveCanonicalJson(arrays));
    const objects = JSON.parse(`${'{"a":'.repeat(MAX_JSON_DEPTH - 1)}{}${'}'.repeat(MAX_JSON_DEPTH - 1)}`);
    expect(canonicalJson(objects)).toBe(recursiveCanonicalJson(objects));
  });
});

describe('canonicalJson depth limit', () => {
  const nestedArrays = (depth: number) => JSON.parse(`${'['.repeat(depth)}${']'.repeat(depth)}`);
  const nestedObjects = (depth: number) => JSON.parse(`${'{"a":'.repeat(depth - 1)}{}${'}'.repeat(depth - 1)}`);

  it('is 512 levels', () => {
    expect(MAX_JSON_DEPTH).toBe(512);
  });

  it('refuses 100,000 levels with BodyInvalidError (a 400), not a stack overflow', () => {
    for (const value of [nestedArrays(100_000), nestedObjects(100_000)]) {
      let thrown: unknown;
      try {
        canonicalJson(value);
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(BodyInvalidError);
      expect(thrown).toMatchObject({ code: 'ONCELY_BODY_INVALID', status: 400, slug: 'body-invalid' });
      expect((thrown as Error).message).toMatch(/nested too deeply/);
    }
  });

  it('refuses an 8 KB body of 4,100 levels through fingerprintV1 and fingerprintOf', () => {
    const body = { json: nestedArrays(4_100) };
    expect(() => fingerprintV1({ method: 'POST', path: '/', body })).toThrow(BodyInvalidError);
    expect(() => fingerprintOf(nestedObjects(4_100))).toThrow(BodyInvalidError);
  });

  it('refuses one level past the limit', () => {
    expect(() => canonicalJson(nestedArrays(MAX_JSON_DEPTH + 1))).toThrow(BodyInvalidError);
    expect(() => canonicalJson(nestedObjects(MAX_JSON_DEPTH + 1))).toThrow(BodyInvalidError);
    expect(() => canonicalJson(nestedArrays(MAX_JSON_DEPTH))).not.toThrow();
  });

  it('bounds toJSON chains too, which would otherwise loop for ever', () => {
    const endless: { toJSON(): unknown } = { toJSON: () => ({ toJSON: endless.toJSON }) };
    expect(() => canonicalJson(endless)).toThrow(BodyInvalidError);
  });

  it('names a circular value as a programming error (TypeError), not a bad body', () => {
    const loop: Record<string, unknown> = { a: 1 };
    loop.self = { back: loop };
    expect(() => canonicalJson(loop)).toThrow(TypeError);
    expect(() => canonicalJson(loop)).toThrow(/circular/);
    expect(() => fingerprintOf([loop])).toThrow(TypeError);
  });
});

describe('numbers JSON cannot write, and BigInt', () => {
  it('writes non-finite numbers as their own tokens, never as null', () => {
    // JSON.parse turns an overflowing literal into ±Infinity.
    expect(canonicalJson(JSON.parse('[1e400,-1e400,null]'))).toBe('[Infinity,-Infinity,null]');
    expect(canonicalJson({ n: Number.NaN })).toBe('{"n":NaN}');
  });

  it('gives 1e400, -1e400 and null bodies three fingerprints', () => {
    const of = (text: string) => fingerprintV1({ method: 'POST', path: '/p', body: { json: JSON.parse(text) } });
    const prints = ['{"a":1e400}', '{"a":-1e400}', '{"a":null}', '1e400', '-1e400', 'null'].map(of);
    expect(new Set(prints).size).toBe(prints.length);
    expect(of('{"a":1e400}')).toBe(of('{"a":1e999}'));
  });

  it('gives NaN, Infinity, -Infinity and null four fingerprints as arguments', () => {
    for (const wrap of [(v: unknown) => v, (v: unknown) => [v], (v: unknown) => ({ a: v })]) {
      const prints = [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, null].map((v) => fingerprintOf(wrap(v)));
      expect(new Set(prints).size).toBe(4);
    }
  });

  it('writes a BigInt as digits and n, apart from the number and the strings', () => {
    expect(canonicalJson({ id: 2n ** 64n, neg: -5n })).toBe('{"id":18446744073709551616n,"neg":-5n}');
    const prints = [[1n], [1], ['1'], ['1n']].map((args) => fingerprintOf(args));
    expect(new Set(prints).size).toBe(4);
  });
});
