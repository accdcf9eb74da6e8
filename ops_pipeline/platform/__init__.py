"""What every domain shares: the release spec (spec.py), the app's environment (app_env.py), commands (commands.py),
npm/yarn/pnpm (packagers.py: the spec's checks and the release both need them), paths, secret redaction, the embedded PostgreSQL + Redis (local_stack.py), release history, the migration table
reader, Dagster failures (failures.py), the run report, and one resource per shared external system: PostgreSQL
(postgres.py), Redis (redis.py), Slack (notify.py), HTTP health probes (prober.py).

Imports run one way: platform <- targets <- release, platform <- backup <- release. Nothing here imports a domain."""
