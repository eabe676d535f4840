import { Module, type OnApplicationShutdown } from '@nestjs/common';
import { APP_GUARD } from '@nestjs/core';
import { OncelyModule } from 'oncely/nestjs';
import { memoryStore } from 'oncely/stores/memory';
import { AccountGuard, type AccountRequest } from './account.guard.js';
import { PaymentsController } from './payments.controller.js';

const store = memoryStore(); // one process; use the Redis, PostgreSQL, MySQL or SQLite store for several

@Module({
  imports: [
    // oncely's interceptor runs after guards: the scope comes from AccountGuard.
    OncelyModule.forRoot({ store, scope: (req: AccountRequest) => req.account }),
  ],
  controllers: [PaymentsController],
  providers: [{ provide: APP_GUARD, useClass: AccountGuard }],
})
export class AppModule implements OnApplicationShutdown {
  async onApplicationShutdown(): Promise<void> {
    await store.close();
  }
}
