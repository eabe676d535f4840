/** Vitest global setup: nothing to start for unit tests; integration suites check their own services. */
export default async function setup(): Promise<void> {}
