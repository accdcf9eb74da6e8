import client from 'prom-client';

export interface Metrics {
  registry: client.Registry;
  httpRequestDuration: client.Histogram<'method' | 'route' | 'status_code'>;
  appVersionInfo: client.Gauge<'version'>;
}

/**
 * One registry per app instance (no global state, so tests can build several apps):
 * default process/Node.js metrics, the seed's request-duration histogram and
 * app_version_info{version="..."} 1.
 */
export function createMetrics(version: string): Metrics {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry });

  const httpRequestDuration = new client.Histogram({
    name: 'http_request_duration_seconds',
    help: 'Duration of HTTP requests in seconds',
    labelNames: ['method', 'route', 'status_code'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });

  const appVersionInfo = new client.Gauge({
    name: 'app_version_info',
    help: 'Release version of the running application (value is always 1)',
    labelNames: ['version'] as const,
    registers: [registry],
  });
  appVersionInfo.set({ version }, 1);

  return { registry, httpRequestDuration, appVersionInfo };
}
