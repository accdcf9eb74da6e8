import http from 'node:http';
import type { AddressInfo } from 'node:net';

import { Pool } from 'pg';
import { createClient } from 'redis';

import { createApp } from './app';
import { ConfigError, loadConfig, type Config } from './config';
import { withTimeout } from './health';
import { pgItemsRepository } from './items';
import { createLogger, type Logger } from './logger';
import { createMetrics } from './metrics';
import { redactUrl, secretsOfUrl } from './redact';
import { gracefulShutdown } from './shutdown';

/** sysexits(3) EX_CONFIG: the release tool can tell "bad configuration" from a crash. */
export const EXIT_CONFIG = 78;

/** Exits once the log lines written so far are out (bounded, so exit is never blocked). */
async function exitAfterFlush(logger: Logger, code: number): Promise<never> {
  await withTimeout(logger.flush(), 1000, 'log flush').catch(() => undefined);
  process.exit(code);
}

function listen(server: http.Server, port: number, logger: Logger, name: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => {
      logger.error('server.listen_failed', { listener: name, port, err });
      reject(err);
    };
    server.once('error', onError);
    server.listen(port, () => {
      server.off('error', onError);
      resolve((server.address() as AddressInfo).port);
    });
  });
}

async function run(config: Config, logger: Logger): Promise<void> {
  for (const warning of config.warnings) logger.warn('config.warning', { warning });
  logger.info('config.loaded', {
    node_env: config.env,
    version: config.version,
    port: config.port,
    instance_port: config.instancePort ?? null,
    database_url: redactUrl(config.database.url),
    redis_url: redactUrl(config.redis.url),
    db_max_connections: config.database.maxConnections,
    health_check_timeout_ms: config.healthCheckTimeoutMs,
    shutdown_timeout_ms: config.shutdownTimeoutMs,
    shutdown_idle_grace_ms: config.shutdownIdleGraceMs,
  });

  const pool = new Pool({
    connectionString: config.database.url,
    max: config.database.maxConnections,
    connectionTimeoutMillis: config.healthCheckTimeoutMs,
    idleTimeoutMillis: 30_000,
    statement_timeout: config.database.statementTimeoutMs,
    // client-side bound too, for a server that stops answering altogether
    query_timeout: config.database.statementTimeoutMs + 1000,
    application_name: `node-api@${config.version}`,
  });
  pool.on('error', (err) => logger.warn('db.idle_client_error', { err }));

  let redisState: 'connecting' | 'ready' | 'down' = 'connecting';
  const redis = createClient({
    url: config.redis.url,
    // Fail commands immediately while disconnected instead of queueing them.
    disableOfflineQueue: true,
    socket: {
      connectTimeout: config.healthCheckTimeoutMs,
      reconnectStrategy: (retries: number) => Math.min(100 * 2 ** Math.min(retries, 5), 2000),
    },
  });
  redis.on('ready', () => {
    if (redisState !== 'ready') logger.info('redis.ready', { redis_url: redactUrl(config.redis.url) });
    redisState = 'ready';
  });
  redis.on('error', (err: Error) => {
    // Log state changes only: a reconnect loop would otherwise flood the log.
    if (redisState !== 'down') logger.warn('redis.error', { err, redis_url: redactUrl(config.redis.url) });
    redisState = 'down';
  });
  redis.on('reconnecting', () => logger.debug('redis.reconnecting'));
  const redisConnected = redis.connect().then(
    () => true,
    (err: unknown) => {
      logger.warn('redis.connect_failed', { err });
      return false;
    },
  );

  let shuttingDown = false;
  const app = createApp({
    version: config.version,
    jwtSecret: config.jwt.secret,
    healthCheckTimeoutMs: config.healthCheckTimeoutMs,
    logger,
    metrics: createMetrics(config.version),
    checkDatabase: () => pool.query('SELECT 1'),
    checkRedis: async () => {
      if (!redis.isReady) throw new Error('redis client is not connected');
      const reply = await redis.ping();
      if (reply !== 'PONG') throw new Error(`unexpected PING reply ${reply}`);
    },
    items: pgItemsRepository(pool),
    isShuttingDown: () => shuttingDown,
  });

  // Give dependencies a short chance to come up so the first /health is meaningful;
  // never block startup on them (/health reports them as 'error' meanwhile).
  const [db, red] = await Promise.all([
    withTimeout(pool.query('SELECT 1'), config.healthCheckTimeoutMs, 'database warm-up').then(
      () => 'ok',
      (err: unknown) => {
        logger.warn('db.unavailable_at_startup', { err });
        return 'error';
      },
    ),
    withTimeout(redisConnected, config.healthCheckTimeoutMs, 'redis connect').then(
      (ok) => (ok ? 'ok' : 'error'),
      () => 'error',
    ),
  ]);
  logger.info('dependencies.checked', { database: db, redis: red });

  const servers: http.Server[] = [];
  const listeners: Array<{ name: string; port: number }> = [{ name: 'main', port: config.port }];
  if (config.instancePort !== undefined) listeners.push({ name: 'instance', port: config.instancePort });
  const bound: Record<string, number> = {};
  try {
    for (const l of listeners) {
      const server = http.createServer(app);
      servers.push(server);
      bound[l.name] = await listen(server, l.port, logger, l.name);
    }
  } catch {
    await Promise.allSettled([pool.end(), redis.isOpen ? redis.disconnect() : Promise.resolve()]);
    await exitAfterFlush(logger, 1);
  }
  logger.info('server.listening', {
    port: bound.main,
    instance_port: bound.instance ?? null,
    version: config.version,
    pid: process.pid,
  });
  if (typeof process.send === 'function') {
    // PM2 wait_ready / any parent that forked us with an IPC channel.
    process.send('ready');
    logger.info('server.ready_sent');
  }

  const onSignal = (signal: NodeJS.Signals) => {
    if (shuttingDown) {
      logger.warn('shutdown.signal_ignored', { signal, reason: 'shutdown already in progress' });
      return;
    }
    shuttingDown = true;
    logger.info('shutdown.start', { signal, timeout_ms: config.shutdownTimeoutMs });
    void gracefulShutdown({
      servers,
      timeoutMs: config.shutdownTimeoutMs,
      idleGraceMs: config.shutdownIdleGraceMs,
      logger,
      resources: [
        { name: 'postgres', close: () => pool.end() },
        {
          name: 'redis',
          close: async () => {
            if (redis.isReady) await redis.quit();
            else if (redis.isOpen) await redis.disconnect();
          },
        },
      ],
    }).then(() => exitAfterFlush(logger, 0));
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}

function main(): void {
  let config: Config;
  try {
    config = loadConfig(process.env);
  } catch (err) {
    const logger = createLogger({ base: { pid: process.pid } });
    if (err instanceof ConfigError) {
      logger.error('config.invalid', { missing: err.missing, invalid: err.invalid, error: err.message });
    } else {
      logger.error('config.failed', { err });
    }
    process.exitCode = EXIT_CONFIG;
    return;
  }

  const logger = createLogger({
    level: config.logLevel,
    base: { pid: process.pid, version: config.version },
    secrets: [config.jwt.secret, ...secretsOfUrl(config.database.url), ...secretsOfUrl(config.redis.url)],
  });
  process.on('unhandledRejection', (reason) => {
    logger.error('process.unhandled_rejection', { err: reason });
    void exitAfterFlush(logger, 1);
  });
  process.on('uncaughtException', (err) => {
    logger.error('process.uncaught_exception', { err });
    void exitAfterFlush(logger, 1);
  });
  run(config, logger).catch((err: unknown) => {
    logger.error('server.start_failed', { err });
    void exitAfterFlush(logger, 1);
  });
}

if (require.main === module) main();
