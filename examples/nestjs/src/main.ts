// A tiny payments API on NestJS 11 (Express platform), made idempotent by oncely.
//   npm run build && npm start
//   npx oncely verify http://127.0.0.1:3000/payments -H 'Authorization: Bearer acct_demo'
import 'reflect-metadata';
import { NestFactory } from '@nestjs/core';
import { AppModule } from './app.module.js';

const app = await NestFactory.create(AppModule);
app.enableShutdownHooks(); // SIGINT, SIGTERM: close the server, then AppModule closes the store
await app.listen(Number(process.env.PORT ?? 3000), process.env.HOST ?? '127.0.0.1');
console.log(`listening on ${await app.getUrl()}`);
