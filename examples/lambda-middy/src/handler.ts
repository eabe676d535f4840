// A tiny payments API as one Lambda function behind an API Gateway HTTP API
// (payload 2.0) with a Lambda authorizer, made idempotent by oncely's Middy
// middleware. This is what you deploy; src/local.ts runs it without AWS.
import { randomBytes } from 'node:crypto';
import middy from '@middy/core';
import type { APIGatewayProxyEventV2WithLambdaAuthorizer, APIGatewayProxyStructuredResultV2 } from 'aws-lambda';
import { idempotency } from 'oncely/lambda';
import { memoryStore } from 'oncely/stores/memory';

/** What the Lambda authorizer in front of the API puts in `requestContext.authorizer.lambda`. */
export interface Caller {
  account: string;
}

export type PaymentsEvent = APIGatewayProxyEventV2WithLambdaAuthorizer<Caller>;
type Result = APIGatewayProxyStructuredResultV2;

interface Payment {
  id: string;
  account: string;
  amount: number;
  currency: string;
}

const payments = new Map<string, Payment>();
// One execution environment only. Lambda runs many side by side: deploy with
// a store they all share (oncely/stores/redis or oncely/stores/postgres).
const store = memoryStore();

function json(statusCode: number, body: unknown, headers: Record<string, string> = {}): Result {
  return { statusCode, headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) };
}

async function route(event: PaymentsEvent): Promise<Result> {
  const account = event.requestContext.authorizer.lambda.account;
  const { method } = event.requestContext.http;
  if (method === 'POST' && event.rawPath === '/payments') {
    const text = event.isBase64Encoded ? Buffer.from(event.body ?? '', 'base64').toString('utf8') : (event.body ?? '');
    let input: { amount?: unknown; currency?: unknown };
    try {
      input = JSON.parse(text) as typeof input;
    } catch {
      return json(400, { title: 'the body must be JSON' });
    }
    const { amount, currency } = input ?? {};
    if (!Number.isInteger(amount) || (amount as number) <= 0 || typeof currency !== 'string' || !/^[A-Z]{3}$/.test(currency)) {
      return json(400, { title: 'amount (a positive integer) and currency (ISO 4217) are required' });
    }
    await new Promise((resolve) => setTimeout(resolve, 20)); // the payment provider
    const payment: Payment = { id: `pay_${randomBytes(8).toString('hex')}`, account, amount: amount as number, currency };
    payments.set(payment.id, payment);
    return json(201, payment, { location: `/payments/${payment.id}` });
  }
  const match = /^\/payments\/(\w+)$/.exec(event.rawPath);
  if (method === 'GET' && match) {
    const payment = payments.get(match[1]!);
    return payment === undefined || payment.account !== account ? json(404, { title: 'no such payment' }) : json(200, payment);
  }
  return json(404, { title: 'no such route' });
}

// `.use()` oncely last: its `before` runs right before the handler, its
// `after` sees the handler's own answer. The scope is the caller's account,
// from the authorizer, never from a header the client chooses.
export const handler = middy<PaymentsEvent, Result>()
  .use(idempotency<PaymentsEvent>({ store, scope: (event) => event.requestContext.authorizer.lambda.account }))
  .handler(route);
