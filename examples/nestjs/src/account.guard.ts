import { type CanActivate, type ExecutionContext, Injectable, UnauthorizedException } from '@nestjs/common';
import type { NestRequest } from 'oncely/nestjs';

/** The request as this app's guard leaves it. */
export interface AccountRequest extends NestRequest {
  /** The caller's account, set by {@link AccountGuard}. */
  account?: string;
}

/** A stand-in for real authentication: the bearer token names the account. */
@Injectable()
export class AccountGuard implements CanActivate {
  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<AccountRequest>();
    const match = /^Bearer (\w+)$/.exec(request.headers.authorization ?? '');
    if (!match) throw new UnauthorizedException('Authorization: Bearer <account> is required');
    request.account = match[1];
    return true;
  }
}
