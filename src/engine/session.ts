import { randomUUID } from 'node:crypto';
import type { IdempotencyStore, StoreSessions } from './store.js';

/** Default session TTL, ms: a dead process's claims can be taken over this long after its last heartbeat. */
export const DEFAULT_SESSION_TTL_MS = 1_000;

/** Something that must learn at once when this process's session may have ended. */
export interface SessionWatcher {
  sessionAtRisk(until: number): void;
}

/**
 * This process's session in one store: one heartbeat for the whole
 * process, whatever the number of claims in flight, every quarter of the
 * TTL. Other processes take over the claims of a session that stopped
 * beating. If the heartbeat cannot get through, the session's local
 * deadline (counted from when the last successful heartbeat was sent) bounds
 * every claim of this process, as its lease does.
 * @internal Made and shared by the engines of one store.
 */
export class ProcessSession {
  /** The session id recorded as the owner of this process's claims. */
  readonly id = randomUUID();
  readonly ttlMs: number;
  readonly #sessions: StoreSessions;
  readonly #call: <T>(operation: string, call: () => Promise<T>) => Promise<T>;
  readonly #watchers = new Set<SessionWatcher>();
  #until = 0;
  #timer: NodeJS.Timeout | undefined;
  #starting: Promise<void> | undefined;
  #users = 0;
  #ended = false;

  constructor(sessions: StoreSessions, ttlMs: number, call: <T>(operation: string, call: () => Promise<T>) => Promise<T>) {
    this.#sessions = sessions;
    this.ttlMs = ttlMs;
    this.#call = call;
  }

  /** Until when (epoch ms, local) this session is surely alive: the last successful heartbeat's send time + TTL. */
  get until(): number {
    return this.#until;
  }

  /** Resolve once the session is alive (the first heartbeat went through); later calls cost nothing. */
  ready(): Promise<void> {
    if (this.#until > Date.now() + this.ttlMs / 2) return Promise.resolve();
    this.#starting ??= this.#beat().finally(() => {
      this.#starting = undefined;
    });
    return this.#starting;
  }

  async #beat(): Promise<void> {
    const sentAt = Date.now();
    await this.#call('heartbeat', () => this.#sessions.heartbeat(this.id, this.ttlMs));
    this.#until = sentAt + this.ttlMs;
    this.#ended = false;
    this.#schedule();
  }

  #schedule(): void {
    if (this.#timer !== undefined || this.#ended) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#beat().catch(() => {
        // Every claim of this process is now bounded by the session's deadline.
        for (const watcher of this.#watchers) watcher.sessionAtRisk(this.#until);
        this.#schedule();
      });
    }, Math.max(10, Math.floor(this.ttlMs / 4)));
    this.#timer.unref();
  }

  /** A claim of this process: told when the session may end before its lease does. */
  watch(watcher: SessionWatcher): void {
    this.#watchers.add(watcher);
  }

  /** The claim settled: no longer told. */
  unwatch(watcher: SessionWatcher): void {
    this.#watchers.delete(watcher);
  }

  /** An engine uses this session. */
  use(): void {
    this.#users++;
  }

  /** An engine closed: the last one ends the session, so that its claims can be taken over at once. */
  async release(): Promise<void> {
    if (--this.#users > 0) return;
    this.#ended = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#until = 0;
    await this.#call('endSession', () => this.#sessions.end(this.id)).catch(() => undefined);
  }
}

const sessionsByStore = new WeakMap<IdempotencyStore, ProcessSession>();

/** The one session of this process in `store` (made on first use). @internal */
export function sessionOf(
  store: IdempotencyStore,
  ttlMs: number,
  call: <T>(operation: string, call: () => Promise<T>) => Promise<T>,
): ProcessSession | undefined {
  const sessions = store.sessions;
  if (sessions === undefined) return undefined;
  let session = sessionsByStore.get(store);
  if (session === undefined) {
    session = new ProcessSession(sessions, ttlMs, call);
    sessionsByStore.set(store, session);
  }
  return session;
}
