"""No models: procqueue's tables are its own (`schema.sql`), not Django's. The module
exists because Django sends `post_migrate` only to apps that have one, and that signal
is how `manage.py migrate` applies procqueue's schema (see apps.py)."""
