/**
 * Test kit: the store conformance suite that every oncely store passes, for
 * proving your own store the same way.
 *
 * @module
 */
export { defineStoreConformance } from './conformance.js';
export type { ConformanceRunner, StoreConformanceOptions, TransactionWrites } from './conformance.js';
export { startFaultProxy } from './fault-proxy.js';
export type * from './fault-proxy.js';
