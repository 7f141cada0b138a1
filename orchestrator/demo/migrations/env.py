from infra.db.migrate import run_migrations_from_env

run_migrations_from_env()
