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
  const { users } = db.tables;
  const get = `SELECT id, name, email, updated FROM ${users} WHERE account = ? AND id = ?`;
  // UPDATE counts matched rows in every dialect (mysql2 connects with FOUND_ROWS).
  const update = `UPDATE ${users} SET name = ?, email = ?, updated = ? WHERE account = ? AND id = ?`;
  const insert = `INSERT INTO ${users} (account, id, name, email, updated) VALUES (?, ?, ?, ?, ?)`;
  const remove = `DELETE FROM ${users} WHERE account = ? AND id = ?`;

  /**
   * Replace, or create: answers whether the user existed. Single statements,
   * no transaction: a PUT that loses a race to create answers as a replace
   * (last write wins, as for any two PUTs).
   */
  const put = async (account: string, user: User): Promise<boolean> => {
    const replace = [user.name, user.email, user.updated, account, user.id];
    if ((await db.run(update, replace)) > 0) return true;
    try {
      await db.run(insert, [account, user.id, user.name, user.email, user.updated]);
      return false;
    } catch (error) {
      if (!db.isUniqueViolation(error)) throw error;
      await db.run(update, replace);
      return true;
    }
  };

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
      const replaced = await put(request.account, user);
      if (replaced) return reply.code(200).send(user);
      return reply.code(201).header('location', `/users/${user.id}`).send(user);
    },
  );

  app.get<{ Params: { id: string } }>('/users/:id', { schema: { params: userParams } }, async (request) => {
    const user = await db.get<User>(get, [request.account, request.params.id]);
    if (!user) throw new ProblemError(problem('not-found', `This account has no user ${request.params.id}.`));
    return user;
  });

  app.delete<{ Params: { id: string } }>('/users/:id', { schema: { params: userParams } }, async (request, reply) => {
    const changes = await db.run(remove, [request.account, request.params.id]);
    if (changes === 0) throw new ProblemError(problem('not-found', `This account has no user ${request.params.id}.`));
    return reply.code(204).send();
  });
}
