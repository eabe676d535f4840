import Fastify from 'fastify';
import { describe, expect, it } from 'vitest';
import { memoryStore } from '../stores/memory.js';
import { oncely } from './index.js';

// Users test their Fastify apps with inject(), whose requests are doubles of
// Node's IncomingMessage: oncely must work there exactly as on a socket.
describe('oncely/fastify under inject()', () => {
  it('runs once, replays, and refuses a comma list of keys', async () => {
    const app = Fastify();
    await app.register(oncely, { store: memoryStore(), scope: false });
    let runs = 0;
    app.post('/payments', async (_req, reply) => reply.code(201).send({ id: `pay_${++runs}` }));
    const send = (key: string) =>
      app.inject({ method: 'POST', url: '/payments', payload: { amount: 1 }, headers: { 'idempotency-key': key } });
    const first = await send('k1');
    const second = await send('k1');
    expect(first.statusCode).toBe(201);
    expect(second.statusCode).toBe(201);
    expect(second.headers['idempotent-replayed']).toBe('true');
    expect(second.body).toBe(first.body);
    expect(runs).toBe(1);
    const list = await send('a, b');
    expect(list.statusCode).toBe(400);
    expect(list.json().type).toBe('https://oncely.dev/problems/key-malformed');
    await app.close();
  });
});
