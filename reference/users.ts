/**
 * Users: `PUT /users/:id` (create or replace), `GET /users/:id`,
 * `DELETE /users/:id`. PUT and DELETE are idempotent by nature (RFC 9110),
 * so they carry no Idempotency-Key: repeating them leaves the same state.
 * Users belong to the caller's account.
 *
 * @module
 */
import type { FastifyInstance } from 'fastify';
import type { RouteContext } from './app.js';
import { problem, ProblemError } from './problem.js';

/** A user as the API answers it. */
export interface User {
  id: string;
  name: string;
  email: string;
  updated: string;
}

interface UserBody {
  name: string;
  email: string;
}

const userParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$' } },
} as const;

const userBodySchema = {
  type: 'object',
  required: ['name', 'email'],
  additionalProperties: false,
  properties: {
    name: { type: 'string', minLength: 1, maxLength: 200 },
    email: { type: 'string', minLength: 3, maxLength: 320, pattern: '^[^@\\s]+@[^@\\s]+$' },
  },
} as const;

/** Register the user routes. */
export async function userRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { db } = ctx;
  const get = db.prepare('SELECT id, name, email, updated FROM users WHERE account = ? AND id = ?');
  const upsert = db.prepare(
    `INSERT INTO users (account, id, name, email, updated) VALUES (?, ?, ?, ?, ?)
     ON CONFLICT (account, id) DO UPDATE SET name = excluded.name, email = excluded.email, updated = excluded.updated`,
  );
  const remove = db.prepare('DELETE FROM users WHERE account = ? AND id = ?');

  const put = db.transaction((account: string, user: User): boolean => {
    const existed = get.get(account, user.id) !== undefined;
    upsert.run(account, user.id, user.name, user.email, user.updated);
    return existed;
  });

  app.put<{ Params: { id: string }; Body: UserBody }>(
    '/users/:id',
    { schema: { params: userParams, body: userBodySchema } },
    async (request, reply) => {
      const user: User = {
        id: request.params.id,
        name: request.body.name,
        email: request.body.email,
        updated: new Date().toISOString(),
      };
      const replaced = put.immediate(request.account, user);
      if (replaced) return reply.code(200).send(user);
      return reply.code(201).header('location', `/users/${user.id}`).send(user);
    },
  );

  app.get<{ Params: { id: string } }>('/users/:id', { schema: { params: userParams } }, async (request) => {
    const user = get.get(request.account, request.params.id) as User | undefined;
    if (!user) throw new ProblemError(problem('not-found', `This account has no user ${request.params.id}.`));
    return user;
  });

  app.delete<{ Params: { id: string } }>('/users/:id', { schema: { params: userParams } }, async (request, reply) => {
    const { changes } = remove.run(request.account, request.params.id);
    if (changes === 0) throw new ProblemError(problem('not-found', `This account has no user ${request.params.id}.`));
    return reply.code(204).send();
  });
}
