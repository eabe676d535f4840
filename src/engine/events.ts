/** Every event the engine emits, by name, with what it carries. */
export interface OncelyEvents {
  /** A claim was won; the operation runs here. `takeover` when an expired lease was taken over. */
  acquired: { id: string; takeover: boolean };
  /** A completed outcome was replayed to a duplicate. */
  replayed: { id: string };
  /** A duplicate arrived while the operation was still running. */
  conflict: { id: string; leaseUntil: number };
  /** The key was reused with a different request. */
  mismatch: { id: string };
  /** The outcome was stored. */
  stored: { id: string; bytes: number };
  /** The claim was released so that a retry runs again. */
  released: { id: string; reason: string };
  /** A write was refused because this worker no longer owns the record (lease lost or taken over). */
  fenced: { id: string; operation: 'renew' | 'complete' | 'release' };
  /** The store failed or timed out. */
  storeError: { id: string | undefined; operation: string; error: unknown };
  /** The lease ended unrenewed (or was refused): the run's `signal` fired; its outcome may not be stored. */
  leaseLost: { id: string };
  /**
   * A settlement could not reach the store before the lease deadline: the
   * record stays in progress until its lease ends, then a retry may run again.
   */
  unsettled: { id: string; error: unknown };
}

/** Names of the engine's events. */
export type OncelyEventName = keyof OncelyEvents;

/** A listener of one event. */
export type OncelyListener<E extends OncelyEventName> = (event: OncelyEvents[E]) => void;

/** Something that can be undone: returned by every subscription. */
export interface Disposable {
  dispose(): void;
}

/** Listeners given up front, one optional function per event. */
export type OncelyHooks = { [E in OncelyEventName]?: OncelyListener<E> };

/**
 * A minimal typed event emitter over an event map (name → payload).
 * Listener errors are swallowed so that logging or metrics can never break
 * the request or message they observe.
 */
export class TypedEmitter<M extends object> {
  readonly #listeners = new Map<keyof M, Set<(event: never) => void>>();

  /** Subscribe to one event; dispose the result to unsubscribe. */
  on<E extends keyof M>(name: E, listener: (event: M[E]) => void): Disposable {
    let set = this.#listeners.get(name);
    if (set === undefined) {
      set = new Set();
      this.#listeners.set(name, set);
    }
    const fn = listener as (event: never) => void;
    set.add(fn);
    return { dispose: () => set.delete(fn) };
  }

  /** Emit an event to its listeners. */
  emit<E extends keyof M>(name: E, event: M[E]): void {
    const set = this.#listeners.get(name);
    if (set === undefined) return;
    for (const listener of set) {
      try {
        (listener as (event: M[E]) => void)(event);
      } catch {
        // A broken listener must not break what it observes.
      }
    }
  }
}

/** The engine's emitter, taking its first listeners as {@link OncelyHooks}. */
export class OncelyEmitter extends TypedEmitter<OncelyEvents> {
  constructor(hooks: OncelyHooks = {}) {
    super();
    for (const [name, listener] of Object.entries(hooks)) {
      if (typeof listener === 'function') this.on(name as OncelyEventName, listener as OncelyListener<OncelyEventName>);
    }
  }
}
