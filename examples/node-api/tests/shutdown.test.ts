import assert from 'node:assert/strict';
import http from 'node:http';
import { describe, test } from 'node:test';

import { memoryLogger, memoryRepo, sleep, startApp } from './helpers';
import { gracefulShutdown } from '../src/shutdown';

interface Reply {
  status: number;
  connection: string | undefined;
  body: string;
  reusedSocket: boolean;
}

function get(port: number, path: string, agent: http.Agent | false): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, connection: res.headers.connection, body, reusedSocket: req.reusedSocket }),
      );
    });
    req.on('error', reject);
  });
}

/** Items repository whose list() takes `ms` (or never resolves when ms is Infinity). */
function slowRepo(ms: number) {
  const repo = memoryRepo();
  repo.list = () =>
    Number.isFinite(ms) ? sleep(ms).then(() => []) : new Promise<never>(() => undefined);
  return repo;
}

describe('graceful shutdown', () => {
  test('answers in-flight and keep-alive requests with Connection: close, refuses new connections', async () => {
    let shuttingDown = false;
    const app = await startApp({ items: slowRepo(400), isShuttingDown: () => shuttingDown });
    const busyAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const idleAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const { logger, lines } = memoryLogger();
    const closed: string[] = [];
    try {
      const warm = await get(app.port, '/health', idleAgent);
      assert.equal(warm.status, 200);
      assert.equal(warm.connection, 'keep-alive');

      const inFlight = get(app.port, '/items', busyAgent);
      await sleep(50);
      const shutdown = gracefulShutdown({
        servers: [app.server],
        timeoutMs: 3000,
        idleGraceMs: 300,
        logger,
        onStart: () => (shuttingDown = true),
        resources: [
          { name: 'postgres', close: () => Promise.resolve(closed.push('postgres')) },
          { name: 'redis', close: () => Promise.resolve(closed.push('redis')) },
        ],
      });

      // no new connections
      await assert.rejects(get(app.port, '/health', false), { code: 'ECONNREFUSED' });

      // a request on an already-open keep-alive connection is still answered, and told to close
      const onIdle = await get(app.port, '/health', idleAgent);
      assert.equal(onIdle.reusedSocket, true);
      assert.equal(onIdle.status, 200);
      assert.equal(onIdle.connection, 'close');

      // the in-flight request completes normally
      const slow = await inFlight;
      assert.equal(slow.status, 200);
      assert.deepEqual(JSON.parse(slow.body), { items: [] });
      assert.equal(slow.connection, 'close');

      const outcome = await shutdown;
      assert.equal(outcome.forced, false);
      assert.ok(outcome.durationMs < 3000, `took ${outcome.durationMs} ms`);
      assert.deepEqual(closed, ['postgres', 'redis']);
      assert.deepEqual(
        lines.map((l) => l.msg),
        [
          'shutdown.listeners_closed',
          'shutdown.idle_connections_closed',
          'shutdown.http_drained',
          'shutdown.resource_closed',
          'shutdown.resource_closed',
          'shutdown.complete',
        ],
      );
      assert.equal(app.server.listening, false);
    } finally {
      busyAgent.destroy();
      idleAgent.destroy();
      await app.close();
    }
  });

  test('idle keep-alive connections are closed after the grace window', async () => {
    const app = await startApp();
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const { logger, lines } = memoryLogger();
    try {
      await get(app.port, '/health', agent);
      const started = Date.now();
      const outcome = await gracefulShutdown({ servers: [app.server], timeoutMs: 5000, idleGraceMs: 200, logger });
      const elapsed = Date.now() - started;
      assert.equal(outcome.forced, false);
      assert.ok(elapsed >= 190 && elapsed < 2000, `took ${elapsed} ms`);
      assert.ok(lines.some((l) => l.msg === 'shutdown.idle_connections_closed'));
    } finally {
      agent.destroy();
      await app.close();
    }
  });

  test('force-closes requests still running after the timeout', async () => {
    const app = await startApp({ items: slowRepo(Infinity) });
    const { logger, lines } = memoryLogger();
    try {
      const stuck = get(app.port, '/items', false);
      await sleep(50);
      const started = Date.now();
      const outcome = await gracefulShutdown({ servers: [app.server], timeoutMs: 300, idleGraceMs: 100, logger });
      const elapsed = Date.now() - started;
      assert.equal(outcome.forced, true);
      assert.ok(elapsed >= 290 && elapsed < 2000, `took ${elapsed} ms`);
      await assert.rejects(stuck, { code: 'ECONNRESET' });
      assert.ok(lines.some((l) => l.msg === 'shutdown.timeout'));
    } finally {
      await app.close();
    }
  });
});
