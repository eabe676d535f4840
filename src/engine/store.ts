/**
 * The store contract (DESIGN section 3). Every store implements it with each
 * operation atomic on the server side, in one round trip.
 *
 * Lifecycle of a record:
 * ```
 * absent ──claim──▶ in_progress(token, leaseUntil, fingerprint)
 * in_progress ──complete(token)──▶ completed(fingerprint, outcome, expiresAt)
 * in_progress ──release(token)──▶ absent
 * in_progress, lease expired ──claim (same fingerprint)──▶ in_progress(new token)
 * completed ──TTL──▶ absent
 * ```
 *
 * @module
 */

/** Input of {@link IdempotencyStore.claim}. */
export interface ClaimInput {
  /** Fingerprint of the request; `null` when fingerprints are not used. */
  readonly fingerprint: string | null;
  /** Lease length in milliseconds, measured on the store's clock. */
  readonly leaseMs: number;
  /**
   * Retention of the record from the moment of the claim, in milliseconds.
   * An in-progress record whose owner vanished is kept this long (it can be
   * taken over once its lease ends); `complete` sets a fresh retention.
   */
  readonly ttlMs: number;
  /**
   * Who owns the record (account, tenant), when the front door knows it.
   * Never part of the record's identity (the id already covers it); bounded
   * stores use it to keep one scope from crowding out another.
   */
  readonly scope?: string;
  /**
   * The claiming process's session ({@link StoreSessions}): stored as the
   * record's owner, so that others can take it over as soon as the session
   * dies. Absent for stores without sessions.
   */
  readonly owner?: string;
  /**
   * Take the record over when it is in progress under this owner, whatever
   * its lease: the engine found that owner's session dead. The same
   * fingerprint rule applies as for an expired lease. A record whose owner
   * has changed meanwhile is not taken over.
   */
  readonly takeoverFrom?: string;
}

/** A record that finished: its stored outcome is replayed to every later copy. */
export interface CompletedRecord {
  readonly state: 'completed';
  readonly fingerprint: string | null;
  /** The outcome as the engine serialised it (opaque to the store). */
  readonly outcome: string;
  /** When the record stops existing (epoch ms, store clock). */
  readonly expiresAt: number;
}

/** A record whose operation is running (or whose owner crashed, until its lease ends). */
export interface InProgressRecord {
  readonly state: 'in_progress';
  readonly fingerprint: string | null;
  /** When the current lease ends (epoch ms, store clock). */
  readonly leaseUntil: number;
  /** When the record stops existing (epoch ms, store clock). */
  readonly expiresAt: number;
}

/** What {@link IdempotencyStore.get} returns. */
export type StoredRecord = CompletedRecord | InProgressRecord;

/** The claim won: this caller owns the record and must run the operation. */
export interface ClaimAcquired {
  readonly status: 'acquired';
  /** Fencing token: every later write must present it. */
  readonly token: string;
  /** True when an expired lease of an earlier owner was taken over. */
  readonly takeover: boolean;
  /** When the new lease ends (epoch ms, store clock). */
  readonly leaseUntil: number;
}

/** The operation already completed; replay its outcome (after checking the fingerprint). */
export interface ClaimCompleted {
  readonly status: 'completed';
  readonly record: CompletedRecord;
}

/**
 * Another owner holds the record. Either its lease is live, or the lease
 * ended but the caller's fingerprint differs, so no takeover happened.
 */
export interface ClaimInProgress {
  readonly status: 'in_progress';
  readonly fingerprint: string | null;
  readonly leaseUntil: number;
  /** The store's clock when it answered (epoch ms), to compute a wait without trusting local clocks. */
  readonly now: number;
  /** The owner session recorded with the claim, when the store keeps one. */
  readonly owner?: string;
}

/** The answer of {@link IdempotencyStore.claim}. */
export type ClaimResult = ClaimAcquired | ClaimCompleted | ClaimInProgress;

