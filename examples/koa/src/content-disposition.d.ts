// Why this file: @types/koa types `ctx.attachment(filename, options)` with
// `Options` from 'content-disposition', as @types/content-disposition 0.5
// declares it (Koa 3 runs content-disposition 1.0, the same API).
// content-disposition 2 (Express 5.3's) ships its own types, without
// `Options`; when it is the copy at the top of node_modules (a workspace
// beside an Express 5.3 app, as in this repository's packaging test),
// TypeScript reads it instead, and @types/koa fails to compile:
//   error TS2694: Namespace '".../content-disposition/dist/index"' has no exported member 'Options'.
// An ambient declaration takes precedence over the resolved file, so this
// one gives @types/koa the interface it expects wherever the package lies,
// while every declaration stays type-checked (skipLibCheck: false).
// A project with no content-disposition 2 installed does not need it.
declare module 'content-disposition' {
  /** content-disposition 0.5/1.0's options (as in @types/content-disposition): what `ctx.attachment()` passes on. */
  export interface Options {
    /** `'attachment'` (default), `'inline'`, or another type both parties agree on. */
    type?: 'attachment' | 'inline' | string | undefined;
    /** An ISO-8859-1 fallback for a Unicode file name: true (generated, default), false (none) or the name to use. */
    fallback?: string | boolean | undefined;
  }
}
