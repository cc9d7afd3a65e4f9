#!/bin/sh
# Run once per `docker compose up` by the `secrets` service, as root: makes the database
# password on the first run and keeps it in the `secrets` volume, so no password is
# written in docker-compose.yml, in a container's environment (docker inspect) or a log.
#   password  read (as root) by the postgres image's entrypoint: POSTGRES_PASSWORD_FILE
#   pgpass    read by libpq in the procqueue containers (PGPASSFILE), which run as uid
#             10001; libpq ignores a password file that others can read, hence owner and mode
set -eu
dir=${SECRETS_DIR:-/secrets}
umask 077
if [ ! -s "$dir/password" ]; then
    # Hex: no character that a pgpass line or a URL would need escaped.
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$dir/password.new"
    mv "$dir/password.new" "$dir/password"
fi
printf '*:*:*:procqueue:%s\n' "$(cat "$dir/password")" > "$dir/pgpass"
chown 10001:10001 "$dir/pgpass"
chmod 0600 "$dir/password" "$dir/pgpass"
