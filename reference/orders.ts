/**
 * Orders: `POST /orders` (idempotent through oncely) pays through
 * `POST /payments` over real HTTP with `oncely/client`, under the key
 * `deriveKey(orderKey, 'payment')`. A re-executed order (a retry after a
 * crash between paying and answering) sends the same derived key, gets the
 * first payment replayed, and never charges twice. `GET /orders`,
 * `GET /orders/:id` to read them back.
 *
 * @module
 */
import type { FastifyInstance } from 'fastify';
import { FingerprintMismatchError } from 'oncely';
import { ClientRequestError, createClient, deriveKey } from 'oncely/client';
import type { RouteContext } from './app.js';
import { newId, pause } from './db.js';
import type { Payment } from './payments.js';
import { problem, ProblemError } from './problem.js';

/** One line of an order. */
export interface OrderItem {
  sku: string;
  quantity: number;
  /** Unit price, minor units. */
  price: number;
}

/** An order as the API answers it. */
export interface Order {
  id: string;
  status: 'paid';
  currency: string;
  items: OrderItem[];
  /** Sum of quantity × price, minor units. */
  total: number;
  /** The id of the payment that paid it. */
  payment: string;
  created: string;
}

interface OrderBody {
  currency: string;
  items: OrderItem[];
}

interface OrderRow {
  id: string;
  status: 'paid';
  currency: string;
  items: string;
  total: number;
  payment: string;
  created: string;
}

const orderBodySchema = {
  type: 'object',
  required: ['currency', 'items'],
  additionalProperties: false,
  properties: {
    currency: { type: 'string', pattern: '^[A-Z]{3}$' },
    items: {
      type: 'array',
      minItems: 1,
      maxItems: 100,
      items: {
        type: 'object',
        required: ['sku', 'quantity', 'price'],
        additionalProperties: false,
        properties: {
          sku: { type: 'string', minLength: 1, maxLength: 64 },
          quantity: { type: 'integer', minimum: 1, maximum: 1_000_000 },
          price: { type: 'integer', minimum: 1, maximum: Number.MAX_SAFE_INTEGER },
        },
      },
    },
  },
} as const;

const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', minLength: 1, maxLength: 64 } },
} as const;

/** The items as stored: fixed key order, so that equal orders compare equal. */
function itemsText(items: OrderItem[]): string {
  return JSON.stringify(items.map(({ sku, quantity, price }) => ({ sku, quantity, price })));
}

/** An earlier run's order for this record id must be the same order (see payments). */
function sameOperation(existing: OrderRow | undefined, body: OrderBody): OrderRow | undefined {
  if (existing === undefined) return undefined;
  if (existing.currency !== body.currency || existing.items !== itemsText(body.items)) {
    throw new FingerprintMismatchError(
      `This Idempotency-Key already placed order ${existing.id}, for a different request; use a new key.`,
    );
  }
  return existing;
}

function view(row: OrderRow): Order {
  return { ...row, items: JSON.parse(row.items) as OrderItem[] };
}

/** Register the order routes. */
export async function orderRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { db } = ctx;
  const columns = 'id, status, currency, items, total, payment, created';
  const byIdempotency = db.prepare(`SELECT ${columns} FROM orders WHERE account = ? AND idempotency_id = ?`);
  const byId = db.prepare(`SELECT ${columns} FROM orders WHERE account = ? AND id = ?`);
  const list = db.prepare(`SELECT ${columns} FROM orders WHERE account = ? ORDER BY seq`);
  const insert = db.prepare(
    `INSERT INTO orders (id, account, idempotency_id, currency, items, total, payment, status, created)
     VALUES (?, ?, ?, ?, ?, ?, ?, 'paid', ?)`,
  );
  const record = db.transaction((account: string, idempotencyId: string | null, row: OrderRow): OrderRow => {
    if (idempotencyId !== null) {
      const existing = byIdempotency.get(account, idempotencyId) as OrderRow | undefined;
      if (existing) return existing; // checked against the request before paying
    }
    insert.run(row.id, account, idempotencyId, row.currency, row.items, row.total, row.payment, row.created);
    return row;
  });

  // Retries of the payment call are safe: every attempt carries the same key.
  const client = createClient({ retries: 6, maxDelayMs: 2_000, attemptTimeoutMs: 10_000 + ctx.paymentDelayMs * 2 });

  app.post<{ Body: OrderBody }>('/orders', { schema: { body: orderBodySchema } }, async (request, reply) => {
    const account = request.account;
    const run = request.idempotency;
    const idempotencyId = run?.id ?? null;
    if (idempotencyId !== null) {
      const existing = sameOperation(byIdempotency.get(account, idempotencyId) as OrderRow | undefined, request.body);
      if (existing) return reply.code(201).header('location', `/orders/${existing.id}`).send(view(existing));
    }
    const { currency, items } = request.body;
    let total = 0;
    for (const item of items) total += item.quantity * item.price;
    if (!Number.isSafeInteger(total)) {
      throw new ProblemError(problem('validation', 'The order total is too large to charge.'));
    }

    // The payment body depends only on the order request, so a re-executed
    // order sends the same request under the same derived key: a replay.
    const paymentBody = JSON.stringify({ amount: total, currency, description: `order of ${items.length} item(s)` });
    let response: Response;
    try {
      response = await client.fetch(
        `${ctx.baseUrl()}/payments`,
        {
          method: 'POST',
          headers: { authorization: `Bearer ${account}`, 'content-type': 'application/json' },
          body: paymentBody,
          ...(run ? { signal: run.signal } : {}),
        },
        // Without oncely (IDEMPOTENCY=off) the client makes its own key for this one call.
        run ? { key: deriveKey(run.key, 'payment') } : {},
      );
    } catch (error) {
      if (run?.signal.aborted) throw run.signal.reason;
      if (!(error instanceof ClientRequestError)) throw error;
      // Unknown whether the payment happened: a retry of the order finds out safely.
      throw new ProblemError(
        problem('payment-pending', `The payment service did not answer (${error.reason}); retry the order with the same key.`),
        { 'retry-after': '1' },
      );
    }
    if (response.status !== 201) {
      const upstream = await response.text();
      if (response.status === 409 || response.status === 503) {
        throw new ProblemError(
          problem('payment-pending', `The payment is still in progress (${response.status}); retry the order with the same key.`),
          { 'retry-after': response.headers.get('retry-after') ?? '1' },
        );
      }
      throw new ProblemError(
        problem('payment-failed', `The payment service answered ${response.status}.`, {
          paymentStatus: response.status,
          paymentProblem: safeJson(upstream),
        }),
      );
    }
    const payment = (await response.json()) as Payment;

    // A window between paying and recording the order (ORDER_DELAY_MS), to crash in.
    await pause(ctx.orderDelayMs);
    const row = record.immediate(account, idempotencyId, {
      id: newId('ord'),
      status: 'paid',
      currency,
      items: itemsText(items),
      total,
      payment: payment.id,
      created: new Date().toISOString(),
    });
    return reply.code(201).header('location', `/orders/${row.id}`).send(view(row));
  });

  app.get('/orders', async (request) => ({ data: (list.all(request.account) as OrderRow[]).map(view) }));

  app.get<{ Params: { id: string } }>('/orders/:id', { schema: { params: idParams } }, async (request) => {
    const row = byId.get(request.account, request.params.id) as OrderRow | undefined;
    if (!row) throw new ProblemError(problem('not-found', `This account has no order ${request.params.id}.`));
    return view(row);
  });
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text.slice(0, 500);
  }
}
