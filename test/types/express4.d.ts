// Express 4, installed under the alias `express4` beside Express 5, for the front-door tests.
declare module 'express4' {
  import type express from 'express';
  const express4: typeof express;
  export default express4;
}
