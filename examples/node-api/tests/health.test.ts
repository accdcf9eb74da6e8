import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { runHealthChecks, withTimeout } from '../src/health';
import { startApp } from './helpers';

const ok = () => Promise.resolve();
const fail = () => Promise.reject(new Error('connection refused'));
const hang = () => new Promise<never>(() => undefined);

const HEALTH_KEYS = ['uptime', 'timestamp', 'database', 'redis', 'version'];

describe('health checks (injected checkers)', () => {
  test('both ok -> 200 with exactly the contract fields', async () => {
    const result = await runHealthChecks({
      checkDatabase: ok,
      checkRedis: ok,
      timeoutMs: 100,
      version: '1.2.3',
      uptime: () => 12.5,
      now: () => 1700000000000,
    });
    assert.equal(result.statusCode, 200);
    assert.deepEqual(result.body, {
      uptime: 12.5,
      timestamp: 1700000000000,
      database: 'ok',
      redis: 'ok',
      version: '1.2.3',
    });
    assert.deepEqual(Object.keys(result.body), HEALTH_KEYS);
  });

  test('database error -> 503', async () => {
    const result = await runHealthChecks({ checkDatabase: fail, checkRedis: ok, timeoutMs: 100, version: 'v' });
    assert.equal(result.statusCode, 503);
    assert.equal(result.body.database, 'error');
    assert.equal(result.body.redis, 'ok');
    assert.equal(result.failures.database, 'connection refused');
  });

  test('redis error (even a synchronous throw) -> 503', async () => {
    const result = await runHealthChecks({
      checkDatabase: ok,
      checkRedis: () => {
        throw new Error('not connected');
      },
      timeoutMs: 100,
      version: 'v',
    });
    assert.equal(result.statusCode, 503);
    assert.equal(result.body.database, 'ok');
    assert.equal(result.body.redis, 'error');
  });

  test('a hanging dependency times out -> 503 within the timeout', async () => {
    const started = Date.now();
    const result = await runHealthChecks({ checkDatabase: hang, checkRedis: hang, timeoutMs: 150, version: 'v' });
    const elapsed = Date.now() - started;
    assert.equal(result.statusCode, 503);
    assert.equal(result.body.database, 'error');
    assert.equal(result.body.redis, 'error');
    assert.match(result.failures.redis, /timed out after 150 ms/);
    assert.ok(elapsed >= 140 && elapsed < 1000, `took ${elapsed} ms`);
  });

  test('withTimeout passes through values and errors', async () => {
    assert.equal(await withTimeout(Promise.resolve(42), 50), 42);
    await assert.rejects(withTimeout(Promise.reject(new Error('x')), 50), /x/);
  });
});

describe('GET /health', () => {
  test('200 with version when both dependencies are ok', async () => {
    const app = await startApp({ version: '3.1.4' });
    try {
      const res = await fetch(`${app.url}/health`);
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /application\/json/);
      const body = (await res.json()) as Record<string, unknown>;
      assert.deepEqual(Object.keys(body), HEALTH_KEYS);
      assert.equal(body.database, 'ok');
      assert.equal(body.redis, 'ok');
      assert.equal(body.version, '3.1.4');
      assert.equal(typeof body.uptime, 'number');
      assert.equal(typeof body.timestamp, 'number');
    } finally {
      await app.close();
    }
  });

  test('503 when redis hangs, answered within the timeout', async () => {
    const app = await startApp({ checkRedis: hang, healthCheckTimeoutMs: 200 });
    try {
      const started = Date.now();
      const res = await fetch(`${app.url}/health`);
      const elapsed = Date.now() - started;
      assert.equal(res.status, 503);
      const body = (await res.json()) as Record<string, unknown>;
      assert.equal(body.database, 'ok');
      assert.equal(body.redis, 'error');
      assert.deepEqual(Object.keys(body), HEALTH_KEYS);
      assert.ok(elapsed < 1500, `took ${elapsed} ms`);
      assert.ok(app.lines.some((l) => l.msg === 'health.degraded'));
    } finally {
      await app.close();
    }
  });

  test('503 when the database fails', async () => {
    const app = await startApp({ checkDatabase: fail });
    try {
      const res = await fetch(`${app.url}/health`);
      assert.equal(res.status, 503);
      assert.equal(((await res.json()) as Record<string, unknown>).database, 'error');
    } finally {
      await app.close();
    }
  });
});
