import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';

import { LOG_LEVELS, type LogLevel } from './logger';

/** Variables that must be present (and non-empty) for the process to start. */
export const REQUIRED_ENV_VARS = ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET', 'NODE_ENV'] as const;

/**
 * Secrets that may instead be given as a file: NAME_FILE=/path (the Docker secrets convention, as in the
 * official postgres image). The file's content, without its trailing newline, is the value, so the secret
 * need not sit in the process environment (or in `docker inspect`). NAME itself wins when both are set.
 */
export const FILE_VARS = ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET'] as const;

export const NODE_ENVS = ['development', 'production', 'test'] as const;
export type NodeEnv = (typeof NODE_ENVS)[number];

export interface Config {
  env: NodeEnv;
  /** Main listening port (shared by all PM2 cluster workers). */
  port: number;
  /** Optional second port the same app listens on (used to probe one specific release/instance). */
  instancePort: number | undefined;
  /** Release version this process runs (APP_VERSION, default: package.json version). */
  version: string;
  shutdownTimeoutMs: number;
  /** How long idle keep-alive sockets stay open after the listeners closed (<= shutdownTimeoutMs). */
  shutdownIdleGraceMs: number;
  healthCheckTimeoutMs: number;
  logLevel: LogLevel;
  database: {
    url: string;
    maxConnections: number;
    statementTimeoutMs: number;
  };
  redis: {
    url: string;
  };
  jwt: {
    secret: string;
    expiresIn: string;
  };
  /** Non-fatal problems worth logging at startup. */
  warnings: string[];
}

/** Thrown when the environment is unusable. Lists every problem at once. */
export class ConfigError extends Error {
  readonly missing: string[];
  readonly invalid: string[];

  constructor(missing: string[], invalid: string[]) {
    const parts: string[] = [];
    if (missing.length > 0) parts.push(`missing required environment variables: ${missing.join(', ')}`);
    if (invalid.length > 0) parts.push(`invalid environment variables: ${invalid.join('; ')}`);
    super(parts.join('; '));
    this.name = 'ConfigError';
    this.missing = missing;
    this.invalid = invalid;
  }
}

/** Per-environment defaults (mirrors the seed's config.ts, without any hard-coded secret). */
const ENV_DEFAULTS: Record<NodeEnv, { maxConnections: number; jwtExpiresIn: string; logLevel: LogLevel }> = {
  development: { maxConnections: 5, jwtExpiresIn: '7d', logLevel: 'debug' },
  test: { maxConnections: 5, jwtExpiresIn: '7d', logLevel: 'info' },
  production: { maxConnections: 20, jwtExpiresIn: '1d', logLevel: 'info' },
};

const DEFAULT_PORT = 3000;
const DEFAULT_SHUTDOWN_TIMEOUT_MS = 10_000;
const DEFAULT_SHUTDOWN_IDLE_GRACE_MS = 1_000;
const DEFAULT_HEALTH_TIMEOUT_MS = 2_000;
const DEFAULT_STATEMENT_TIMEOUT_MS = 2_000;

type Env = Record<string, string | undefined>;

function isSet(value: string | undefined): value is string {
  return value !== undefined && value.trim() !== '';
}

