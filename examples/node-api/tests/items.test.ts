import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { MAX_LIST_LIMIT, parseId, parseLimit, validateNewItem } from '../src/items';
import { signJwt } from '../src/jwt';
import { TEST_SECRET, startApp } from './helpers';

describe('items input validation', () => {
  test('accepts name with optional description, trimming the name', () => {
    assert.deepEqual(validateNewItem({ name: '  Widget ' }), { ok: true, value: { name: 'Widget', description: null } });
    assert.deepEqual(validateNewItem({ name: 'W', description: 'd' }), {
      ok: true,
      value: { name: 'W', description: 'd' },
    });
    assert.deepEqual(validateNewItem({ name: 'W', description: null }), {
      ok: true,
      value: { name: 'W', description: null },
    });
  });

  test('rejects bad bodies with clear messages', () => {
    const errors = (body: unknown) => {
      const r = validateNewItem(body);
      assert.equal(r.ok, false);
      return r.ok ? [] : r.errors;
    };
    assert.deepEqual(errors(undefined), ['request body must be a JSON object (Content-Type: application/json)']);
    assert.deepEqual(errors([1]), ['request body must be a JSON object (Content-Type: application/json)']);
    assert.deepEqual(errors({}), ['name is required']);
    assert.deepEqual(errors({ name: 5 }), ['name must be a string']);
    assert.deepEqual(errors({ name: '   ' }), ['name must not be empty']);
    assert.deepEqual(errors({ name: 'x'.repeat(201) }), ['name must be at most 200 characters']);
    assert.deepEqual(errors({ name: 'ok', description: 7 }), ['description must be a string']);
    assert.deepEqual(errors({ name: 'ok', extra: 1, id: 3 }), ['unknown field(s): extra, id']);
  });

  test('limit and id parsing', () => {
    assert.deepEqual(parseLimit(undefined), { ok: true, value: 20 });
    assert.deepEqual(parseLimit('5'), { ok: true, value: 5 });
    for (const bad of ['0', '-1', 'abc', '1.5', String(MAX_LIST_LIMIT + 1), ['1', '2']]) {
      assert.equal(parseLimit(bad).ok, false, `limit ${JSON.stringify(bad)}`);
    }
    assert.deepEqual(parseId('12'), { ok: true, value: 12 });
    for (const bad of ['0', '-3', 'abc', '01', '99999999999999999999']) {
      assert.equal(parseId(bad).ok, false, `id ${bad}`);
    }
  });
});

