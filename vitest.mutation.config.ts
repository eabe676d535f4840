import { defineConfig } from 'vitest/config';

/**
 * Vitest for mutation testing (`npm run test:mutation`, see docs/mutation.md):
 * the unit tests beside the code only. The integration suites in test/ need
 * services and minutes; the lifecycle property test draws random cases, so a
 * mutant it kills in one run may survive the next, and it alone takes minutes.
 */
export default defineConfig({
  resolve: { conditions: ['source'] },
  ssr: { resolve: { conditions: ['source'], externalConditions: ['source'] } },
  test: {
    include: ['src/**/*.test.ts'],
    exclude: ['src/engine/lifecycle.property.test.ts', '**/node_modules/**'],
    testTimeout: 30_000,
    hookTimeout: 60_000,
  },
});
