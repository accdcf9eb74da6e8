import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';

import { createApp, type AppDeps } from '../src/app';
import type { Item, ItemsRepository, NewItem } from '../src/items';
import { createLogger, type Logger } from '../src/logger';
import { createMetrics } from '../src/metrics';

/** Root of the app (tests run from .test-dist/test/). */
export const APP_ROOT = path.resolve(__dirname, '..', '..');

export const TEST_SECRET = 'test-secret-0123456789-abcdefghijklmnop';

/** In-memory ItemsRepository. */
export function memoryRepo(): ItemsRepository & { rows: Item[] } {
  const rows: Item[] = [];
  let nextId = 1;
  let clock = Date.parse('2024-01-01T00:00:00Z');
  return {
    rows,
    list(limit) {
      return Promise.resolve([...rows].sort((a, b) => b.created_at.localeCompare(a.created_at)).slice(0, limit));
    },
    get(id) {
      return Promise.resolve(rows.find((r) => r.id === id));
    },
    create(item: NewItem) {
      clock += 1000;
      const row: Item = { id: nextId++, ...item, created_at: new Date(clock).toISOString() };
      rows.push(row);
      return Promise.resolve(row);
    },
  };
}

/** Logger that records parsed JSON lines instead of printing them. */
export function memoryLogger(): { logger: Logger; lines: Array<Record<string, unknown>>; raw: string[] } {
  const lines: Array<Record<string, unknown>> = [];
  const raw: string[] = [];
  const logger = createLogger({
    level: 'debug',
    write: (line) => {
      raw.push(line);
      lines.push(JSON.parse(line) as Record<string, unknown>);
    },
  });
  return { logger, lines, raw };
}

export interface RunningApp {
  url: string;
  port: number;
  server: http.Server;
  deps: AppDeps;
  lines: Array<Record<string, unknown>>;
  close(): Promise<void>;
}

export async function startApp(overrides: Partial<AppDeps> = {}): Promise<RunningApp> {
  const { logger, lines } = memoryLogger();
  const deps: AppDeps = {
    version: '9.9.9-test',
    jwtSecret: TEST_SECRET,
    healthCheckTimeoutMs: 200,
    logger,
    metrics: createMetrics(overrides.version ?? '9.9.9-test'),
    checkDatabase: () => Promise.resolve(),
    checkRedis: () => Promise.resolve(),
    items: memoryRepo(),
    ...overrides,
  };
  const server = http.createServer(createApp(deps));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    server,
    deps,
    lines,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
