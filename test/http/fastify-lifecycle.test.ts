/**
 * Fastify: how a run settles when its answer does not pass onSend whole:
 * hijacked replies (SSE, proxying), stream payloads that fail, handlers that
 * throw or never answer, clients that leave.
 */
import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import Fastify, { type FastifyInstance } from 'fastify';
import { oncely } from 'oncely/fastify';
import { memoryStore } from 'oncely/stores/memory';
import { afterEach, describe, expect, it } from 'vitest';

const LEASE = 300;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const newKey = () => `fl-${Date.now()}-${Math.random().toString(36).slice(2)}`;

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  /** Set when the connection ended before the response did. */
  error?: string;
}

/**
 * POST with a key. `leave` makes the client close its connection: after
 * that many ms, or ('first-chunk') as soon as the first body bytes arrive.
 */
function post(url: string, path: string, key: string, leave?: number | 'first-chunk', headers: Record<string, string> = {}) {
  return new Promise<Answer>((resolve) => {
    const target = new URL(path, url);
    let answer: Answer = { status: 0, headers: {}, body: '' };
    const req = httpRequest(
      {
        host: target.hostname,
        port: target.port,
        path: target.pathname,
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key, ...headers },
      },
      (res) => {
        answer = { status: res.statusCode ?? 0, headers: res.headers, body: '' };
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          answer.body += chunk;
          if (leave === 'first-chunk') req.destroy();
        });
        res.on('end', () => resolve(answer));
        res.on('error', (e) => resolve({ ...answer, error: e.message }));
        res.on('close', () => resolve({ ...answer, error: answer.error ?? 'closed' }));
      },
    );
    req.on('error', (e) => resolve({ ...answer, error: e.message }));
    req.end(JSON.stringify({ amount: 100 }));
    if (typeof leave === 'number') setTimeout(() => req.destroy(), leave);
  });
}

function problemType(answer: Answer): string {
  return (JSON.parse(answer.body) as { type: string }).type.replace('https://oncely.dev/problems/', '');
}

let app: FastifyInstance | undefined;
afterEach(async () => {
  await app?.close();
  app = undefined;
});

async function listen(instance: FastifyInstance): Promise<string> {
  await instance.listen({ port: 0, host: '127.0.0.1' });
  return `http://127.0.0.1:${(instance.server.address() as AddressInfo).port}`;
}

describe('oncely/fastify: hijacked replies', () => {
  async function start() {
    const runs = { sse: 0, located: 0, cut: 0, silent: 0 };
    app = Fastify();
    await app.register(oncely, { store: memoryStore(), scope: false, leaseMs: LEASE });
    // Server-sent events written to the raw response: never passes onSend.
    app.post('/sse', async (_req, reply) => {
      runs.sse++;
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream' });
      for (let i = 0; i < 3; i++) {
        reply.raw.write(`data: ${i}\n\n`);
        await sleep(10);
      }
      reply.raw.end();
    });
    // A proxied 201 whose Location is given to writeHead only.
    app.post('/located', async (_req, reply) => {
      runs.located++;
      reply.hijack();
      reply.raw.writeHead(201, { 'content-type': 'text/plain', location: '/payments/pay_1' });
      reply.raw.end('created');
    });
    // A long stream the client leaves part-way.
    app.post('/cut', async (_req, reply) => {
      runs.cut++;
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream' });
      for (let i = 0; i < 20 && !reply.raw.destroyed; i++) {
        reply.raw.write(`data: ${i}\n\n`);
        await sleep(20);
      }
      reply.raw.end();
    });
    // Hijacks and writes nothing (as a handler that hands the socket on and fails would);
    // with `x-answer` it answers normally instead.
    app.post('/silent', async (req, reply) => {
      runs.silent++;
      if (req.headers['x-answer']) return reply.code(201).send({ id: `pay_${runs.silent}` });
      reply.hijack();
    });
    return { url: await listen(app), runs };
  }

  it('a hijacked 200 sent in full (SSE) is never run again: the retry gets 409 completed-not-replayable', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/sse', key);
    expect(first.status).toBe(200);
    expect(first.body).toBe('data: 0\n\ndata: 1\n\ndata: 2\n\n');
    await sleep(20);
    const retry = await post(url, '/sse', key);
    expect(retry.status).toBe(409);
    expect(problemType(retry)).toBe('completed-not-replayable');
    expect(runs.sse).toBe(1);
  });

  it('a hijacked 201 with a Location given to writeHead: the retry is sent to it with 303', async () => {
    const { url, runs } = await start();
    const key = newKey();
    expect((await post(url, '/located', key)).status).toBe(201);
    await sleep(20);
    const retry = await post(url, '/located', key);
    expect(retry.status).toBe(303);
    expect(retry.headers.location).toBe('/payments/pay_1');
    expect(problemType(retry)).toBe('completed-not-replayable');
    expect(runs.located).toBe(1);
  });

  it('a hijacked stream the client leaves mid-way is never run again (marker), even after the lease', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/cut', key, 'first-chunk');
    expect(first.status).toBe(200);
    await sleep(LEASE + 300);
    const retry = await post(url, '/cut', key);
    expect(retry.status).toBe(409);
    expect(problemType(retry)).toBe('completed-not-replayable');
    expect(runs.cut).toBe(1);
  });

  it('a hijacked reply that wrote nothing before the connection closed is not in flight after the lease', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/silent', key, 100);
    expect(first.error).toBeDefined();
    await sleep(LEASE + 300);
    const retry = await post(url, '/silent', key, undefined, { 'x-answer': '1' });
    expect(retry.status).toBe(201);
    expect(runs.silent).toBe(2);
  });
});

