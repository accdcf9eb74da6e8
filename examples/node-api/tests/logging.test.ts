import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { createLogger } from '../src/logger';
import { redactUrl, secretsOfUrl } from '../src/redact';

describe('redaction', () => {
  test('redactUrl hides passwords and keeps the rest', () => {
    assert.equal(redactUrl('postgresql://user:pa55@db.example:5432/app'), 'postgresql://user:***@db.example:5432/app');
    assert.equal(redactUrl('redis://:pa55@cache:6379/0'), 'redis://:***@cache:6379/0');
    assert.equal(redactUrl('redis://cache:6379'), 'redis://cache:6379');
    assert.equal(redactUrl('postgres://u:p%40ss@h/db'), 'postgres://u:***@h/db');
    assert.equal(redactUrl('postgresql://u:pw@/db?host=/run/pg'), 'postgresql://u:***@/db?host=/run/pg');
  });

  test('secretsOfUrl returns raw and decoded password', () => {
    assert.deepEqual(secretsOfUrl('postgres://u:p%40ss@h/db'), ['p%40ss', 'p@ss']);
    assert.deepEqual(secretsOfUrl('redis://h:6379'), []);
    assert.deepEqual(secretsOfUrl('postgresql://u:s%21ck@/db?host=/run/pg'), ['s%21ck', 's!ck']);
  });
});

describe('JSON logger', () => {
  test('writes one JSON line per event with timestamp, level, msg and fields', () => {
    const out: string[] = [];
    const logger = createLogger({ level: 'info', base: { pid: 1 }, write: (l) => out.push(l) });
    logger.info('hello', { a: 1 });
    logger.child({ component: 'x' }).warn('careful');
    assert.equal(out.length, 2);
    for (const line of out) assert.ok(line.endsWith('\n') && !line.slice(0, -1).includes('\n'));
    const first = JSON.parse(out[0]) as Record<string, unknown>;
    assert.equal(first.level, 'info');
    assert.equal(first.msg, 'hello');
    assert.equal(first.a, 1);
    assert.equal(first.pid, 1);
    assert.ok(!Number.isNaN(Date.parse(first.timestamp as string)));
    assert.equal((JSON.parse(out[1]) as Record<string, unknown>).component, 'x');
  });

  test('filters by level', () => {
    const out: string[] = [];
    const logger = createLogger({ level: 'warn', write: (l) => out.push(l) });
    logger.debug('d');
    logger.info('i');
    logger.warn('w');
    logger.error('e');
    assert.deepEqual(
      out.map((l) => (JSON.parse(l) as { msg: string }).msg),
      ['w', 'e'],
    );
  });

  test('scrubs registered secrets and URL credentials, also inside errors', () => {
    const out: string[] = [];
    const logger = createLogger({ secrets: ['jwt-"quoted"-secret', 'dbpw'], write: (l) => out.push(l) });
    logger.error('boom', {
      err: new Error('connect failed for postgresql://app:dbpw@db/app'),
      secret: 'jwt-"quoted"-secret',
      other: 'redis://:anotherpw@cache:6379',
    });
    const line = out.join('');
    assert.doesNotMatch(line, /dbpw/);
    assert.doesNotMatch(line, /quoted/);
    assert.doesNotMatch(line, /anotherpw/);
    const record = JSON.parse(line) as { err: { message: string }; other: string };
    assert.equal(record.err.message, 'connect failed for postgresql://app:***@db/app');
    assert.equal(record.other, 'redis://:***@cache:6379');
  });
});
