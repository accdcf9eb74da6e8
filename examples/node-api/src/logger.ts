import { redactUrlsInText } from './redact';

export const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const SEVERITY: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
  /** Resolves once every line written so far has been handed to the OS (call before process.exit). */
  flush(): Promise<void>;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** Fields added to every line. */
  base?: LogFields;
  /** Literal secret values scrubbed from every line (values shorter than 3 chars are ignored). */
  secrets?: string[];
  /** Where lines go; default process.stdout. Receives one complete line including "\n". */
  write?: (line: string) => void;
}

// Writes to stdout are tracked so that flush() can wait for them: stdout may be asynchronous
// (e.g. PM2 cluster workers write their stdout to log files through fs streams), and
// process.exit() would otherwise drop the last lines (the shutdown log).
let pendingWrites = 0;
let flushWaiters: Array<() => void> = [];

function writeStdout(line: string): void {
  pendingWrites += 1;
  process.stdout.write(line, 'utf8', () => {
    pendingWrites -= 1;
    if (pendingWrites === 0) {
      const waiters = flushWaiters;
      flushWaiters = [];
      for (const resolve of waiters) resolve();
    }
  });
}

function flushStdout(): Promise<void> {
  if (pendingWrites === 0) return Promise.resolve();
  return new Promise((resolve) => flushWaiters.push(resolve));
}

/** Serialises an Error without leaking anything but its useful parts. */
export function serializeError(err: unknown): LogFields {
  if (err instanceof Error) {
    const out: LogFields = { name: err.name, message: err.message };
    const code = (err as { code?: unknown }).code;
    if (code !== undefined) out.code = code;
    if (err instanceof AggregateError && err.errors.length > 0) {
      out.errors = err.errors.map((e) => serializeError(e));
    }
    if (err.stack) out.stack = err.stack;
    return out;
  }
  return { message: String(err) };
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Tiny JSON-lines logger: one line per event with timestamp, level, msg and fields.
 * Every line is scrubbed: credentials inside URLs and the registered secret values
 * are replaced by "***".
 */
export function createLogger(options: LoggerOptions = {}): Logger {
  const threshold = SEVERITY[options.level ?? 'info'];
  const base = options.base ?? {};
  const write = options.write ?? writeStdout;
  const flush = options.write ? () => Promise.resolve() : flushStdout;
  // Match both the raw value and its JSON-escaped form (lines are scrubbed after JSON.stringify).
  const secrets = [
    ...new Set(
      (options.secrets ?? [])
        .filter((s) => s.length >= 3)
        .flatMap((s) => [s, JSON.stringify(s).slice(1, -1)]),
    ),
  ].sort((a, b) => b.length - a.length);
  const secretPattern = secrets.length > 0 ? new RegExp(secrets.map(escapeRegExp).join('|'), 'g') : null;

  const scrub = (line: string): string => {
    let out = redactUrlsInText(line);
    if (secretPattern) out = out.replace(secretPattern, '***');
    return out;
  };

  const make = (bound: LogFields): Logger => {
    const emit = (level: Exclude<LogLevel, 'silent'>, msg: string, fields?: LogFields): void => {
      if (SEVERITY[level] < threshold) return;
      const record: LogFields = { timestamp: new Date().toISOString(), level, msg, ...bound };
      if (fields) {
        for (const [key, value] of Object.entries(fields)) {
          record[key] = value instanceof Error ? serializeError(value) : value;
        }
      }
      let line: string;
      try {
        line = JSON.stringify(record);
      } catch {
        line = JSON.stringify({ timestamp: record.timestamp, level, msg, log_error: 'unserializable fields' });
      }
      write(scrub(line) + '\n');
    };
    return {
      debug: (msg, fields) => emit('debug', msg, fields),
      info: (msg, fields) => emit('info', msg, fields),
      warn: (msg, fields) => emit('warn', msg, fields),
      error: (msg, fields) => emit('error', msg, fields),
      child: (fields) => make({ ...bound, ...fields }),
      flush,
    };
  };

  return make(base);
}
