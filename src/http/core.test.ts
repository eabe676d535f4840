/**
 * The HTTP core without a framework: the asynchronous forms of `scope` and
 * `fingerprint` (the front-door tests use synchronous ones), which the core
 * awaits only when they hand back a promise or another thenable.
 */
import { describe, expect, it } from 'vitest';
import { memoryStore } from '../stores/memory.js';
import { type HttpBegin, HttpIdempotency, type HttpIdempotencyOptions, type HttpRequestView } from './core.js';

interface Raw {
  account: string | undefined;
  amount: number;
}

const view = (key: string, raw: Raw): HttpRequestView<Raw> => ({
  raw,
  method: 'POST',
  path: '/payments',
  query: '',
  header: (name) => (name === 'idempotency-key' ? [key] : undefined),
  body: { json: { amount: raw.amount } },
});

// A thenable that is not a Promise (off-type, but what plain JavaScript may
// hand back): `await` accepts it, so must the core.
const thenable = <T>(value: T): Promise<T> => ({
  // biome-ignore lint/suspicious/noThenProperty: the point of the test
  then: (resolve: (v: T) => void, reject: (e: unknown) => void) => Promise.resolve(value).then(resolve, reject),
}) as unknown as Promise<T>;

async function settle(core: HttpIdempotency<Raw>, begun: HttpBegin): Promise<HttpBegin> {
  if (begun.kind === 'run') {
    await core.finish(begun.run, { kind: 'response', response: { status: 201, headers: [], body: 'paid' } });
  }
  return begun;
}

const status = (begun: HttpBegin): number | string => (begun.kind === 'respond' ? begun.response.status : begun.kind);

describe.each([
  ['a promise', <T>(value: T) => Promise.resolve(value)],
  ['another thenable', thenable],
])('HttpIdempotency with scope and fingerprint answering %s', (_, wrap) => {
  const make = (options: Partial<HttpIdempotencyOptions<Raw>> = {}) =>
    new HttpIdempotency<Raw>({ store: memoryStore(), scope: (raw) => wrap(raw.account), ...options });

  it('scopes by the awaited value: one key in two accounts is two operations, replayed per account', async () => {
    const core = make();
    const a = await settle(core, await core.begin(view('k', { account: 'acct_a', amount: 1 })));
    const b = await settle(core, await core.begin(view('k', { account: 'acct_b', amount: 1 })));
    expect([a.kind, b.kind]).toEqual(['run', 'run']);
    if (a.kind === 'run' && b.kind === 'run') expect(a.run.context.id).not.toBe(b.run.context.id);
    expect(status(await core.begin(view('k', { account: 'acct_a', amount: 1 })))).toBe(201);
  });

  it('refuses with 400 when the awaited scope is missing, and claims nothing', async () => {
    const core = make();
    const refused = await core.begin(view('k', { account: undefined, amount: 1 }));
    expect(status(refused)).toBe(400);
    expect(await settle(core, await core.begin(view('k', { account: 'acct_a', amount: 1 })))).toMatchObject({ kind: 'run' });
  });

  it('fingerprints the awaited value of a fingerprint function: another amount is 422, the same one replays', async () => {
    const core = make({ fingerprint: (raw) => wrap({ amount: raw.amount }) });
    await settle(core, await core.begin(view('k', { account: 'acct_a', amount: 1 })));
    expect(status(await core.begin(view('k', { account: 'acct_a', amount: 2 })))).toBe(422);
    expect(status(await core.begin(view('k', { account: 'acct_a', amount: 1 })))).toBe(201);
  });
});
