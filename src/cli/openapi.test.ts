/**
 * `oncely verify --openapi` against the reference system's own OpenAPI
 * document (GET /openapi.json, made from its route schemas), started
 * in-process with two extra routes: one deliberately unprotected
 * (`config: { idempotency: false }`), one that refuses everything for
 * another reason (404). The report must show the first as NOT PROTECTED,
 * the second as UNVERIFIED, and every real POST as protected. Then a
 * document from a file, a YAML document from another origin, and the
 * sampling of bodies and parameters on their own.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { dereference } from '@readme/openapi-parser';
import type { FastifyInstance } from 'fastify';
import { sample } from 'openapi-sampler';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type RunningReference, startReference } from '../../reference/app.js';
import { type BrokenServer, startBrokenServer } from '../../test/support/broken-server.js';
import { type Io, run } from './main.js';
import { type OpenApiReport, planOperations, type SampleFn, verifyOpenApi } from './openapi.js';

const AUTH: [string, string] = ['authorization', `Bearer acct_openapi_${Math.random().toString(36).slice(2, 8)}`];
const sampler = sample as unknown as SampleFn;

function capture(): Io & { text: () => string } {
  const lines: string[] = [];
  return { out: (t) => lines.push(t), err: (t) => lines.push(t), text: () => lines.join('\n') };
}

const dirs: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'oncely-openapi-'));
  dirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** Two routes the reference does not have: an unprotected transfer, and one that is always 404. */
function extraRoutes(app: FastifyInstance): void {
  let made = 0;
  app.post(
    '/transfers',
    {
      config: { idempotency: false }, // the mistake verify must find
      schema: {
        body: {
          type: 'object',
          required: ['amount', 'to'],
          additionalProperties: false,
          properties: { amount: { type: 'integer', minimum: 1 }, to: { type: 'string', minLength: 1, maxLength: 64 } },
        },
      },
    },
    async (_request, reply) => reply.code(201).send({ id: `trf_${++made}` }),
  );
  app.post(
    '/archived/:id/restore',
    { schema: { params: { type: 'object', properties: { id: { type: 'string', minLength: 1 } } } } },
    async (_request, reply) => reply.code(404).type('application/problem+json').send({ type: 'about:blank', title: 'Not found' }),
  );
}

function verdicts(report: OpenApiReport): Record<string, string> {
  return Object.fromEntries(report.operations.map((o) => [`${o.method} ${o.path}`, o.verdict]));
}