/** Finds the version of the nearest package.json above this file. */
export function packageVersion(startDir: string = __dirname): string {
  let dir = startDir;
  for (;;) {
    const candidate = path.join(dir, 'package.json');
    if (existsSync(candidate)) {
      try {
        const pkg = JSON.parse(readFileSync(candidate, 'utf8')) as { version?: unknown };
        if (typeof pkg.version === 'string' && pkg.version !== '') return pkg.version;
      } catch {
        // unreadable package.json: keep looking upwards
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) return '0.0.0';
    dir = parent;
  }
}

/**
 * Builds the configuration from the environment. Validates everything first and
 * throws a single ConfigError naming every missing / invalid variable.
 * Never opens a connection.
 */
export function loadConfig(rawEnv: Env = process.env): Config {
  const invalid: string[] = [];
  const env: Env = { ...rawEnv };
  for (const name of FILE_VARS) {
    const file = rawEnv[`${name}_FILE`];
    if (isSet(env[name]) || !isSet(file)) continue;
    try {
      env[name] = readFileSync(file.trim(), 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      // The path is not secret; the content never appears in a message.
      invalid.push(`${name}_FILE: cannot read ${JSON.stringify(file.trim())} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
      env[name] = 'unreadable';
    }
  }
  const missing = REQUIRED_ENV_VARS.filter((name) => !isSet(env[name]));

  const intVar = (name: string, fallback: number, min: number, max: number): number => {
    const raw = env[name];
    if (!isSet(raw)) return fallback;
    const value = Number(raw.trim());
    if (!Number.isInteger(value) || value < min || value > max) {
      invalid.push(`${name} must be an integer between ${min} and ${max} (got ${JSON.stringify(raw)})`);
      return fallback;
    }
    return value;
  };

  const nodeEnvRaw = env.NODE_ENV?.trim();
  let nodeEnv: NodeEnv = 'production';
  if (isSet(nodeEnvRaw)) {
    if ((NODE_ENVS as readonly string[]).includes(nodeEnvRaw)) {
      nodeEnv = nodeEnvRaw as NodeEnv;
    } else {
      invalid.push(`NODE_ENV must be one of ${NODE_ENVS.join(', ')} (got ${JSON.stringify(nodeEnvRaw)})`);
    }
  }
  const defaults = ENV_DEFAULTS[nodeEnv];

  const port = intVar('PORT', DEFAULT_PORT, 0, 65535);
  const instancePort = isSet(env.INSTANCE_PORT) ? intVar('INSTANCE_PORT', 0, 1, 65535) : undefined;
  const shutdownTimeoutMs = intVar('SHUTDOWN_TIMEOUT_MS', DEFAULT_SHUTDOWN_TIMEOUT_MS, 0, 3_600_000);
  const shutdownIdleGraceMs = intVar('SHUTDOWN_IDLE_GRACE_MS', DEFAULT_SHUTDOWN_IDLE_GRACE_MS, 0, 3_600_000);
  const healthCheckTimeoutMs = intVar('HEALTH_CHECK_TIMEOUT_MS', DEFAULT_HEALTH_TIMEOUT_MS, 1, 60_000);
  const statementTimeoutMs = intVar('DB_STATEMENT_TIMEOUT_MS', DEFAULT_STATEMENT_TIMEOUT_MS, 1, 3_600_000);
  const maxConnections = intVar('DB_MAX_CONNECTIONS', defaults.maxConnections, 1, 1000);

  let logLevel = defaults.logLevel;
  if (isSet(env.LOG_LEVEL)) {
    const level = env.LOG_LEVEL.trim().toLowerCase();
    if ((LOG_LEVELS as readonly string[]).includes(level)) logLevel = level as LogLevel;
    else invalid.push(`LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')} (got ${JSON.stringify(env.LOG_LEVEL)})`);
  }

  // Never echo these values: they may contain a password.
  // pg accepts URLs that WHATWG URL rejects (e.g. a Unix socket: postgresql://user@/db?host=/run/pg),
  // so only the scheme is checked; node-redis parses REDIS_URL with URL, so it must parse.
  if (isSet(env.DATABASE_URL) && !/^postgres(ql)?:\/\//i.test(env.DATABASE_URL.trim())) {
    invalid.push('DATABASE_URL must be a postgres:// or postgresql:// URL');
  }
  if (isSet(env.REDIS_URL)) {
    let protocol = '';
    try {
      protocol = new URL(env.REDIS_URL.trim()).protocol;
    } catch {
      // reported below
    }
    if (protocol !== 'redis:' && protocol !== 'rediss:') invalid.push('REDIS_URL must be a redis:// or rediss:// URL');
  }

  if (missing.length > 0 || invalid.length > 0) throw new ConfigError([...missing], invalid);

  const warnings: string[] = [];
  const secret = env.JWT_SECRET as string;
  if (nodeEnv === 'production' && secret.length < 32) {
    warnings.push('JWT_SECRET is shorter than 32 characters; use a long random secret in production');
  }
  if (instancePort !== undefined && instancePort === port) {
    warnings.push('INSTANCE_PORT equals PORT; the second listener is disabled');
  }

  return {
    env: nodeEnv,
    port,
    instancePort: instancePort !== undefined && instancePort !== port ? instancePort : undefined,
    version: isSet(env.APP_VERSION) ? env.APP_VERSION.trim() : packageVersion(),
    shutdownTimeoutMs,
    shutdownIdleGraceMs: Math.min(shutdownIdleGraceMs, shutdownTimeoutMs),
    healthCheckTimeoutMs,
    logLevel,
    database: {
      url: env.DATABASE_URL as string,
      maxConnections,
      statementTimeoutMs,
    },
    redis: {
      url: env.REDIS_URL as string,
    },
    jwt: {
      secret,
      expiresIn: defaults.jwtExpiresIn,
    },
    warnings,
  };
}
