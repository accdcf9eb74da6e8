import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';

import { runHealthChecks, type HealthChecker } from './health';
import { parseId, parseLimit, validateNewItem, type ItemsRepository } from './items';
import { JwtError, verifyJwt } from './jwt';
import type { Logger } from './logger';
import type { Metrics } from './metrics';

export interface AppDeps {
  version: string;
  jwtSecret: string;
  healthCheckTimeoutMs: number;
  logger: Logger;
  metrics: Metrics;
  checkDatabase: HealthChecker;
  checkRedis: HealthChecker;
  items: ItemsRepository;
  /** True once graceful shutdown started: every response then carries `Connection: close`. */
  isShuttingDown?: () => boolean;
}

/** Route label for metrics/logs: the matched route pattern, never the raw URL. */
function routeOf(req: Request): string {
  const route = (req.route as { path?: unknown } | undefined)?.path;
  if (typeof route === 'string') return `${req.baseUrl}${route}`;
  return 'unmatched';
}

function requireBearer(secret: string): RequestHandler {
  return (req, res, next) => {
    const header = req.get('authorization') ?? '';
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    if (!match) {
      res.set('WWW-Authenticate', 'Bearer').status(401).json({ error: 'missing bearer token' });
      return;
    }
    try {
      res.locals.auth = verifyJwt(match[1], secret);
      next();
    } catch (err) {
      const message = err instanceof JwtError ? err.message : 'invalid token';
      res.set('WWW-Authenticate', 'Bearer error="invalid_token"').status(401).json({ error: message });
    }
  };
}

export function createApp(deps: AppDeps): express.Express {
  const { logger, metrics } = deps;
  const isShuttingDown = deps.isShuttingDown ?? (() => false);
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);

  // Metrics + access log + shutdown behaviour for every request.
  app.use((req, res, next) => {
    const start = process.hrtime.bigint();
    // Which release answered: lets load tests and operators see a rollout progress request by request.
    res.setHeader('X-App-Version', deps.version);
    // Decided when the headers go out, so requests that were already in flight when the
    // shutdown began also tell their keep-alive client to close the connection.
    const writeHead = res.writeHead.bind(res) as (...a: unknown[]) => Response;
    res.writeHead = ((...args: unknown[]) => {
      if (isShuttingDown()) res.setHeader('Connection', 'close');
      return writeHead(...args);
    }) as typeof res.writeHead;
    let done = false;
    const finish = (aborted: boolean) => {
      if (done) return;
      done = true;
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const route = routeOf(req);
      const status = aborted && !res.headersSent ? 499 : res.statusCode;
      metrics.httpRequestDuration.observe({ method: req.method, route, status_code: String(status) }, seconds);
      logger.info('request', {
        method: req.method,
        route,
        path: req.originalUrl.split('?')[0],
        status,
        duration_ms: Math.round(seconds * 1e6) / 1e3,
        ...(aborted ? { aborted: true } : {}),
      });
    };
    res.on('finish', () => finish(false));
    res.on('close', () => finish(!res.writableFinished));
    next();
  });

  app.use(express.json({ limit: '100kb' }));

  app.get('/health', async (_req, res) => {
    const result = await runHealthChecks({
      checkDatabase: deps.checkDatabase,
      checkRedis: deps.checkRedis,
      timeoutMs: deps.healthCheckTimeoutMs,
      version: deps.version,
    });
    if (result.statusCode !== 200) logger.warn('health.degraded', { failures: result.failures });
    res.set('Cache-Control', 'no-store').status(result.statusCode).json(result.body);
  });

  app.get('/metrics', async (_req, res) => {
    res.set('Content-Type', metrics.registry.contentType);
    res.end(await metrics.registry.metrics());
  });

  app.get('/items', async (req, res) => {
    const limit = parseLimit(req.query.limit);
    if (!limit.ok) {
      res.status(400).json({ error: limit.errors.join('; '), details: limit.errors });
      return;
    }
    res.json({ items: await deps.items.list(limit.value) });
  });

  app.get('/items/:id', async (req, res) => {
    const id = parseId(req.params.id);
    if (!id.ok) {
      res.status(400).json({ error: id.errors.join('; '), details: id.errors });
      return;
    }
    const item = await deps.items.get(id.value);
    if (!item) {
      res.status(404).json({ error: `item ${id.value} not found` });
      return;
    }
    res.json(item);
  });

  app.post('/items', requireBearer(deps.jwtSecret), async (req, res) => {
    const input = validateNewItem(req.body);
    if (!input.ok) {
      res.status(400).json({ error: input.errors.join('; '), details: input.errors });
      return;
    }
    const item = await deps.items.create(input.value);
    res.status(201).location(`/items/${item.id}`).json(item);
  });

  app.use((_req, res) => {
    res.status(404).json({ error: 'not found' });
  });

  // Express 5 forwards rejected promises from async handlers here.
  app.use((err: unknown, req: Request, res: Response, next: NextFunction) => {
    if (res.headersSent) {
      next(err);
      return;
    }
    const type = (err as { type?: unknown } | null)?.type;
    if (type === 'entity.parse.failed') {
      res.status(400).json({ error: 'request body is not valid JSON' });
      return;
    }
    if (type === 'entity.too.large') {
      res.status(413).json({ error: 'request body too large' });
      return;
    }
    const status = (err as { status?: unknown } | null)?.status;
    if (typeof status === 'number' && status >= 400 && status < 500) {
      res.status(status).json({ error: (err as Error).message });
      return;
    }
    logger.error('request.failed', { method: req.method, route: routeOf(req), err });
    res.status(500).json({ error: 'internal server error' });
  });

  return app;
}