describe('oncely/fastify: stream payloads', () => {
  async function start() {
    const runs = { early: 0, late: 0, response: 0, slow: 0 };
    app = Fastify();
    await app.register(oncely, { store: memoryStore(), scope: false, leaseMs: LEASE });
    // Fails before its first byte on the first run (an upstream that refused), answers on the next.
    app.post('/early', async (_req, reply) => {
      runs.early++;
      if (runs.early > 1) return reply.code(201).send({ id: 'pay_2' });
      const stream = new Readable({
        read() {
          this.destroy(new Error('upstream refused'));
        },
      });
      return reply.code(201).type('text/csv').send(stream);
    });
    // Sends a first chunk, then fails.
    app.post('/late', async (_req, reply) => {
      runs.late++;
      let sent = false;
      const stream = new Readable({
        read() {
          if (sent) setTimeout(() => this.destroy(new Error('upstream dropped')), 20);
          else {
            sent = true;
            this.push('id,amount\n');
          }
        },
      });
      return reply.code(201).type('text/csv').send(stream);
    });
    // Its first byte comes after the client has left.
    app.post('/slow', async (_req, reply) => {
      runs.slow++;
      const stream = new Readable({ read() {} });
      setTimeout(() => stream.push('late'), 300).unref();
      return reply.code(201).type('text/plain').send(stream);
    });
    // A web Response: its status and headers apply after onSend.
    app.post('/response', async (_req, reply) => {
      runs.response++;
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(new TextEncoder().encode('receipt'));
          controller.close();
        },
      });
      return reply.send(new Response(body, { status: 201, headers: { location: '/receipts/r_1' } }));
    });
    return { url: await listen(app), runs };
  }

  it('a stream that fails before its first byte: the client gets 500, nothing was answered, the retry runs again', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/early', key);
    expect(first.status).toBe(500);
    await sleep(20);
    const retry = await post(url, '/early', key);
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBeUndefined();
    expect(runs.early).toBe(2);
  });

  it('a stream that fails after its first byte keeps its marker: the retry gets 409, not a second run', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/late', key);
    expect(first.status).toBe(201);
    expect(first.error).toBeDefined();
    await sleep(LEASE + 100);
    const retry = await post(url, '/late', key);
    expect(retry.status).toBe(409);
    expect(problemType(retry)).toBe('completed-not-replayable');
    expect(runs.late).toBe(1);
  });

  it('a stream the client leaves before its first byte completes with the marker: the handler had finished', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/slow', key, 100);
    expect(first.status).toBe(0);
    await sleep(LEASE + 300);
    const retry = await post(url, '/slow', key);
    expect(retry.status).toBe(409);
    expect(problemType(retry)).toBe('completed-not-replayable');
    expect(runs.slow).toBe(1);
  });

  it('a Response payload keeps its own status and Location in the marker', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/response', key);
    expect(first.status).toBe(201);
    expect(first.body).toBe('receipt');
    await sleep(20);
    const retry = await post(url, '/response', key);
    expect(retry.status).toBe(303);
    expect(retry.headers.location).toBe('/receipts/r_1');
    expect(runs.response).toBe(1);
  });
});

describe('oncely/fastify: failures and clients that leave', () => {
  async function start() {
    const runs = { throws: 0, never: 0, late: 0 };
    app = Fastify();
    await app.register(oncely, { store: memoryStore(), scope: false, leaseMs: LEASE });
    app.post('/throws', async () => {
      runs.throws++;
      throw new Error('card network down');
    });
    // Waits, then answers nothing: Fastify sends nothing for a client that left.
    app.post('/never', async (req, reply) => {
      runs.never++;
      if (req.headers['x-answer']) return reply.code(201).send({ id: 'pay_2' });
      await sleep(150);
      return undefined;
    });
    // Answers after the client left: the answer is still stored.
    app.post('/late', async (_req, reply) => {
      runs.late++;
      await sleep(150);
      return reply.code(201).send({ id: `pay_${runs.late}` });
    });
    return { url: await listen(app), runs };
  }

  it('a handler that throws (500 from the error handler) is released: the retry runs again', async () => {
    const { url, runs } = await start();
    const key = newKey();
    expect((await post(url, '/throws', key)).status).toBe(500);
    expect((await post(url, '/throws', key)).status).toBe(500);
    expect(runs.throws).toBe(2);
  });

  it('a handler that never answers after the client left is not in flight after the lease', async () => {
    const { url, runs } = await start();
    const key = newKey();
    const first = await post(url, '/never', key, 50);
    expect(first.error).toBeDefined();
    await sleep(LEASE + 300);
    const retry = await post(url, '/never', key, undefined, { 'x-answer': '1' });
    expect(retry.status).toBe(201);
    expect(runs.never).toBe(2);
  });

  it('a handler that answers after the client left still stores its answer: the retry gets the replay', async () => {
    const { url, runs } = await start();
    const key = newKey();
    await post(url, '/late', key, 50);
    await sleep(LEASE + 300);
    const retry = await post(url, '/late', key);
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(JSON.parse(retry.body)).toEqual({ id: 'pay_1' });
    expect(runs.late).toBe(1);
  });
});
