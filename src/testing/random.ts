/**
 * mulberry32: a small seeded generator of numbers in [0, 1). The same seed
 * gives the same sequence, so a fault schedule or a generated test case that
 * fails can be named by its seed and replayed. Not for anything secret.
 * Internal: used by the fault proxy and by the randomised tests.
 */
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
