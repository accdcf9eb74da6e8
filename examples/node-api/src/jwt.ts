import { createHmac, timingSafeEqual } from 'node:crypto';

/**
 * Minimal HS256 JSON Web Token support (RFC 7519) on top of node:crypto.
 * Only HS256 is accepted; "alg: none" and every other algorithm are rejected.
 */

export interface JwtPayload {
  sub?: string;
  iat?: number;
  exp?: number;
  nbf?: number;
  [claim: string]: unknown;
}

export class JwtError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'JwtError';
  }
}

const UNITS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };

/** "7d" / "1d" / "12h" / "30m" / "45s" / "3600" -> seconds. */
export function parseDuration(value: string | number): number {
  if (typeof value === 'number') return value;
  const match = /^(\d+)\s*([smhdw]?)$/.exec(value.trim());
  if (!match) throw new Error(`invalid duration: ${JSON.stringify(value)}`);
  return Number(match[1]) * UNITS[match[2] || 's'];
}

function b64url(input: Buffer | string): string {
  return Buffer.from(input).toString('base64url');
}

function hmac(data: string, secret: string): Buffer {
  return createHmac('sha256', secret).update(data).digest();
}

export function signJwt(
  payload: JwtPayload,
  secret: string,
  options: { expiresIn?: string | number; now?: number } = {},
): string {
  const now = Math.floor((options.now ?? Date.now()) / 1000);
  const body: JwtPayload = { iat: now, ...payload };
  if (options.expiresIn !== undefined) body.exp = now + parseDuration(options.expiresIn);
  const signingInput = `${b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${b64url(JSON.stringify(body))}`;
  return `${signingInput}.${b64url(hmac(signingInput, secret))}`;
}

function decodeJson(part: string, what: string): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
  } catch {
    throw new JwtError(`malformed token ${what}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new JwtError(`malformed token ${what}`);
  }
  return parsed as Record<string, unknown>;
}

/** Verifies signature, algorithm, exp and nbf. Returns the payload or throws JwtError. */
export function verifyJwt(
  token: string,
  secret: string,
  options: { now?: number; clockToleranceSec?: number } = {},
): JwtPayload {
  const parts = token.split('.');
  if (parts.length !== 3 || parts.some((p) => !/^[A-Za-z0-9_-]*$/.test(p)) || parts[2] === '') {
    throw new JwtError('malformed token');
  }
  const [headerPart, payloadPart, signaturePart] = parts;
  const header = decodeJson(headerPart, 'header');
  if (header.alg !== 'HS256') throw new JwtError('unsupported token algorithm');

  const expected = hmac(`${headerPart}.${payloadPart}`, secret);
  const actual = Buffer.from(signaturePart, 'base64url');
  if (actual.length !== expected.length || !timingSafeEqual(actual, expected)) {
    throw new JwtError('invalid token signature');
  }

  const payload = decodeJson(payloadPart, 'payload') as JwtPayload;
  const now = Math.floor((options.now ?? Date.now()) / 1000);
  const tolerance = options.clockToleranceSec ?? 0;
  if (payload.exp !== undefined && (typeof payload.exp !== 'number' || now >= payload.exp + tolerance)) {
    throw new JwtError('token expired');
  }
  if (payload.nbf !== undefined && (typeof payload.nbf !== 'number' || now < payload.nbf - tolerance)) {
    throw new JwtError('token not yet valid');
  }
  return payload;
}
