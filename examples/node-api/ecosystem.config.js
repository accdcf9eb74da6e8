'use strict';
/**
 * PM2 ecosystem file: cluster mode, zero-downtime `pm2 reload`.
 *
 *   NODE_ENV=production APP_VERSION=1.4.0 DATABASE_URL=... REDIS_URL=... JWT_SECRET=... \
 *     pm2 start ecosystem.config.js
 *   APP_VERSION=1.5.0 pm2 reload ecosystem.config.js --update-env
 *
 * IMPORTANT: there is deliberately NO `env` block (and no `env_production` block either).
 * PM2 merges an ecosystem `env` block over the process environment on every start *and*
 * reload, so a value written here silently wins over `pm2 reload ... --update-env`: a
 * release would keep reporting the old APP_VERSION, or keep old credentials/PORT, with no
 * error. The same happens with `env_<name>` blocks: with PM2 7.0.4,
 * `APP_VERSION=X pm2 reload ecosystem.config.js --env production --update-env` replaced the
 * process env with the `env_production` block and the workers kept the old APP_VERSION
 * (verified; without the block the new value is applied). So NODE_ENV, APP_VERSION,
 * DATABASE_URL, REDIS_URL, JWT_SECRET, PORT, INSTANCE_PORT... all come from the environment
 * of the `pm2` command (the app refuses to start when a required one is missing).
 *
 * Knobs read here (when the pm2 command runs; they are not passed to the app):
 *   PM2_APP_NAME         process name (default "api")
 *   PM2_INSTANCES        number of cluster workers (default "max" = one per CPU)
 *   PM2_CWD              working directory (default: this file's directory)
 *   SHUTDOWN_TIMEOUT_MS  the app's drain timeout; kill_timeout is kept 5 s above it
 */

function instances() {
  const raw = process.env.PM2_INSTANCES;
  if (!raw || raw === 'max') return 'max';
  const n = Number(raw);
  return Number.isInteger(n) && n !== 0 ? n : 'max';
}

const shutdownTimeoutMs = Number(process.env.SHUTDOWN_TIMEOUT_MS) || 10000;

module.exports = {
  apps: [
    {
      name: process.env.PM2_APP_NAME || 'api',
      // Working directory; script is resolved against it. Default: this file's directory, so
      // `pm2 start /path/to/ecosystem.config.js` works from any cwd. Set PM2_CWD to a stable
      // symlink (e.g. /srv/api/current) when releases live in separate directories: PM2 keeps
      // the resolved script path across `pm2 reload`, and __dirname is already symlink-resolved.
      cwd: process.env.PM2_CWD || __dirname,
      script: 'dist/server.js',
      instances: instances(),
      exec_mode: 'cluster',
      // the app calls process.send('ready') once it listens on every port
      wait_ready: true,
      listen_timeout: 10000,
      // PM2 sends SIGINT, waits kill_timeout, then SIGKILL: leave room for the app's own drain
      kill_timeout: shutdownTimeoutMs + 5000,
      max_memory_restart: '500M',
      // logs are JSON lines; PM2 prefixes each line in its log files with "<date>: "
      log_date_format: 'YYYY-MM-DD HH:mm:ss Z',
      merge_logs: true,
    },
  ],
};
