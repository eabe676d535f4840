/**
 * Payments: `POST /payments` (idempotent through oncely), `GET /payments`,
 * `GET /payments/:id`, and `GET /ledger` (what the ledger recorded).
 *
 * The payment row and the ledger's outbox event are written in one
 * transaction:
 * - in transactional mode, the store's (`req.idempotency.transaction()`),
 *   which commits them with the record's completion: a crash at any point
 *   leaves the payment and its record both, or neither, and a retry simply
 *   runs again;
 * - otherwise one of the business database's own. The row stores the
 *   idempotency record id (`request.idempotency.id`), UNIQUE per account:
 *   a handler that runs again after a crash (lease takeover) finds the
 *   payment its predecessor committed and answers with it instead of
 *   charging twice.
 *
 * @module
 */
import type { FastifyInstance, FastifyReply } from 'fastify';
import { FingerprintMismatchError } from 'oncely';
import type { RouteContext } from './app.js';
import { newId, pause, type Sql } from './db.js';
import type { PaymentEvent } from './ledger/index.js';
import { problem, ProblemError } from './problem.js';

/** A payment as the API answers it. */
export interface Payment {
  id: string;
  amount: number;
  currency: string;
  status: 'succeeded';
  created: string;
  customer?: string;
  description?: string;
}

interface PaymentRow {
  id: string;
  /** A string from PostgreSQL's BIGINT. */
  amount: number | string;
  currency: string;
  status: string;
  created: string;
  customer: string | null;
  description: string | null;
}

interface PaymentBody {
  amount: number;
  currency: string;
  customer?: string;
  description?: string;
}

/** Largest amount accepted, minor units (exact in a JSON number). */
export const MAX_AMOUNT = Number.MAX_SAFE_INTEGER;

const paymentBodySchema = {
  type: 'object',
  required: ['amount', 'currency'],
  additionalProperties: false,
  properties: {
    amount: { type: 'integer', minimum: 1, maximum: MAX_AMOUNT },
    currency: { type: 'string', pattern: '^[A-Z]{3}$' },
    customer: { type: 'string', minLength: 1, maxLength: 255 },
    description: { type: 'string', maxLength: 1000 },
  },
} as const;

const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', minLength: 1, maxLength: 64 } },
} as const;

function view(row: PaymentRow): Payment {
  const payment: Payment = {
    id: row.id,
    amount: Number(row.amount),
    currency: row.currency,
    status: 'succeeded',
    created: row.created,
  };
  if (row.customer !== null) payment.customer = row.customer;
  if (row.description !== null) payment.description = row.description;
  return payment;
}

/**
 * The payment an earlier run of this idempotency record made, if any. It
 * must be the same payment: after the record's retention a key may run
 * again, and then a different body under it is refused like a reused key.
 */
function sameOperation(existing: PaymentRow | undefined, body: PaymentBody): PaymentRow | undefined {
  if (existing === undefined) return undefined;
  if (
    Number(existing.amount) !== body.amount ||
    existing.currency !== body.currency ||
    existing.customer !== (body.customer ?? null) ||
    existing.description !== (body.description ?? null)
  ) {
    throw new FingerprintMismatchError(
      `This Idempotency-Key already made payment ${existing.id}, for a different request; use a new key for a new payment.`,
    );
  }
  return existing;
}

function created(reply: FastifyReply, payment: Payment): FastifyReply {
  return reply.code(201).header('location', `/payments/${payment.id}`).send(payment);
}