describe('verify --openapi against the reference system', () => {
  let ref: RunningReference;
  let documentUrl: string;
  beforeAll(async () => {
    ref = await startReference({ storeUrl: 'memory:', dataDir: tempDir(), port: 0, extraRoutes });
    documentUrl = `${ref.url}/openapi.json`;
  });
  afterAll(() => ref?.close());

  it('serves its OpenAPI document, made from the route schemas', async () => {
    const res = await fetch(documentUrl, { headers: { authorization: AUTH[1] } });
    expect(res.status).toBe(200);
    const doc = (await res.json()) as {
      openapi: string;
      servers: Array<{ url: string }>;
      paths: Record<string, Record<string, { operationId: string; requestBody?: { content: Record<string, { schema: unknown }> }; parameters?: Array<{ name: string; in: string }> }>>;
    };
    expect(doc.openapi).toBe('3.1.0');
    expect(doc.servers).toEqual([{ url: '/' }]);
    expect(Object.keys(doc.paths)).toEqual(expect.arrayContaining(['/payments', '/payments/{id}', '/orders', '/execute-trade', '/users/{id}', '/transfers']));
    expect(doc.paths['/payments']!.post!.requestBody!.content['application/json']!.schema).toMatchObject({
      required: ['amount', 'currency'],
      properties: { currency: { pattern: '^[A-Z]{3}$' } },
    });
    expect(doc.paths['/users/{id}']!.put!.parameters).toEqual([expect.objectContaining({ name: 'id', in: 'path', required: true })]);
    expect(doc.paths['/openapi.json']).toBeUndefined();
    // A valid document for the parser too.
    await expect(dereference(doc as never)).resolves.toBeTruthy();
  });

  it('every POST of the reference is protected; the extra transfer route is not; the 404 route is unverified', async () => {
    const report = await verifyOpenApi({ document: documentUrl, headers: [AUTH], concurrency: 5 });
    expect(report.baseUrl).toBe(ref.url);
    expect(report.title).toBe('oncely reference system');
    expect(verdicts(report)).toEqual({
      'POST /payments': 'protected',
      'POST /orders': 'protected',
      'POST /execute-trade': 'protected',
      'POST /transfers': 'unprotected',
      'POST /archived/{id}/restore': 'unverified',
    });
    expect(report.passed).toBe(false);
    const transfers = report.operations.find((o) => o.path === '/transfers')!;
    expect(transfers.reasons).toContain('missing-key: expected 4xx, got 201');
    expect(transfers.reasons.some((r) => /^concurrency: \d+ resources from one key$/.test(r))).toBe(true);
    const archived = report.operations.find((o) => o.path === '/archived/{id}/restore')!;
    // oncely refuses the keyless request (400) before the handler, but every keyed one is the handler's 404.
    expect(archived.reasons).toContain('replay: the first request was answered 404, not a success (check --body and --header)');
    expect(archived.reasons.some((r) => r.startsWith('missing-key'))).toBe(false);
    expect(archived.body).toBeNull(); // no request body: none sent
    expect(archived.reasons).toContain('reuse: not run (no request body to vary)');
    // Sampled bodies fit the schemas: the server accepted them (201s), and each operation's body differs.
    const payments = report.operations.find((o) => o.path === '/payments')!;
    expect(JSON.parse(payments.body!)).toEqual({ amount: expect.any(Number), currency: expect.stringMatching(/^[A-Z]{3}$/) });
    expect(payments.report!.checks.find((c) => c.name === 'reuse')!.status).toBe('pass');
  });

  it('through the CLI: a table of operations, exit 1; --exclude the two bad ones: exit 0; --json', async () => {
    const io = capture();
    const code = await run(['verify', '--openapi', documentUrl, '-H', `Authorization: ${AUTH[1]}`, '-c', '4'], io);
    expect(code, io.text()).toBe(1);
    const text = io.text();
    expect(text).toMatch(/^oncely verify --openapi http:\/\/127\.0\.0\.1:\d+\/openapi\.json \(oncely reference system\)/);
    expect(text).toMatch(/POST \/transfers\s+NOT PROTECTED\s+\d\/6\s+missing-key: expected 4xx, got 201/);
    expect(text).toMatch(/POST \/archived\/\{id\}\/restore\s+UNVERIFIED/);
    for (const path of ['/payments', '/orders', '/execute-trade']) expect(text).toMatch(new RegExp(`POST ${path}\\s+protected\\s+6/6`));
    expect(text).toMatch(/FAILED: 1 not protected, 1 unverified, 3 protected/);

    const ok = capture();
    const okCode = await run(
      ['verify', '--openapi', documentUrl, '-H', `Authorization: ${AUTH[1]}`, '-c', '3', '--exclude', 'POST /transfers', '--exclude', 'postArchivedByIdRestore', '--json'],
      ok,
    );
    expect(okCode, ok.text()).toBe(0);
    const report = JSON.parse(ok.text()) as OpenApiReport;
    expect(report.passed).toBe(true);
    expect(report.excluded).toEqual(['POST /transfers', 'POST /archived/{id}/restore']);
    expect(report.operations.map((o) => o.verdict)).toEqual(['protected', 'protected', 'protected']);
  });

  it('a document from a file: its relative server needs the base URL', async () => {
    const res = await fetch(documentUrl, { headers: { authorization: AUTH[1] } });
    const file = join(tempDir(), 'openapi.json');
    writeFileSync(file, await res.text());
    const without = capture();
    expect(await run(['verify', '--openapi', file, '-H', `Authorization: ${AUTH[1]}`], without)).toBe(1);
    expect(without.text()).toMatch(/pass the server's base URL/);
    const report = await verifyOpenApi({ document: file, baseUrl: ref.url, headers: [AUTH], concurrency: 3, exclude: ['POST /transfers', 'POST /archived/{id}/restore', 'POST /orders'] });
    expect(verdicts(report)).toEqual({ 'POST /payments': 'protected', 'POST /execute-trade': 'protected' });
  });
});

describe('verify --openapi: a YAML document on another origin, a non-idempotent server', () => {
  let broken: BrokenServer;
  let docs: Server;
  let docsUrl: string;
  const seen: IncomingHttpHeaders[] = [];
  beforeAll(async () => {
    broken = await startBrokenServer({ delayMs: 5 });
    const yaml = [
      'openapi: 3.0.3',
      'info: { title: broken, version: "1" }',
      'paths:',
      '  /payments:',
      '    post:',
      '      operationId: createPayment',
      '      requestBody:',
      '        content:',
      '          application/json:',
      '            schema: { $ref: "#/components/schemas/Payment" }',
      '  /payments/{id}:',
      '    patch:',
      '      parameters:',
      '        - { name: id, in: path, required: true, schema: { type: string }, example: pay_1 }',
      '        - { name: dry, in: query, required: true, schema: { type: boolean } }',
      '      requestBody:',
      '        content:',
      '          application/x-www-form-urlencoded:',
      '            schema: { type: object }',
      'components:',
      '  schemas:',
      '    Payment:',
      '      type: object',
      '      required: [amount, currency]',
      '      properties:',
      '        amount: { type: integer, minimum: 1 }',
      '        currency: { type: string, enum: [EUR, USD] }',
    ].join('\n');
    docs = createServer((req, res) => {
      seen.push(req.headers);
      res.writeHead(200, { 'content-type': 'application/yaml' });
      res.end(yaml);
    });
    await new Promise<void>((resolve) => docs.listen(0, '127.0.0.1', resolve));
    docsUrl = `http://127.0.0.1:${(docs.address() as AddressInfo).port}/openapi.yaml`;
  });
  afterAll(async () => {
    await broken?.close();
    await new Promise<void>((resolve) => docs?.close(() => resolve()));
  });

  it('resolves $refs, finds the POST unprotected, cannot sample a form body; headers stay with the API', async () => {
    const report = await verifyOpenApi({ document: docsUrl, baseUrl: broken.url, headers: [['authorization', 'Bearer secret']], concurrency: 3 });
    expect(verdicts(report)).toEqual({ 'POST /payments': 'unprotected', 'PATCH /payments/{id}': 'unverified' });
    const post = report.operations[0]!;
    expect(JSON.parse(post.body!)).toEqual({ amount: 2, currency: 'EUR' });
    expect(report.operations[1]!.url).toBe(`${broken.url}/payments/pay_1?dry=true`);
    expect(report.operations[1]!.reasons).toEqual(['its request body is application/x-www-form-urlencoded, not JSON: not sampled']);
    // The document is on another origin than the API: the bearer token was not sent to it.
    expect(seen.at(-1)!.authorization).toBeUndefined();
    expect(broken.created.length).toBeGreaterThan(5);
  });
});

describe('planOperations (no requests)', () => {
  const document = {
    openapi: '3.1.0',
    paths: {
      '/accounts/{account}/notes': {
        parameters: [{ name: 'account', in: 'path', required: true, schema: { type: 'string' }, examples: { a: { value: 'acct 1' } } }],
        post: {
          parameters: [
            { name: 'X-Tenant', in: 'header', required: true, schema: { type: 'string', enum: ['t1'] } },
            { name: 'Idempotency-Key', in: 'header', required: true, schema: { type: 'string' } },
          ],
          requestBody: {
            content: {
              'application/vnd.api+json': {
                schema: {
                  type: 'object',
                  required: ['title', 'kind', 'email', 'count', 'tags', 'code'],
                  properties: {
                    id: { type: 'string', readOnly: true },
                    title: { type: 'string', maxLength: 12 },
                    kind: { type: 'string', enum: ['memo'] },
                    email: { type: 'string', format: 'email' },
                    count: { type: 'integer', minimum: 0, maximum: 5000 },
                    tags: { type: 'array', items: { type: 'string', minLength: 3, maxLength: 5 } },
                    code: { type: 'string', pattern: '^[0-9]{4}$' },
                  },
                },
              },
            },
          },
        },
        get: {},
      },
      '/counters': { patch: { requestBody: { content: { 'application/json': { schema: { type: 'object', required: ['n'], properties: { n: { type: 'integer', minimum: 1, maximum: 1 } } } } } } } },
      '/pings': { post: {} },
    },
  };

  it('fills path parameters from examples, headers from schemas, leaves Idempotency-Key to verify', () => {
    const [notes] = planOperations(document, 'http://api.test', sampler);
    expect(notes).toMatchObject({ method: 'POST', path: '/accounts/{account}/notes', url: 'http://api.test/accounts/acct%201/notes', headers: [['X-Tenant', 't1']] });
  });

  it('varies every free string per operation within its bounds; enums, patterns and read-only fields stay', () => {
    const [notes] = planOperations(document, 'http://api.test', sampler);
    const one = JSON.parse(notes!.body!(1)) as Record<string, unknown>;
    const two = JSON.parse(notes!.body!(2)) as Record<string, unknown>;
    expect(notes!.varies).toBe(true);
    expect(one).not.toHaveProperty('id');
    expect(one.kind).toBe('memo');
    expect(one.code).toBe(two.code);
    expect(one.count).toBe(two.count); // strings vary, so numbers need not
    expect(one.title).not.toBe(two.title);
    expect(one.email).not.toBe(two.email);
    expect(String(one.email)).toMatch(/^oncely-[0-9a-f]{6}-1@example\.com$/);
    for (const body of [one, two]) {
      expect(String(body.title).length).toBeLessThanOrEqual(12);
      for (const tag of body.tags as string[]) expect(tag.length).toBeGreaterThanOrEqual(3);
      for (const tag of body.tags as string[]) expect(tag.length).toBeLessThanOrEqual(5);
    }
    expect(notes!.body!(1)).toBe(notes!.body!(1)); // fixed per operation
  });

  it('a body with nothing that can vary, and an operation without a body', () => {
    const plans = planOperations(document, 'http://api.test', sampler);
    const counters = plans.find((p) => p.path === '/counters')!;
    expect(counters.method).toBe('PATCH');
    expect(counters.varies).toBe(false);
    expect(counters.body!(1)).toBe('{"n":1}');
    const pings = plans.find((p) => p.path === '/pings')!;
    expect(pings.body).toBeNull();
    expect(plans.map((p) => `${p.method} ${p.path}`)).not.toContain('GET /accounts/{account}/notes');
  });

  it('numbers move within their bounds when no string can', () => {
    const doc = {
      openapi: '3.0.3',
      paths: {
        '/a': { post: { requestBody: { content: { 'application/json': { schema: { type: 'object', required: ['q', 'p'], properties: { q: { type: 'integer', minimum: 10, maximum: 12 }, p: { type: 'number', minimum: 0.5, multipleOf: 0.5 } } } } } } } },
        '/b': { post: { requestBody: { content: { 'application/json': { schema: { type: 'object', required: ['q'], properties: { q: { type: 'integer', maximum: 0, exclusiveMaximum: true } } } } } } } },
      },
    };
    const [a, b] = planOperations(doc, 'http://api.test', sampler);
    expect(JSON.parse(a!.body!(3))).toEqual({ q: 10, p: 2 }); // q cannot move 1000 steps within 10..12; p can
    expect(JSON.parse(b!.body!(3)).q).toBeLessThan(0);
    expect(b!.varies).toBe(true);
  });
});

describe('verify --openapi usage', () => {
  it('exit 2 for options that do not apply', async () => {
    const cases = [
      ['verify', '--openapi', 'doc.json', '-X', 'PUT'],
      ['verify', '--openapi', 'doc.json', '-d', '{}'],
      ['verify', '--openapi', 'doc.json', 'http://a.test', 'http://b.test'],
      ['verify', '--openapi', 'doc.json', 'ftp://a.test'],
      ['verify', 'http://a.test/x', '--exclude', 'POST /x'],
    ];
    for (const args of cases) {
      const io = capture();
      expect(await run(args, io), args.join(' ')).toBe(2);
    }
  });

  it('without the parser and sampler installed: exit 1, naming what to install (the real entry)', async () => {
    const dir = tempDir();
    const refused = ['@readme/openapi-parser', 'openapi-sampler'];
    // Node's resolvers refuse both packages, for require (the project lookup) and import alike.
    writeFileSync(
      join(dir, 'no-cjs.cjs'),
      `const Module = require('node:module');
const resolve = Module._resolveFilename;
Module._resolveFilename = function (request, ...rest) {
  if (${JSON.stringify(refused)}.includes(request)) throw Object.assign(new Error('Cannot find module ' + request), { code: 'MODULE_NOT_FOUND' });
  return resolve.call(this, request, ...rest);
};`,
    );
    writeFileSync(
      join(dir, 'no-esm.mjs'),
      `export async function resolve(specifier, context, next) {
  if (${JSON.stringify(refused)}.includes(specifier)) throw Object.assign(new Error('Cannot find package ' + specifier), { code: 'ERR_MODULE_NOT_FOUND' });
  return next(specifier, context);
}`,
    );
    writeFileSync(join(dir, 'register.mjs'), `import { register } from 'node:module';\nregister('./no-esm.mjs', import.meta.url);\n`);
    const root = fileURLToPath(new URL('../..', import.meta.url));
    const args = ['--conditions=source', '--require', join(dir, 'no-cjs.cjs'), '--import', 'tsx', '--import', join(dir, 'register.mjs')];
    const result = await new Promise<{ code: number; stderr: string }>((resolve) => {
      execFile(process.execPath, [...args, 'src/cli/main.ts', 'verify', '--openapi', join(dir, 'openapi.json'), 'http://127.0.0.1:9'], { cwd: root, timeout: 60_000 }, (error, _stdout, stderr) =>
        resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stderr }),
      );
    });
    expect(result.code, result.stderr).toBe(1);
    expect(result.stderr).toContain('verify --openapi needs @readme/openapi-parser@^9 and openapi-sampler@^1.7, which oncely does not install');
    expect(result.stderr).toContain('npm install -D @readme/openapi-parser@^9 openapi-sampler@^1.7');
  });

  it('a document that does not exist: exit 1, saying so', async () => {
    const io = capture();
    expect(await run(['verify', '--openapi', join(tempDir(), 'absent.json'), 'http://127.0.0.1:9'], io)).toBe(1);
    expect(io.text()).toMatch(/cannot read the OpenAPI document/);
  });
});
