/**
 * Trades: `POST /execute-trade` (idempotent through oncely), and
 * `GET /trades`, `GET /trades/:id` to inspect them. Like payments, the
 * trade row keeps the idempotency record id, UNIQUE per account, so a
 * re-executed request never trades twice.
 *
 * @module
 */
import type { FastifyInstance } from 'fastify';
import { FingerprintMismatchError } from 'oncely';
import type { RouteContext } from './app.js';
import { newId } from './db.js';
import { problem, ProblemError } from './problem.js';

/** A trade as the API answers it. */
export interface Trade {
  id: string;
  symbol: string;
  side: 'buy' | 'sell';
  quantity: number;
  price: number;
  status: 'executed';
  created: string;
}

interface TradeBody {
  symbol: string;
  side: 'buy' | 'sell';
  quantity: number;
  price: number;
}

const tradeBodySchema = {
  type: 'object',
  required: ['symbol', 'side', 'quantity', 'price'],
  additionalProperties: false,
  properties: {
    symbol: { type: 'string', pattern: '^[A-Z0-9][A-Z0-9.\\-]{0,15}$' },
    side: { type: 'string', enum: ['buy', 'sell'] },
    quantity: { type: 'integer', minimum: 1, maximum: Number.MAX_SAFE_INTEGER },
    price: { type: 'number', exclusiveMinimum: 0, maximum: 1e15 },
  },
} as const;

const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', minLength: 1, maxLength: 64 } },
} as const;

/** Register the trade routes. */
export async function tradeRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { db } = ctx;
  const columns = 'id, symbol, side, quantity, price, status, created';
  const byIdempotency = db.prepare(`SELECT ${columns} FROM trades WHERE account = ? AND idempotency_id = ?`);
  const byId = db.prepare(`SELECT ${columns} FROM trades WHERE account = ? AND id = ?`);
  const list = db.prepare(`SELECT ${columns} FROM trades WHERE account = ? ORDER BY seq`);
  const insert = db.prepare(
    `INSERT INTO trades (id, account, idempotency_id, symbol, side, quantity, price, status, created)
     VALUES (?, ?, ?, ?, ?, ?, ?, 'executed', ?)`,
  );

  const execute = db.transaction((account: string, idempotencyId: string | null, body: TradeBody): Trade => {
    if (idempotencyId !== null) {
      const existing = byIdempotency.get(account, idempotencyId) as Trade | undefined;
      if (existing) {
        // After the record's retention the key may run again: only for the same trade.
        const same =
          existing.symbol === body.symbol &&
          existing.side === body.side &&
          existing.quantity === body.quantity &&
          existing.price === body.price;
        if (!same) {
          throw new FingerprintMismatchError(
            `This Idempotency-Key already executed trade ${existing.id}, for a different request; use a new key.`,
          );
        }
        return existing;
      }
    }
    const trade: Trade = {
      id: newId('trd'),
      symbol: body.symbol,
      side: body.side,
      quantity: body.quantity,
      price: body.price,
      status: 'executed',
      created: new Date().toISOString(),
    };
    insert.run(trade.id, account, idempotencyId, trade.symbol, trade.side, trade.quantity, trade.price, trade.created);
    return trade;
  });

  app.post<{ Body: TradeBody }>('/execute-trade', { schema: { body: tradeBodySchema } }, async (request, reply) => {
    const run = request.idempotency;
    if (run?.signal.aborted) throw run.signal.reason;
    const trade = execute.immediate(request.account, run?.id ?? null, request.body);
    return reply.code(201).header('location', `/trades/${trade.id}`).send(trade);
  });

  app.get('/trades', async (request) => ({ data: list.all(request.account) as Trade[] }));

  app.get<{ Params: { id: string } }>('/trades/:id', { schema: { params: idParams } }, async (request) => {
    const trade = byId.get(request.account, request.params.id) as Trade | undefined;
    if (!trade) throw new ProblemError(problem('not-found', `This account has no trade ${request.params.id}.`));
    return trade;
  });
}
