/**
 * True for a promise or any object with a `then` method: what `await` would
 * wait for. Lets a hot path skip the extra turn of `await` on a plain value.
 *
 * @example
 * ```ts
 * let scope = options.scope(request);
 * if (isThenable(scope)) scope = await scope;
 * ```
 */
export function isThenable(value: unknown): value is PromiseLike<unknown> {
  return (
    (typeof value === 'object' || typeof value === 'function') &&
    value !== null &&
    typeof (value as { then?: unknown }).then === 'function'
  );
}
