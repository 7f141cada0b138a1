"""``python -m infra.db upgrade <service>`` / ``revision <service> -m ...``."""

from infra.db.migrate import cli

cli()
