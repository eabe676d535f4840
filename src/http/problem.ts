import { NotReplayableError, type OncelyError } from '../errors/index.js';
import type { HttpResponse } from './outcome.js';

/** The media type of RFC 9457 problem details. */
export const PROBLEM_CONTENT_TYPE = 'application/problem+json';

/** Turn an oncely error into an RFC 9457 problem response. */
export function problemResponse(error: OncelyError): HttpResponse {
  const headers: Array<[string, string]> = [['content-type', PROBLEM_CONTENT_TYPE]];
  let status = error.status;
  const body: Record<string, unknown> = { type: error.type, title: error.title, status, detail: error.message };
  if (error.retryAfter !== undefined) headers.push(['retry-after', String(error.retryAfter)]);
  if (error instanceof NotReplayableError) {
    body.originalStatus = error.originalStatus;
    if (error.location !== undefined) {
      // The resource exists: send the client to it rather than run again.
      status = 303;
      body.status = status;
      headers.push(['location', error.location]);
    }
  }
  return { status, headers, body: JSON.stringify(body) };
}
