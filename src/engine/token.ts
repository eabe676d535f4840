import { randomUUID } from 'node:crypto';

/**
 * A new fencing token: 122 random bits. Tokens are compared for equality
 * only; randomness (not a counter) guarantees that a record released and
 * claimed again never hands an old owner's token to a new owner.
 */
export function newToken(): string {
  return randomUUID();
}
