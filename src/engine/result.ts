/**
 * How the function form and recovery points keep a value in a record: a
 * small JSON envelope, so that `undefined`, a final error and a value JSON
 * cannot hold are told apart from an ordinary result.
 *
 * @module
 */
import { NotReplayableError } from '../errors/index.js';

interface StoredValue {
  /** Result value, JSON. */
  v?: unknown;
  /** The result was `undefined`. */
  u?: 1;
  /** A final error: name, message, code. */
  e?: { name: string; message: string; code?: unknown };
  /** The call completed, but its result could not be stored as JSON: never run again, never replayed. */
  m?: 1;
}

/** The result as stored: JSON, or a marker when JSON cannot hold it (the effect ran; it must never run again). */
export function encodeResult(result: unknown): string {
  if (result === undefined) return JSON.stringify({ u: 1 } satisfies StoredValue);
  try {
    const json = JSON.stringify({ v: result } satisfies StoredValue);
    if (json !== undefined) return json;
  } catch {
    // BigInt, a cycle, a throwing toJSON: fall through to the marker.
  }
  return JSON.stringify({ m: 1 } satisfies StoredValue);
}

/** A final error as stored: its name, message and code. */
export function encodeFinalError(error: unknown): string {
  const e = error as { name?: unknown; message?: unknown; code?: unknown } | null;
  const stored: StoredValue = { e: { name: String(e?.name ?? 'Error'), message: String(e?.message ?? error), code: e?.code } };
  try {
    return JSON.stringify(stored);
  } catch {
    return JSON.stringify({ e: { name: stored.e!.name, message: stored.e!.message } } satisfies StoredValue);
  }
}

/**
 * The stored result again: the value, or the stored final error thrown
 * (marked `replayed` and `final`).
 *
 * @throws {@link NotReplayableError} for a result that could not be stored.
 */
export function decodeResult<R>(outcome: string): R {
  const stored = JSON.parse(outcome) as StoredValue;
  if (stored.m) {
    throw new NotReplayableError(
      200,
      undefined,
      'The call completed, but its result could not be stored as JSON, so it is not repeated and cannot be replayed.',
    );
  }
  if (stored.e) {
    const error = new Error(stored.e.message) as Error & { code?: unknown; replayed: true; final: true };
    error.name = stored.e.name;
    if (stored.e.code !== undefined) error.code = stored.e.code;
    error.replayed = true;
    error.final = true;
    throw error;
  }
  return (stored.u ? undefined : stored.v) as R;
}
