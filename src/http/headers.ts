/**
 * A request header as the core reads it. Node joins repeated fields of most
 * headers with ", " (so two Idempotency-Key fields arrive as a comma list,
 * which the key rules refuse); `set-cookie` stays an array. Reading
 * `headers` rather than `headersDistinct` keeps the hot path from building
 * an object of every header, and works with Fastify's `inject()` and other
 * request doubles that have no `headersDistinct`.
 */
export function fieldLines(value: string | string[] | undefined): string[] | undefined {
  if (value === undefined) return undefined;
  return typeof value === 'string' ? [value] : value;
}
