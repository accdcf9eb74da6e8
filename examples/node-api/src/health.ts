/** A dependency check: resolves when the dependency is usable, rejects otherwise. */
export type HealthChecker = () => Promise<unknown>;

export type CheckStatus = 'ok' | 'error';

/** Exactly the seed's contract plus `version`. No other fields. */
export interface HealthBody {
  uptime: number;
  timestamp: number;
  database: CheckStatus;
  redis: CheckStatus;
  version: string;
}

export interface HealthResult {
  statusCode: 200 | 503;
  body: HealthBody;
  /** Failure reasons, for logging only (never part of the response). */
  failures: Record<string, string>;
}

export class TimeoutError extends Error {
  constructor(label: string, ms: number) {
    super(`${label} timed out after ${ms} ms`);
    this.name = 'TimeoutError';
  }
}

/** Resolves/rejects like `promise`, or rejects with TimeoutError after `ms`. */
export function withTimeout<T>(promise: Promise<T>, ms: number, label = 'operation'): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(label, ms)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function runCheck(name: string, check: HealthChecker, timeoutMs: number): Promise<[CheckStatus, string?]> {
  try {
    // Promise.resolve().then(...) also turns a synchronous throw into a rejection.
    await withTimeout(Promise.resolve().then(check), timeoutMs, `${name} check`);
    return ['ok'];
  } catch (err) {
    return ['error', err instanceof Error ? err.message : String(err)];
  }
}

export interface HealthDeps {
  checkDatabase: HealthChecker;
  checkRedis: HealthChecker;
  timeoutMs: number;
  version: string;
  uptime?: () => number;
  now?: () => number;
}

/** Runs both checks concurrently, each bounded by timeoutMs, so this never hangs. */
export async function runHealthChecks(deps: HealthDeps): Promise<HealthResult> {
  const [[database, dbError], [redis, redisError]] = await Promise.all([
    runCheck('database', deps.checkDatabase, deps.timeoutMs),
    runCheck('redis', deps.checkRedis, deps.timeoutMs),
  ]);
  const failures: Record<string, string> = {};
  if (dbError !== undefined) failures.database = dbError;
  if (redisError !== undefined) failures.redis = redisError;
  const body: HealthBody = {
    uptime: (deps.uptime ?? process.uptime)(),
    timestamp: (deps.now ?? Date.now)(),
    database,
    redis,
    version: deps.version,
  };
  return { statusCode: database === 'ok' && redis === 'ok' ? 200 : 503, body, failures };
}
