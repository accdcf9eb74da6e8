import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';

import { ConfigError, REQUIRED_ENV_VARS, loadConfig } from '../src/config';
import { APP_ROOT } from './helpers';

const VALID = {
  DATABASE_URL: 'postgresql://app:db-pass-123@db.internal:5432/app',
  REDIS_URL: 'redis://:redis-pass-456@cache.internal:6379',
  JWT_SECRET: 'a-very-long-jwt-secret-value-for-tests-0001',
  NODE_ENV: 'production',
};

function configError(env: Record<string, string | undefined>): ConfigError {
  try {
    loadConfig(env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${String(err)}`);
    return err;
  }
  assert.fail('loadConfig did not throw');
}

describe('config validation', () => {
  test('lists every missing required variable at once', () => {
    const err = configError({});
    assert.deepEqual(err.missing, ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET', 'NODE_ENV']);
    for (const name of REQUIRED_ENV_VARS) assert.match(err.message, new RegExp(name));
  });

  test('treats empty / blank values as missing and names only those', () => {
    const err = configError({ ...VALID, REDIS_URL: '', JWT_SECRET: '   ' });
    assert.deepEqual(err.missing, ['REDIS_URL', 'JWT_SECRET']);
    assert.deepEqual(err.invalid, []);
  });

  test('reports invalid values together with missing ones, without echoing URLs', () => {
    const err = configError({
      DATABASE_URL: 'mysql://u:secret-pw@h/db',
      NODE_ENV: 'staging',
      PORT: 'abc',
      LOG_LEVEL: 'loud',
    });
    assert.deepEqual(err.missing, ['REDIS_URL', 'JWT_SECRET']);
    assert.equal(err.invalid.length, 4);
    assert.match(err.message, /NODE_ENV must be one of development, production, test/);
    assert.match(err.message, /PORT must be an integer/);
    assert.match(err.message, /LOG_LEVEL/);
    assert.match(err.message, /DATABASE_URL must be a postgres:\/\/ or postgresql:\/\/ URL/);
    assert.doesNotMatch(err.message, /secret-pw/);
  });

  test('accepts a Unix-socket PostgreSQL URL, rejects a non-Redis REDIS_URL', () => {
    const config = loadConfig({ ...VALID, DATABASE_URL: 'postgresql://postgres:@/postgres?host=/tmp/pg' });
    assert.equal(config.database.url, 'postgresql://postgres:@/postgres?host=/tmp/pg');
    const err = configError({ ...VALID, REDIS_URL: 'http://:pw-xyz@cache:6379' });
    assert.deepEqual(err.invalid, ['REDIS_URL must be a redis:// or rediss:// URL']);
    assert.doesNotMatch(err.message, /pw-xyz/);
  });

  test('production settings: 20 connections, 1d tokens, info logs, defaults', () => {
    const config = loadConfig(VALID);
    assert.equal(config.env, 'production');
    assert.equal(config.port, 3000);
    assert.equal(config.instancePort, undefined);
    assert.equal(config.database.maxConnections, 20);
    assert.equal(config.jwt.expiresIn, '1d');
    assert.equal(config.jwt.secret, VALID.JWT_SECRET);
    assert.equal(config.logLevel, 'info');
    assert.equal(config.shutdownTimeoutMs, 10000);
    assert.equal(config.shutdownIdleGraceMs, 1000);
    assert.equal(config.healthCheckTimeoutMs, 2000);
    assert.equal(config.database.statementTimeoutMs, 2000);
    assert.deepEqual(config.warnings, []);
  });

  test('development and test settings: 5 connections, 7d tokens', () => {
    const dev = loadConfig({ ...VALID, NODE_ENV: 'development' });
    assert.equal(dev.database.maxConnections, 5);
    assert.equal(dev.jwt.expiresIn, '7d');
    assert.equal(dev.logLevel, 'debug');
    const t = loadConfig({ ...VALID, NODE_ENV: 'test' });
    assert.equal(t.env, 'test');
    assert.equal(t.database.maxConnections, 5);
    assert.equal(t.jwt.secret, VALID.JWT_SECRET, 'no hard-coded secret in any environment');
  });

  test('optional variables are parsed', () => {
    const config = loadConfig({
      ...VALID,
      PORT: '8080',
      INSTANCE_PORT: '9100',
      APP_VERSION: '2.3.4',
      SHUTDOWN_TIMEOUT_MS: '500',
      SHUTDOWN_IDLE_GRACE_MS: '2000',
      HEALTH_CHECK_TIMEOUT_MS: '750',
      DB_STATEMENT_TIMEOUT_MS: '1500',
      LOG_LEVEL: 'WARN',
    });
    assert.equal(config.port, 8080);
    assert.equal(config.instancePort, 9100);
    assert.equal(config.version, '2.3.4');
    assert.equal(config.shutdownTimeoutMs, 500);
    assert.equal(config.shutdownIdleGraceMs, 500, 'idle grace is capped at the shutdown timeout');
    assert.equal(config.healthCheckTimeoutMs, 750);
    assert.equal(config.database.statementTimeoutMs, 1500);
    assert.equal(config.logLevel, 'warn');
  });

  test('APP_VERSION defaults to the package.json version', () => {
    const pkg = JSON.parse(readFileSync(path.join(APP_ROOT, 'package.json'), 'utf8')) as { version: string };
    assert.equal(loadConfig(VALID).version, pkg.version);
  });

  test('secrets can come from NAME_FILE files; NAME wins; an unreadable file is named, its content never', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'node-api-secrets-'));
    writeFileSync(path.join(dir, 'db'), `${VALID.DATABASE_URL}\n`);
    writeFileSync(path.join(dir, 'redis'), VALID.REDIS_URL);
    writeFileSync(path.join(dir, 'jwt'), `${VALID.JWT_SECRET}\n`);
    const files = {
      DATABASE_URL_FILE: path.join(dir, 'db'),
      REDIS_URL_FILE: path.join(dir, 'redis'),
      JWT_SECRET_FILE: path.join(dir, 'jwt'),
      NODE_ENV: 'production',
    };
    const cfg = loadConfig(files);
    assert.equal(cfg.database.url, VALID.DATABASE_URL);
    assert.equal(cfg.redis.url, VALID.REDIS_URL);
    assert.equal(cfg.jwt.secret, VALID.JWT_SECRET);
    assert.equal(loadConfig({ ...files, JWT_SECRET: 'x'.repeat(40) }).jwt.secret, 'x'.repeat(40));
    const err = configError({ ...files, JWT_SECRET_FILE: path.join(dir, 'missing') });
    assert.deepEqual(err.missing, []);
    assert.match(err.message, /JWT_SECRET_FILE: cannot read ".*missing" \(ENOENT\)/);
    assert.doesNotMatch(err.message, /db-pass-123|redis-pass-456/);
  });

  test('INSTANCE_PORT equal to PORT is ignored with a warning; short production secret warns', () => {
    const config = loadConfig({ ...VALID, PORT: '4000', INSTANCE_PORT: '4000', JWT_SECRET: 'short' });
    assert.equal(config.instancePort, undefined);
    assert.equal(config.warnings.length, 2);
  });
});

describe('server startup with a bad environment', () => {
  const serverJs = path.join(APP_ROOT, '.test-dist', 'src', 'server.js');

  test('exits 78 with ONE JSON line naming all missing variables', () => {
    const result = spawnSync(process.execPath, [serverJs], {
      env: { PATH: process.env.PATH },
      encoding: 'utf8',
      timeout: 10_000,
    });
    assert.equal(result.status, 78);
    const lines = result.stdout.trim().split('\n');
    assert.equal(lines.length, 1, `expected one line, got: ${result.stdout}`);
    const record = JSON.parse(lines[0]) as Record<string, unknown>;
    assert.equal(record.level, 'error');
    assert.equal(record.msg, 'config.invalid');
    assert.deepEqual(record.missing, ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET', 'NODE_ENV']);
    assert.equal(typeof record.timestamp, 'string');
  });

  test('never prints secret values while failing', () => {
    const result = spawnSync(process.execPath, [serverJs], {
      env: { PATH: process.env.PATH, DATABASE_URL: VALID.DATABASE_URL, JWT_SECRET: VALID.JWT_SECRET },
      encoding: 'utf8',
      timeout: 10_000,
    });
    assert.equal(result.status, 78);
    const record = JSON.parse(result.stdout.trim()) as Record<string, unknown>;
    assert.deepEqual(record.missing, ['REDIS_URL', 'NODE_ENV']);
    const output = result.stdout + result.stderr;
    assert.doesNotMatch(output, /db-pass-123/);
    assert.doesNotMatch(output, /a-very-long-jwt-secret/);
  });
});
