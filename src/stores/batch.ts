/**
 * Shared by the SQL stores' `claimMany`: answer in the order of the ids
 * asked. The batch statement claims each distinct id once; a later copy of
 * an id the batch itself won is answered as in progress (held by that first
 * copy), so one batch can never hand out two tokens for one record.
 */
import type { ClaimInput, ClaimResult } from '../engine/store.js';

/** Results of a batch claim, in the order of `ids`, with repeated ids answered as in progress. */
export function inBatchOrder(
  ids: readonly string[],
  results: ReadonlyMap<string, ClaimResult>,
  input: ClaimInput,
): ClaimResult[] {
  const seen = new Set<string>();
  return ids.map((id) => {
    const result = results.get(id) as ClaimResult;
    if (seen.has(id) && result.status === 'acquired') {
      const now = result.leaseUntil - Math.round(input.leaseMs);
      return { status: 'in_progress', fingerprint: input.fingerprint, leaseUntil: result.leaseUntil, now };
    }
    seen.add(id);
    return result;
  });
}