/** Optional abilities of a store. */
export interface StoreCapabilities {
  /** The store expires records by itself (Redis); `purgeExpired` is then a no-op. */
  readonly nativeTtl: boolean;
  /** Lease deadlines come from the server's clock rather than this process. */
  readonly serverClock: boolean;
  /** Several processes can share the store. */
  readonly shared: boolean;
  /**
   * Every operation finishes inside this process without waiting on I/O
   * (memory, SQLite through better-sqlite3). The engine then calls it
   * without a timeout timer: such a call returns before any timer could fire.
   */
  readonly synchronous?: boolean;
}

/**
 * Process sessions: one heartbeat per process (not per claim) tells the
 * other processes that its claims are still being worked on. When a process
 * dies, its session ends within its TTL and its claims can be taken over
 * within seconds instead of a whole lease.
 */
export interface StoreSessions {
  /** Keep `session` alive for `ttlMs` from now, on the store's clock (an upsert). */
  heartbeat(session: string, ttlMs: number): Promise<void>;
  /** True while `session` is alive. */
  alive(session: string): Promise<boolean>;
  /** End `session` now (a clean shutdown): its claims can be taken over at once. */
  end(session: string): Promise<void>;
}

/**
 * One open transaction of transactional mode: the handler's business writes
 * go through `client`, and the record's completion commits with them.
 */
export interface StoreTransaction<C = unknown> {
  /** The driver's handle inside the open transaction (a `pg` client, a mysql2 connection, a better-sqlite3 `Database`). */
  readonly client: C;
  /**
   * Complete the record inside the transaction (fenced by the claim's
   * token), then commit both. Answers `false`, having rolled everything
   * back, when the token no longer owns the record. Throws when the commit
   * failed or its result is unknown.
   */
  commit(outcome: string, ttlMs: number): Promise<boolean>;
  /** Roll back the business writes (the record is untouched). */
  rollback(): Promise<void>;
}

/** Transactional mode (SQL stores): business writes and the completion commit together. */
export interface StoreTransactions<C = unknown> {
  /** Open a transaction for the operation `id`, claimed under `token`. */
  open(id: string, token: string): Promise<StoreTransaction<C>>;
}

/**
 * The store contract. Implement it to put idempotency records anywhere; run
 * `defineStoreConformance` from `oncely/testing` to prove an implementation.
 *
 * Rules every implementation follows:
 * - `claim` is one atomic server-side operation (never read-then-write from the client).
 * - `renew`, `complete` and `release` change nothing and answer `false` when
 *   `token` no longer owns the record (it was taken over, released, or expired).
 * - An expired record is absent to every operation, purged or not.
 * - Ids are opaque strings of at most 128 characters (oncely passes 64 hex characters).
 */
export interface IdempotencyStore {
  /** Short name for logs and metrics, e.g. `"redis"`. */
  readonly name: string;
  /** What this store can do. */
  readonly capabilities: StoreCapabilities;
  /** Decide atomically who runs the operation named `id`. */
  claim(id: string, input: ClaimInput): Promise<ClaimResult>;
  /**
   * Claim many ids in one round trip (batches of messages). Results are in
   * the order of `ids`. Stores without a native batch run `claim` for each.
   */
  claimMany?(ids: readonly string[], input: ClaimInput): Promise<ClaimResult[]>;
  /** Extend the lease of the owner holding `token` to `leaseMs` from now. */
  renew(id: string, token: string, leaseMs: number): Promise<boolean>;
  /** Store the outcome and keep the record `ttlMs` from now, if `token` still owns it. */
  complete(id: string, token: string, outcome: string, ttlMs: number): Promise<boolean>;
  /** Delete the record, if `token` still owns it, so that a retry runs again. */
  release(id: string, token: string): Promise<boolean>;
  /** Read a record (for inspection and waits); `null` when absent or expired. */
  get(id: string): Promise<StoredRecord | null>;
  /** Delete a record whatever its state (administration); true when one existed. */
  delete(id: string): Promise<boolean>;
  /** Delete up to `limit` expired records; answers how many. No-op with native TTL. */
  purgeExpired(limit: number): Promise<number>;
  /** Release resources the store created itself (never the user's client). */
  close(): Promise<void>;
  /** Process sessions, for takeover within seconds of a crash (optional). */
  readonly sessions?: StoreSessions;
  /** Transactional mode (optional; SQL stores). */
  readonly transactions?: StoreTransactions;
}
