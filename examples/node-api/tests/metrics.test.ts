import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { startApp } from './helpers';

describe('GET /metrics', () => {
  test('exposes default metrics, the request histogram by route pattern and app_version_info', async () => {
    const app = await startApp({ version: '4.5.6' });
    try {
      const created = await app.deps.items.create({ name: 'x', description: null });
      assert.equal((await fetch(`${app.url}/items/${created.id}`)).status, 200);
      assert.equal((await fetch(`${app.url}/items/424242`)).status, 404);
      assert.equal((await fetch(`${app.url}/no/such/path`)).status, 404);

      const res = await fetch(`${app.url}/metrics`);
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
      const text = await res.text();

      // prom-client default metrics
      assert.match(text, /^process_cpu_user_seconds_total \d/m);
      assert.match(text, /^nodejs_heap_size_total_bytes \d/m);

      // the seed's histogram, labelled with the route pattern (never the raw URL)
      assert.match(text, /^# TYPE http_request_duration_seconds histogram$/m);
      const count = (labels: RegExp) =>
        text.split('\n').find((l) => l.startsWith('http_request_duration_seconds_count{') && labels.test(l));
      const ok = count(/method="GET",route="\/items\/:id",status_code="200"/);
      assert.ok(ok, text);
      assert.match(ok, / 1$/);
      assert.ok(count(/method="GET",route="\/items\/:id",status_code="404"/));
      assert.ok(count(/route="unmatched",status_code="404"/));
      assert.match(text, /http_request_duration_seconds_bucket\{le="0\.005",method="GET",route="\/items\/:id"/);
      assert.doesNotMatch(text, /route="\/items\/424242"/);
      assert.doesNotMatch(text, /no\/such\/path/);

      assert.match(text, /^app_version_info\{version="4\.5\.6"\} 1$/m);
    } finally {
      await app.close();
    }
  });
});
