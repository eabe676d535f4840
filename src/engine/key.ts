import { KeyMalformedError } from '../errors/index.js';

/** Longest key accepted, in characters, after unquoting. */
export const MAX_KEY_LENGTH = 255;

/** Options of {@link parseIdempotencyKey}. */
export interface KeyRules {
  /** A pattern the unquoted key must match in full, e.g. a UUID. */
  pattern?: RegExp;
}

const isVisibleAscii = (code: number): boolean => code >= 0x21 && code <= 0x7e;

/**
 * Parse an `Idempotency-Key` header. Accepts the structured-field string form
 * (`"abc"`, with `\"` and `\\` escapes) and the bare form most clients send.
 * After unquoting a key is 1 to 255 characters of visible ASCII.
 *
 * @param values - every field line of the header (several lines are an error),
 *   a single value, or nothing.
 * @returns the key, or `undefined` when the header is absent.
 * @throws {@link KeyMalformedError} saying why the key is not acceptable.
 *
 * @example
 * ```ts
 * parseIdempotencyKey('"8e03978e-40d5-43e8-bc93-6894a57f9324"'); // '8e03978e-…'
 * parseIdempotencyKey(['a', 'b']); // throws: several Idempotency-Key fields
 * ```
 */
export function parseIdempotencyKey(
  values: string | readonly string[] | undefined | null,
  rules: KeyRules = {},
): string | undefined {
  if (values === undefined || values === null) return undefined;
  let raw: string;
  if (typeof values === 'string') raw = values;
  else if (values.length === 0) return undefined;
  else if (values.length > 1) throw new KeyMalformedError('Send exactly one Idempotency-Key field; this request has several.');
  else raw = values[0]!;

  const text = raw.trim();
  if (text.length === 0) throw new KeyMalformedError('The Idempotency-Key is empty.');
  const key = text.charCodeAt(0) === 0x22 ? unquote(text) : bare(text);
  if (key.length === 0) throw new KeyMalformedError('The Idempotency-Key is empty.');
  if (key.length > MAX_KEY_LENGTH) {
    throw new KeyMalformedError(`The Idempotency-Key is ${key.length} characters long; at most ${MAX_KEY_LENGTH} are allowed.`);
  }
  for (let i = 0; i < key.length; i++) {
    if (!isVisibleAscii(key.charCodeAt(i))) {
      throw new KeyMalformedError(
        'The Idempotency-Key may contain only visible ASCII characters (0x21 to 0x7E): no spaces, controls or non-ASCII.',
      );
    }
  }
  if (rules.pattern && !matchesWhole(rules.pattern, key)) {
    throw new KeyMalformedError(`The Idempotency-Key does not have the required form (${rules.pattern.source}).`);
  }
  return key;
}

function bare(text: string): string {
  if (text.includes(',')) {
    throw new KeyMalformedError('The Idempotency-Key must be a single key, not a comma-separated list.');
  }
  return text;
}

function unquote(text: string): string {
  let out = '';
  let i = 1;
  for (; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x5c) {
      const next = text.charCodeAt(i + 1);
      if (next !== 0x22 && next !== 0x5c) {
        throw new KeyMalformedError('Only \\" and \\\\ escapes are allowed in a quoted Idempotency-Key.');
      }
      out += text[i + 1];
      i++;
    } else if (c === 0x22) {
      break;
    } else {
      out += text[i];
    }
  }
  if (i >= text.length) throw new KeyMalformedError('The quoted Idempotency-Key has no closing quote.');
  const rest = text.slice(i + 1).trim();
  if (rest.length > 0) {
    throw new KeyMalformedError(
      rest.startsWith(',')
        ? 'The Idempotency-Key must be a single key, not a list.'
        : 'The Idempotency-Key has characters after its closing quote (parameters are not accepted).',
    );
  }
  return out;
}

function matchesWhole(pattern: RegExp, key: string): boolean {
  const copy = new RegExp(pattern.source, pattern.flags.replace(/[gy]/g, ''));
  const m = copy.exec(key);
  return m !== null && m.index === 0 && m[0].length === key.length;
}