describe('items HTTP API', () => {
  const token = () => signJwt({ sub: 'tester' }, TEST_SECRET, { expiresIn: '5m' });
  const post = (url: string, body: string, headers: Record<string, string> = {}) =>
    fetch(`${url}/items`, { method: 'POST', body, headers: { 'content-type': 'application/json', ...headers } });

  test('POST requires a valid bearer token', async () => {
    const app = await startApp();
    try {
      const body = JSON.stringify({ name: 'a' });
      const none = await post(app.url, body);
      assert.equal(none.status, 401);
      assert.deepEqual(await none.json(), { error: 'missing bearer token' });

      const wrong = await post(app.url, body, { authorization: `Bearer ${signJwt({}, 'other', { expiresIn: 60 })}` });
      assert.equal(wrong.status, 401);
      assert.deepEqual(await wrong.json(), { error: 'invalid token signature' });

      const expired = signJwt({}, TEST_SECRET, { expiresIn: 1, now: Date.now() - 10_000 });
      const old = await post(app.url, body, { authorization: `Bearer ${expired}` });
      assert.equal(old.status, 401);
      assert.deepEqual(await old.json(), { error: 'token expired' });
      assert.deepEqual(await app.deps.items.list(10), [], 'nothing was created');
    } finally {
      await app.close();
    }
  });

  test('POST validates input: 400 with a clear message', async () => {
    const app = await startApp();
    const auth = { authorization: `Bearer ${token()}` };
    try {
      const missing = await post(app.url, '{}', auth);
      assert.equal(missing.status, 400);
      assert.deepEqual(await missing.json(), { error: 'name is required', details: ['name is required'] });

      const badJson = await post(app.url, '{"name": ', auth);
      assert.equal(badJson.status, 400);
      assert.deepEqual(await badJson.json(), { error: 'request body is not valid JSON' });

      const text = await fetch(`${app.url}/items`, {
        method: 'POST',
        body: 'name=x',
        headers: { 'content-type': 'text/plain', ...auth },
      });
      assert.equal(text.status, 400);
      assert.match(((await text.json()) as { error: string }).error, /must be a JSON object/);
    } finally {
      await app.close();
    }
  });

  test('POST creates (201 + Location), GET lists newest first and fetches by id', async () => {
    const app = await startApp();
    const auth = { authorization: `Bearer ${token()}` };
    try {
      const first = await post(app.url, JSON.stringify({ name: 'first' }), auth);
      assert.equal(first.status, 201);
      const a = (await first.json()) as { id: number; name: string; description: null };
      assert.equal(a.name, 'first');
      assert.equal(a.description, null);
      assert.equal(first.headers.get('location'), `/items/${a.id}`);

      const second = await post(app.url, JSON.stringify({ name: 'second', description: 'desc' }), auth);
      const b = (await second.json()) as { id: number };

      const list = (await (await fetch(`${app.url}/items`)).json()) as { items: Array<{ id: number }> };
      assert.deepEqual(
        list.items.map((i) => i.id),
        [b.id, a.id],
      );
      const limited = (await (await fetch(`${app.url}/items?limit=1`)).json()) as { items: unknown[] };
      assert.equal(limited.items.length, 1);

      const one = await fetch(`${app.url}/items/${b.id}`);
      assert.equal(one.status, 200);
      assert.equal(((await one.json()) as { description: string }).description, 'desc');

      assert.equal((await fetch(`${app.url}/items/999`)).status, 404);
      const badId = await fetch(`${app.url}/items/abc`);
      assert.equal(badId.status, 400);
      assert.deepEqual(await badId.json(), { error: 'id must be a positive integer', details: ['id must be a positive integer'] });
      assert.equal((await fetch(`${app.url}/items?limit=0`)).status, 400);
    } finally {
      await app.close();
    }
  });

  test('one access-log line per request with method, route, path, status, duration_ms', async () => {
    const app = await startApp();
    try {
      await (await fetch(`${app.url}/items/7?x=secret-query`)).text();
      await (await fetch(`${app.url}/health`)).text();
      const access = app.lines.filter((l) => l.msg === 'request');
      assert.equal(access.length, 2);
      assert.equal(access[0].method, 'GET');
      assert.equal(access[0].route, '/items/:id');
      assert.equal(access[0].path, '/items/7');
      assert.equal(access[0].status, 404);
      assert.equal(typeof access[0].duration_ms, 'number');
      assert.equal(access[0].level, 'info');
      assert.equal(access[1].route, '/health');
      assert.ok(!JSON.stringify(access).includes('secret-query'), 'query strings are not logged');
    } finally {
      await app.close();
    }
  });

  test('database errors become 500 without leaking details', async () => {
    const app = await startApp({
      items: {
        list: () => Promise.reject(new Error('connection to postgresql://u:pw123@db failed')),
        get: () => Promise.resolve(undefined),
        create: () => Promise.reject(new Error('nope')),
      },
    });
    try {
      const res = await fetch(`${app.url}/items`);
      assert.equal(res.status, 500);
      assert.deepEqual(await res.json(), { error: 'internal server error' });
      const failure = app.lines.find((l) => l.msg === 'request.failed');
      assert.ok(failure);
      assert.doesNotMatch(JSON.stringify(failure), /pw123/);
    } finally {
      await app.close();
    }
  });
});
