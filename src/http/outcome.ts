/**
 * How an HTTP response is kept in a record: one line of JSON metadata, a
 * newline, then the body as UTF-8 text (or base64 when it is not valid
 * UTF-8). Only the metadata is parsed on replay; the body is copied as is.
 */

/** A response as the front doors capture and replay it. */
export interface HttpResponse {
  status: number;
  /** Header names in lower case, each with its value. */
  headers: Array<[string, string]>;
  body: Uint8Array | string;
}

/** A decoded record outcome. */
export type HttpOutcome =
  /** A full response, replayed byte for byte. */
  | { kind: 'response'; response: HttpResponse }
  /** Completed, but the response was too large or streamed: only its status and location were kept. */
  | { kind: 'marker'; status: number; location: string | undefined }
  /** Database-constraint strategy: only the fact that it was processed. */
  | { kind: 'processed'; status: number };

interface Meta {
  k: 'r' | 'm' | 'p';
  s: number;
  h?: Array<[string, string]>;
  e?: 'u' | 'b';
  l?: string;
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** Serialise an outcome for the store. */
export function encodeOutcome(outcome: HttpOutcome): string {
  switch (outcome.kind) {
    case 'processed':
      return `${JSON.stringify({ k: 'p', s: outcome.status } satisfies Meta)}\n`;
    case 'marker':
      return `${JSON.stringify({ k: 'm', s: outcome.status, l: outcome.location } satisfies Meta)}\n`;
    case 'response': {
      const { status, headers, body } = outcome.response;
      let text: string;
      let encoding: 'u' | 'b' = 'u';
      if (typeof body === 'string') text = body;
      else {
        try {
          text = utf8.decode(body);
        } catch {
          text = Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString('base64');
          encoding = 'b';
        }
      }
      return `${JSON.stringify({ k: 'r', s: status, h: headers, e: encoding } satisfies Meta)}\n${text}`;
    }
  }
}

/** Parse a stored outcome. */
export function decodeOutcome(stored: string): HttpOutcome {
  const newline = stored.indexOf('\n');
  const meta = JSON.parse(newline < 0 ? stored : stored.slice(0, newline)) as Meta;
  if (meta.k === 'p') return { kind: 'processed', status: meta.s };
  if (meta.k === 'm') return { kind: 'marker', status: meta.s, location: meta.l };
  const text = newline < 0 ? '' : stored.slice(newline + 1);
  const body = meta.e === 'b' ? new Uint8Array(Buffer.from(text, 'base64')) : text;
  return { kind: 'response', response: { status: meta.s, headers: meta.h ?? [], body } };
}
