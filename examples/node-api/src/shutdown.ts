import type { Server } from 'node:http';
import net from 'node:net';

import type { Logger } from './logger';

export interface CloseStep {
  name: string;
  close: () => Promise<unknown>;
}

export interface GracefulShutdownOptions {
  servers: Server[];
  timeoutMs: number;
  logger: Logger;
  /** Resources closed (in order) after HTTP has drained, e.g. the pg pool and the Redis client. */
  resources?: CloseStep[];
  /** Called first, before any listener closes (flips the `Connection: close` switch). */
  onStart?: () => void;
  /**
   * How long idle keep-alive sockets are left open after the listeners closed. A client
   * that sends its next request on such a socket within this window gets a normal answer
   * with `Connection: close` instead of a reset (closing an idle socket races with a
   * request the client may be sending at that very moment). Capped at timeoutMs.
   */
  idleGraceMs?: number;
  /** How often idle keep-alive sockets are swept after the grace window. */
  sweepIntervalMs?: number;
  /** Per-resource close timeout. */
  resourceTimeoutMs?: number;
}

export interface ShutdownOutcome {
  /** true when in-flight requests had to be cut after timeoutMs. */
  forced: boolean;
  durationMs: number;
}

/**
 * Stops accepting new connections; resolves once every connection of this server is closed.
 * Uses net.Server#close on purpose: http.Server#close (Node >= 19) would also drop the idle
 * keep-alive sockets at once, before the idle grace window below.
 */
function stopAccepting(server: Server): Promise<void> {
  return new Promise((resolve) => {
    net.Server.prototype.close.call(server, () => resolve());
  });
}

/** Rejects after `ms` unless `promise` settles first; never leaves a timer behind. */
function bounded<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * 1. stop accepting connections on every listener,
 * 2. answer in-flight requests and requests arriving on open keep-alive sockets
 *    (their responses carry `Connection: close`, set by the app while shutting down),
 * 3. after idleGraceMs call server.closeIdleConnections() and keep sweeping idle sockets,
 * 4. after timeoutMs force-close whatever is left,
 * 5. close the remaining resources (pg pool, Redis client).
 * Every phase is logged. Never throws.
 */
export async function gracefulShutdown(options: GracefulShutdownOptions): Promise<ShutdownOutcome> {
  const { servers, timeoutMs, logger } = options;
  const started = Date.now();
  options.onStart?.();

  const drained = Promise.all(servers.map(stopAccepting));
  logger.info('shutdown.listeners_closed', { listeners: servers.length });

  const idleGraceMs = Math.min(options.idleGraceMs ?? 1000, timeoutMs);
  let sweep: NodeJS.Timeout | undefined;
  const graceTimer = setTimeout(() => {
    for (const server of servers) server.closeIdleConnections();
    logger.info('shutdown.idle_connections_closed', { idle_grace_ms: idleGraceMs });
    // Connections busy until now become idle after their `Connection: close` response;
    // keep sweeping so none lingers until keepAliveTimeout.
    sweep = setInterval(() => {
      for (const server of servers) server.closeIdleConnections();
    }, options.sweepIntervalMs ?? 100);
  }, idleGraceMs);

  let forced = false;
  let forceTimer: NodeJS.Timeout | undefined;
  const force = new Promise<void>((resolve) => {
    forceTimer = setTimeout(() => {
      forced = true;
      logger.warn('shutdown.timeout', { timeout_ms: timeoutMs, action: 'closing remaining connections' });
      for (const server of servers) server.closeAllConnections();
      resolve();
    }, timeoutMs);
  });

  await Promise.race([drained, force]);
  clearTimeout(forceTimer);
  // After a forced close the servers' close callbacks follow right away.
  await bounded(drained, 1000, 'closing the listeners').catch((err: unknown) =>
    logger.warn('shutdown.listeners_close_slow', { err }),
  );
  clearTimeout(graceTimer);
  clearInterval(sweep);
  logger.info('shutdown.http_drained', { forced, duration_ms: Date.now() - started });

  for (const resource of options.resources ?? []) {
    try {
      await bounded(resource.close(), options.resourceTimeoutMs ?? 5000, `closing ${resource.name}`);
      logger.info('shutdown.resource_closed', { resource: resource.name });
    } catch (err) {
      logger.warn('shutdown.resource_close_failed', { resource: resource.name, err });
    }
  }

  const durationMs = Date.now() - started;
  logger.info('shutdown.complete', { forced, duration_ms: durationMs });
  return { forced, durationMs };
}
