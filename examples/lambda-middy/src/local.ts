// A local stand-in for API Gateway (HTTP API, payload 2.0) and its Lambda
// authorizer, to run src/handler.ts without AWS:
//   npm run build && npm start
//   npx oncely verify http://127.0.0.1:3000/payments -H 'Authorization: Bearer acct_demo'
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Context } from 'aws-lambda';
import { handler, type PaymentsEvent } from './handler.js';

/** Bodies API Gateway passes as text; others arrive base64-encoded. */
const TEXT = /^(text\/|application\/([\w.+-]*\+)?json\b|application\/x-www-form-urlencoded\b)/i;
const TIMEOUT_MS = 30_000; // the function's timeout (and the HTTP API's)

function contextFor(): Context {
  const deadline = Date.now() + TIMEOUT_MS;
  return {
    callbackWaitsForEmptyEventLoop: true,
    functionName: 'payments',
    functionVersion: '$LATEST',
    invokedFunctionArn: 'arn:aws:lambda:eu-west-1:123456789012:function:payments',
    memoryLimitInMB: '512',
    awsRequestId: randomUUID(),
    logGroupName: '/aws/lambda/payments',
    logStreamName: 'local',
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
    done: () => {},
    fail: () => {},
    succeed: () => {},
  };
}

function eventFor(req: IncomingMessage, raw: Buffer, account: string): PaymentsEvent {
  const url = new URL(req.url ?? '/', 'http://localhost');
  // Payload 2.0: names in lower case, repeated fields joined with commas, cookies apart.
  const headers: Record<string, string> = {};
  const cookies: string[] = [];
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i]!.toLowerCase();
    const value = req.rawHeaders[i + 1]!;
    if (name === 'cookie') cookies.push(...value.split(/;\s*/));
    else headers[name] = headers[name] === undefined ? value : `${headers[name]},${value}`;
  }
  const text = TEXT.test(headers['content-type'] ?? '');
  return {
    version: '2.0',
    routeKey: '$default',
    rawPath: url.pathname,
    rawQueryString: url.search.slice(1),
    ...(cookies.length > 0 ? { cookies } : {}),
    headers,
    requestContext: {
      accountId: '123456789012',
      apiId: 'local',
      authorizer: { lambda: { account } },
      domainName: req.headers.host ?? 'localhost',
      domainPrefix: 'local',
      http: {
        method: req.method ?? 'GET',
        path: url.pathname,
        protocol: `HTTP/${req.httpVersion}`,
        sourceIp: req.socket.remoteAddress ?? '127.0.0.1',
        userAgent: req.headers['user-agent'] ?? '',
      },
      requestId: randomUUID(),
      routeKey: '$default',
      stage: '$default',
      time: new Date().toUTCString(),
      timeEpoch: Date.now(),
    },
    ...(raw.length > 0 ? { body: text ? raw.toString('utf8') : raw.toString('base64') } : {}),
    isBase64Encoded: raw.length > 0 && !text,
  };
}

function send(res: ServerResponse, status: number, headers: Record<string, string | string[]>, body: string | Buffer): void {
  res.writeHead(status, { ...headers, 'content-length': String(Buffer.byteLength(body)) }).end(body);
}

/** The function's result as API Gateway answers it: a structured result, or any other value as 200 JSON. */
function answer(res: ServerResponse, result: unknown): void {
  if (typeof result !== 'object' || result === null || typeof (result as { statusCode?: unknown }).statusCode !== 'number') {
    send(res, 200, { 'content-type': 'application/json' }, JSON.stringify(result) ?? 'null');
    return;
  }
  const { statusCode, headers = {}, body = '', isBase64Encoded, cookies } = result as {
    statusCode: number;
    headers?: Record<string, string | number | boolean>;
    body?: string;
    isBase64Encoded?: boolean;
    cookies?: string[];
  };
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) out[name] = String(value);
  if (cookies !== undefined) out['set-cookie'] = cookies;
  send(res, statusCode, out, isBase64Encoded ? Buffer.from(body, 'base64') : body);
}

const server = createServer((req, res) => {
  const chunks: Buffer[] = [];
  req.on('data', (chunk: Buffer) => chunks.push(chunk));
  req.on('end', () => {
    // The Lambda authorizer: a stand-in for real authentication, the bearer token names the account.
    const account = /^Bearer (\w+)$/.exec(req.headers.authorization ?? '')?.[1];
    if (account === undefined) {
      send(res, 401, { 'content-type': 'application/json' }, '{"message":"Unauthorized"}');
      return;
    }
    handler(eventFor(req, Buffer.concat(chunks), account), contextFor()).then(
      (result) => answer(res, result),
      (error: unknown) => {
        console.error(error);
        send(res, 500, { 'content-type': 'application/json' }, '{"message":"Internal Server Error"}');
      },
    );
  });
});

server.listen(Number(process.env.PORT ?? 3000), process.env.HOST ?? '127.0.0.1', () => {
  const address = server.address();
  if (address !== null && typeof address === 'object') console.log(`listening on http://${address.address}:${address.port}`);
});

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    server.close();
    server.closeIdleConnections();
  });
}