/** Register the payment routes. */
export async function paymentRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { db, ledger } = ctx;
  const { payments } = db.tables;
  const columns = 'id, amount, currency, status, created, customer, description';
  const byIdempotency = `SELECT ${columns} FROM ${payments} WHERE account = ? AND idempotency_id = ?`;
  const byId = `SELECT ${columns} FROM ${payments} WHERE account = ? AND id = ?`;
  const list = `SELECT ${columns} FROM ${payments} WHERE account = ? ORDER BY seq`;
  const insert = `INSERT INTO ${payments} (id, account, idempotency_id, amount, currency, customer, description, status, created)
     VALUES (?, ?, ?, ?, ?, ?, ?, 'succeeded', ?)`;

  /** Insert the payment and its outbox event through `tx`; answer an existing one for the same record id. */
  const charge = async (tx: Sql, account: string, idempotencyId: string | null, body: PaymentBody): Promise<PaymentRow> => {
    if (idempotencyId !== null) {
      const existing = sameOperation(await tx.get<PaymentRow>(byIdempotency, [account, idempotencyId]), body);
      if (existing) return existing;
    }
    const row: PaymentRow = {
      id: newId('pay'),
      amount: body.amount,
      currency: body.currency,
      status: 'succeeded',
      created: new Date().toISOString(),
      customer: body.customer ?? null,
      description: body.description ?? null,
    };
    await tx.run(insert, [row.id, account, idempotencyId, row.amount, row.currency, row.customer, row.description, row.created]);
    // The ledger's event commits or rolls back with the payment (transactional outbox).
    if (ledger) {
      const event: PaymentEvent = {
        id: `evt_${row.id}`,
        type: 'payment.succeeded',
        account,
        payment: row.id,
        amount: Number(row.amount),
        currency: row.currency,
      };
      await ledger.recordInOutbox(tx, event);
    }
    return row;
  };

  /** Plain mode: our own transaction; a duplicate refused by the unique index answers the row that won. */
  const chargeAlone = async (account: string, idempotencyId: string | null, body: PaymentBody): Promise<PaymentRow> => {
    try {
      return await db.transaction((tx) => charge(tx, account, idempotencyId, body));
    } catch (error) {
      if (idempotencyId === null || !db.isUniqueViolation(error)) throw error;
      const existing = sameOperation(await db.get<PaymentRow>(byIdempotency, [account, idempotencyId]), body);
      if (existing === undefined) throw error;
      return existing;
    }
  };

  app.post<{ Body: PaymentBody }>('/payments', { schema: { body: paymentBodySchema } }, async (request, reply) => {
    const account = request.account;
    const run = request.idempotency;
    const idempotencyId = run?.id ?? null;
    if (idempotencyId !== null) {
      // A re-executed request (after the record's retention, or a takeover in plain mode) answers with the payment already made.
      const existing = sameOperation(await db.get<PaymentRow>(byIdempotency, [account, idempotencyId]), request.body);
      if (existing) return created(reply, view(existing));
    }
    // The slow payment provider (PAYMENT_DELAY_MS); stops when the lease is lost.
    await pause(ctx.paymentDelayMs, run?.signal);
    if (run?.signal.aborted) throw run.signal.reason;
    const row =
      ctx.transactional && run
        ? // Committed by the front door together with the stored answer, after this handler returns.
          await charge(db.over(await run.transaction()), account, idempotencyId, request.body)
        : await chargeAlone(account, idempotencyId, request.body);
    await ctx.crash('payments', 'after-business-write');
    // A window before the answer (PAYMENT_DELAY_AFTER_MS), to crash in: committed in plain mode, not yet in transactional mode.
    await pause(ctx.paymentDelayAfterMs);
    return created(reply, view(row));
  });

  app.get('/payments', async (request) => ({
    data: (await db.all<PaymentRow>(list, [request.account])).map(view),
  }));

  app.get<{ Params: { id: string } }>('/payments/:id', { schema: { params: idParams } }, async (request) => {
    const row = await db.get<PaymentRow>(byId, [request.account, request.params.id]);
    if (!row) throw new ProblemError(problem('not-found', `This account has no payment ${request.params.id}.`));
    return view(row);
  });

  if (ledger) {
    app.get('/ledger', async (request) => ledger.view(request.account));
  }
}
