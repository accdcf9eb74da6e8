import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';

import { signJwt } from '../src/jwt';
import { secretsOfUrl } from '../src/redact';
import { APP_ROOT } from './helpers';

const DATABASE_URL = process.env.TEST_DATABASE_URL;
const REDIS_URL = process.env.TEST_REDIS_URL;
const SKIP =
  DATABASE_URL && REDIS_URL
    ? false
    : 'TEST_DATABASE_URL and TEST_REDIS_URL are not set; skipping the PostgreSQL/Redis integration test';

async function freePort(): Promise<number> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

test('integration: migrations, then the built server against real PostgreSQL and Redis', { skip: SKIP, timeout: 60_000 }, async () => {
  const secret = `it-secret-${process.pid}-0123456789abcdef`;

  // 1. migrations, exactly like `npm run migrate`
  const migrate = spawnSync(
    process.execPath,
    [
      path.join(APP_ROOT, 'node_modules', 'node-pg-migrate', 'bin', 'node-pg-migrate.js'),
      'up',
      '--migrations-dir',
      'migrations',
      '--migrations-table',
      'pgmigrations',
      '--single-transaction',
    ],
    { cwd: APP_ROOT, env: { ...process.env, DATABASE_URL }, encoding: 'utf8', timeout: 30_000 },
  );
  assert.equal(migrate.status, 0, `migrations failed:\n${migrate.stdout}\n${migrate.stderr}`);

  // 2. start the server (compiled from the same sources) and wait for its 'ready' IPC message
  const [port, instancePort] = [await freePort(), await freePort()];
  const child = spawn(process.execPath, [path.join(APP_ROOT, '.test-dist', 'src', 'server.js')], {
    cwd: APP_ROOT,
    env: {
      PATH: process.env.PATH,
      NODE_ENV: 'test',
      DATABASE_URL,
      REDIS_URL,
      JWT_SECRET: secret,
      PORT: String(port),
      INSTANCE_PORT: String(instancePort),
      APP_VERSION: '9.9.9-integration',
      SHUTDOWN_TIMEOUT_MS: '5000',
    },
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
  });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;

  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no 'ready' within 15 s:\n${output}`)), 15_000);
      child.on('message', (msg) => {
        if (msg === 'ready') {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`server exited with ${code}:\n${output}`));
      });
    });

    // 3. health on both listeners
    for (const p of [port, instancePort]) {
      const res = await fetch(`http://127.0.0.1:${p}/health`);
      const body = (await res.json()) as Record<string, unknown>;
      assert.equal(res.status, 200, JSON.stringify(body));
      assert.equal(body.database, 'ok');
      assert.equal(body.redis, 'ok');
      assert.equal(body.version, '9.9.9-integration');
    }

    // 4. POST then GET an item
    const name = `integration-${Date.now()}`;
    const created = await fetch(`http://127.0.0.1:${port}/items`, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        authorization: `Bearer ${signJwt({ sub: 'it' }, secret, { expiresIn: '5m' })}`,
      },
      body: JSON.stringify({ name, description: 'from the integration test' }),
    });
    assert.equal(created.status, 201);
    const item = (await created.json()) as { id: number; name: string; description: string; created_at: string };
    assert.equal(item.name, name);
    assert.ok(Number.isInteger(item.id) && item.id > 0);

    const fetched = await fetch(`http://127.0.0.1:${port}/items/${item.id}`);
    assert.equal(fetched.status, 200);
    assert.deepEqual(await fetched.json(), item);

    const list = (await (await fetch(`http://127.0.0.1:${port}/items?limit=5`)).json()) as { items: Array<{ id: number }> };
    assert.equal(list.items[0].id, item.id, 'newest item first');

    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(metrics, /http_request_duration_seconds_count\{method="POST",route="\/items",status_code="201"\} 1/);
    assert.match(metrics, /app_version_info\{version="9\.9\.9-integration"\} 1/);

    // 5. graceful stop
    child.kill('SIGTERM');
    const [code] = await exited;
    assert.equal(code, 0, output);
    assert.match(output, /"msg":"shutdown.complete"/);
    assert.ok(!output.includes(secret), 'JWT secret leaked into the logs');
    for (const password of [...secretsOfUrl(DATABASE_URL as string), ...secretsOfUrl(REDIS_URL as string)]) {
      if (password.length >= 3) assert.ok(!output.includes(password), 'a connection password leaked into the logs');
    }
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
});
