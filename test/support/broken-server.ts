/**
 * A deliberately non-idempotent HTTP API, for showing what `oncely verify`
 * catches: every POST makes a new resource, whatever its `Idempotency-Key`
 * (the key is read and ignored). `GET /` lists what was made.
 *
 * @example
 * ```ts
 * const broken = await startBrokenServer();
 * await fetch(`${broken.url}/payments`, { method: 'POST', body: '{"amount":1}' }); // 201, res_1
 * console.log(broken.created.length); // 1
 * await broken.close();
 * ```
 * @module
 */

import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';

/** A running broken server. */
export interface BrokenServer {
  /** Base URL, `http://127.0.0.1:<port>`. */
  url: string;
  /** Every resource made, in order. */
  created: Array<{ id: string; body: unknown }>;
  close(): Promise<void>;
}

/** Starts the broken server on 127.0.0.1 (a free port); `delayMs` holds each POST, so duplicates overlap. */
export async function startBrokenServer(options: { delayMs?: number } = {}): Promise<BrokenServer> {
  const created: BrokenServer['created'] = [];
  const delayMs = options.delayMs ?? 20;
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      if (req.method === 'GET') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ data: created }));
        return;
      }
      let body: unknown;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8') || 'null');
      } catch {
        body = null;
      }
      setTimeout(() => {
        // The bug this server stands for: the key is never looked at.
        const id = `res_${created.length + 1}`;
        created.push({ id, body });
        const text = JSON.stringify({ id, body, created: new Date().toISOString() });
        res.writeHead(201, { 'content-type': 'application/json', location: `/resources/${id}` });
        res.end(text);
      }, delayMs);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    created,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
