/**
 * The stored form of an HTTP outcome. Records outlive deployments, so the
 * exact bytes are pinned, and every body must come back byte for byte:
 * text, bytes that are not UTF-8, a byte-order mark, a view into a larger
 * buffer.
 */
import { describe, expect, it } from 'vitest';
import { decodeOutcome, encodeOutcome, type HttpOutcome } from './outcome.js';

const bytes = (body: Uint8Array | string): number[] => [...(typeof body === 'string' ? Buffer.from(body, 'utf8') : body)];

function roundTrip(body: Uint8Array | string): Uint8Array | string {
  const decoded = decodeOutcome(encodeOutcome({ kind: 'response', response: { status: 200, headers: [], body } }));
  if (decoded.kind !== 'response') throw new Error('expected a response');
  return decoded.response.body;
}

describe('encodeOutcome', () => {
  it('writes one line of metadata, a newline, then the body', () => {
    expect(encodeOutcome({ kind: 'processed', status: 201 })).toBe('{"k":"p","s":201}\n');
    expect(encodeOutcome({ kind: 'marker', status: 202, location: '/jobs/1' })).toBe('{"k":"m","s":202,"l":"/jobs/1"}\n');
    expect(encodeOutcome({ kind: 'marker', status: 200, location: undefined })).toBe('{"k":"m","s":200}\n');
    expect(
      encodeOutcome({ kind: 'response', response: { status: 201, headers: [['content-type', 'application/json']], body: '{"id":1}\n2' } }),
    ).toBe('{"k":"r","s":201,"h":[["content-type","application/json"]],"e":"u"}\n{"id":1}\n2');
  });

  it('keeps UTF-8 bytes as text and other bytes as base64', () => {
    const utf8 = encodeOutcome({ kind: 'response', response: { status: 200, headers: [], body: new TextEncoder().encode('é€😀') } });
    expect(utf8).toBe('{"k":"r","s":200,"h":[],"e":"u"}\né€😀');
    const binary = encodeOutcome({ kind: 'response', response: { status: 200, headers: [], body: new Uint8Array([0xff, 0xfe, 0x41]) } });
    expect(binary).toBe(`{"k":"r","s":200,"h":[],"e":"b"}\n${Buffer.from([0xff, 0xfe, 0x41]).toString('base64')}`);
  });

  it('encodes only the bytes of a view, not the buffer around it', () => {
    const buffer = new Uint8Array([0x41, 0xff, 0x42, 0x43, 0xff]);
    const view = buffer.subarray(1, 4); // ff 42 43: not UTF-8
    expect(encodeOutcome({ kind: 'response', response: { status: 200, headers: [], body: view } })).toBe(
      `{"k":"r","s":200,"h":[],"e":"b"}\n${Buffer.from([0xff, 0x42, 0x43]).toString('base64')}`,
    );
    expect(bytes(roundTrip(view))).toEqual([0xff, 0x42, 0x43]);
    expect(roundTrip(buffer.subarray(2, 4))).toBe('BC');
  });
});

describe('decodeOutcome', () => {
  it('reads back each kind', () => {
    const outcomes: HttpOutcome[] = [
      { kind: 'processed', status: 201 },
      { kind: 'marker', status: 202, location: '/jobs/1' },
      { kind: 'marker', status: 200, location: undefined },
      { kind: 'response', response: { status: 409, headers: [['etag', '"v1"']], body: 'a\nb' } },
    ];
    for (const outcome of outcomes) expect(decodeOutcome(encodeOutcome(outcome))).toEqual(outcome);
  });

  it('gives bytes that are not UTF-8 back exactly', () => {
    for (const body of [new Uint8Array([0xff]), new Uint8Array([0x00, 0xc3]), new Uint8Array([0xed, 0xa0, 0x80]), new Uint8Array([0x41, 0x80, 0x42])]) {
      const back = roundTrip(body);
      expect(back).toBeInstanceOf(Uint8Array);
      expect(bytes(back)).toEqual(bytes(body));
    }
  });

  it('keeps a byte-order mark', () => {
    const withBom = new Uint8Array([0xef, 0xbb, 0xbf, 0x41]);
    expect(bytes(roundTrip(withBom))).toEqual([0xef, 0xbb, 0xbf, 0x41]);
  });

  it('reads a record of metadata alone (no newline): a response without headers or body', () => {
    expect(decodeOutcome('{"k":"r","s":204}')).toEqual({ kind: 'response', response: { status: 204, headers: [], body: '' } });
    expect(decodeOutcome('{"k":"p","s":201}')).toEqual({ kind: 'processed', status: 201 });
    expect(decodeOutcome('{"k":"r","s":200,"e":"u"}\n')).toEqual({ kind: 'response', response: { status: 200, headers: [], body: '' } });
  });

  it('a text body that looks like base64 stays text', () => {
    expect(roundTrip('QUJD')).toBe('QUJD');
  });

  it('parses only the first line as metadata: a body of JSON lines is kept whole', () => {
    const body = '{"k":"p","s":1}\n{"k":"m","s":2}';
    expect(roundTrip(body)).toBe(body);
  });
});
