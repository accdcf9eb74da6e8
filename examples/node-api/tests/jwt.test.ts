import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import path from 'node:path';
import { describe, test } from 'node:test';

import { JwtError, parseDuration, signJwt, verifyJwt } from '../src/jwt';
import { APP_ROOT, TEST_SECRET } from './helpers';

function b64(obj: unknown): string {
  return Buffer.from(JSON.stringify(obj)).toString('base64url');
}

describe('JWT HS256', () => {
  test('a freshly signed token verifies and returns its claims', () => {
    const token = signJwt({ sub: 'alice' }, TEST_SECRET, { expiresIn: '1h' });
    const payload = verifyJwt(token, TEST_SECRET);
    assert.equal(payload.sub, 'alice');
    assert.equal((payload.exp as number) - (payload.iat as number), 3600);
  });

  test('an expired token is rejected', () => {
    const token = signJwt({ sub: 'alice' }, TEST_SECRET, { expiresIn: 60, now: Date.now() - 120_000 });
    assert.throws(() => verifyJwt(token, TEST_SECRET), (err: unknown) => {
      assert.ok(err instanceof JwtError);
      assert.equal(err.message, 'token expired');
      return true;
    });
  });

  test('a token signed with another secret is rejected', () => {
    const token = signJwt({ sub: 'mallory' }, 'some-other-secret', { expiresIn: '1h' });
    assert.throws(() => verifyJwt(token, TEST_SECRET), { name: 'JwtError', message: 'invalid token signature' });
  });

  test('a tampered payload is rejected', () => {
    const [h, , s] = signJwt({ sub: 'alice', admin: false }, TEST_SECRET, { expiresIn: '1h' }).split('.');
    const forged = `${h}.${b64({ sub: 'alice', admin: true })}.${s}`;
    assert.throws(() => verifyJwt(forged, TEST_SECRET), { message: 'invalid token signature' });
  });

  test('alg none and other algorithms are rejected', () => {
    const none = `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ sub: 'x' })}.`;
    assert.throws(() => verifyJwt(none, TEST_SECRET), JwtError);
    const hs512Input = `${b64({ alg: 'HS512', typ: 'JWT' })}.${b64({ sub: 'x' })}`;
    const hs512 = `${hs512Input}.${createHmac('sha512', TEST_SECRET).update(hs512Input).digest('base64url')}`;
    assert.throws(() => verifyJwt(hs512, TEST_SECRET), { message: 'unsupported token algorithm' });
  });

  test('malformed tokens and not-yet-valid tokens are rejected', () => {
    for (const bad of ['', 'abc', 'a.b', 'a.b.c.d', '!!.??.**']) {
      assert.throws(() => verifyJwt(bad, TEST_SECRET), JwtError, `accepted ${JSON.stringify(bad)}`);
    }
    const future = signJwt({ nbf: Math.floor(Date.now() / 1000) + 3600 }, TEST_SECRET);
    assert.throws(() => verifyJwt(future, TEST_SECRET), { message: 'token not yet valid' });
  });

  test('parseDuration understands the config values', () => {
    assert.equal(parseDuration('7d'), 604800);
    assert.equal(parseDuration('1d'), 86400);
    assert.equal(parseDuration('30m'), 1800);
    assert.equal(parseDuration('45'), 45);
    assert.throws(() => parseDuration('soon'));
  });
});

describe('scripts/make-token.js', () => {
  const script = path.join(APP_ROOT, 'scripts', 'make-token.js');

  test('prints a token that the app accepts (7d outside production)', () => {
    const result = spawnSync(process.execPath, [script, '--sub', 'ci'], {
      env: { PATH: process.env.PATH, JWT_SECRET: TEST_SECRET, NODE_ENV: 'development' },
      encoding: 'utf8',
    });
    assert.equal(result.status, 0, result.stderr);
    const payload = verifyJwt(result.stdout.trim(), TEST_SECRET);
    assert.equal(payload.sub, 'ci');
    assert.equal((payload.exp as number) - (payload.iat as number), 7 * 86400);
  });

  test('honours --expires-in and fails without JWT_SECRET', () => {
    const ok = spawnSync(process.execPath, [script, '--expires-in=10m'], {
      env: { PATH: process.env.PATH, JWT_SECRET: TEST_SECRET },
      encoding: 'utf8',
    });
    const payload = verifyJwt(ok.stdout.trim(), TEST_SECRET);
    assert.equal((payload.exp as number) - (payload.iat as number), 600);

    const missing = spawnSync(process.execPath, [script], { env: { PATH: process.env.PATH }, encoding: 'utf8' });
    assert.equal(missing.status, 2);
    assert.match(missing.stderr, /JWT_SECRET is not set/);
  });
});
