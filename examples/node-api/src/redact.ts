/**
 * Helpers that keep secrets out of logs.
 */

const URL_CREDENTIALS = /([a-z][a-z0-9+.-]*:\/\/)([^:@/\s]*):([^@/\s]*)@/gi;

/** postgresql://user:secret@host/db -> postgresql://user:***@host/db (also for invalid URLs). */
export function redactUrl(raw: string): string {
  try {
    const url = new URL(raw);
    if (url.password !== '') url.password = '***';
    return url.toString();
  } catch {
    return raw.replace(URL_CREDENTIALS, '$1$2:***@');
  }
}

/** Replaces credentials of every URL embedded in a free-form string. */
export function redactUrlsInText(text: string): string {
  return text.replace(URL_CREDENTIALS, '$1$2:***@');
}

/** Returns the password of a connection URL (raw and decoded forms) so a logger can scrub it. */
export function secretsOfUrl(raw: string): string[] {
  try {
    const url = new URL(raw);
    if (url.password === '') return [];
    const out = new Set<string>([url.password]);
    try {
      out.add(decodeURIComponent(url.password));
    } catch {
      // malformed escape: the raw form is enough
    }
    return [...out];
  } catch {
    // not a WHATWG URL (e.g. postgresql://user:pw@/db?host=/socket): fall back to a pattern
    const match = /^[a-z][a-z0-9+.-]*:\/\/[^:@/\s]*:([^@/\s]+)@/i.exec(raw);
    if (!match) return [];
    const out = new Set<string>([match[1]]);
    try {
      out.add(decodeURIComponent(match[1]));
    } catch {
      // malformed escape: the raw form is enough
    }
    return [...out];
  }
}
