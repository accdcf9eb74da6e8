#!/usr/bin/env node
'use strict';
/**
 * Prints an HS256 JWT signed with $JWT_SECRET, for local use:
 *
 *   JWT_SECRET=... node scripts/make-token.js [--sub NAME] [--expires-in 1h]
 *   curl -H "Authorization: Bearer $(JWT_SECRET=... node scripts/make-token.js)" ...
 *
 * Default lifetime follows NODE_ENV like the app config: 1d in production, 7d otherwise.
 * Standalone (node:crypto only) so it works without a build.
 */
const { createHmac } = require('node:crypto');

const UNITS = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };

function parseDuration(value) {
  const match = /^(\d+)\s*([smhdw]?)$/.exec(String(value).trim());
  if (!match) throw new Error(`invalid duration: ${JSON.stringify(value)} (use e.g. 30m, 12h, 7d)`);
  return Number(match[1]) * UNITS[match[2] || 's'];
}

function parseArgs(argv) {
  const out = { sub: 'local-dev', expiresIn: process.env.NODE_ENV === 'production' ? '1d' : '7d' };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    const [flag, inline] = arg.split('=', 2);
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--sub') out.sub = value();
    else if (flag === '--expires-in') out.expiresIn = value();
    else if (flag === '-h' || flag === '--help') out.help = true;
    else throw new Error(`unknown argument: ${arg}`);
  }
  return out;
}

function b64url(input) {
  return Buffer.from(input).toString('base64url');
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
    if (args.help) {
      process.stdout.write('usage: JWT_SECRET=... node scripts/make-token.js [--sub NAME] [--expires-in 7d]\n');
      return;
    }
    parseDuration(args.expiresIn);
  } catch (err) {
    process.stderr.write(`make-token: ${err.message}\n`);
    process.exitCode = 2;
    return;
  }
  const secret = process.env.JWT_SECRET;
  if (!secret) {
    process.stderr.write('make-token: JWT_SECRET is not set\n');
    process.exitCode = 2;
    return;
  }
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64url(JSON.stringify({ sub: args.sub, iat: now, exp: now + parseDuration(args.expiresIn) }));
  const signature = createHmac('sha256', secret).update(`${header}.${payload}`).digest('base64url');
  process.stdout.write(`${header}.${payload}.${signature}\n`);
}

main();
