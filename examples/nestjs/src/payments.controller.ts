import type { ServerResponse } from 'node:http';
import { randomBytes } from 'node:crypto';
import { BadRequestException, Body, Controller, Get, NotFoundException, Param, Post, Req, Res } from '@nestjs/common';
import { Idempotent } from 'oncely/nestjs';
import type { AccountRequest } from './account.guard.js';

interface Payment {
  id: string;
  account: string;
  amount: number;
  currency: string;
}

@Controller('payments')
export class PaymentsController {
  private readonly payments = new Map<string, Payment>();

  @Post()
  @Idempotent() // mode 'decorated' (the default): only routes marked so are idempotent
  async create(
    @Req() req: AccountRequest,
    @Body() body: { amount?: unknown; currency?: unknown },
    @Res({ passthrough: true }) res: ServerResponse, // Express's response is one; Nest still sends the return value
  ): Promise<Payment> {
    const { amount, currency } = body ?? {};
    if (!Number.isInteger(amount) || (amount as number) <= 0 || typeof currency !== 'string' || !/^[A-Z]{3}$/.test(currency)) {
      throw new BadRequestException('amount (a positive integer) and currency (ISO 4217) are required');
    }
    await new Promise((resolve) => setTimeout(resolve, 20)); // the payment provider
    const payment: Payment = { id: `pay_${randomBytes(8).toString('hex')}`, account: req.account!, amount: amount as number, currency };
    this.payments.set(payment.id, payment);
    res.setHeader('Location', `/payments/${payment.id}`);
    return payment; // 201, Nest's default for POST
  }

  @Get(':id')
  find(@Req() req: AccountRequest, @Param('id') id: string): Payment {
    const payment = this.payments.get(id);
    if (payment === undefined || payment.account !== req.account) throw new NotFoundException('no such payment');
    return payment;
  }
}
