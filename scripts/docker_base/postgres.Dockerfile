# A local stand-in for Docker Hub's postgres:17, for machines that cannot reach Docker Hub
# (scripts/compose_check.sh builds it only then): Debian bookworm's PostgreSQL 15, which is enough
# for the Optuna study. Like the official image it reads POSTGRES_USER, POSTGRES_PASSWORD and
# POSTGRES_DB when its data folder is empty, keeps its data in /var/lib/postgresql/data, listens
# on 5432 with password (scram-sha-256) authentication, and has pg_isready and psql on PATH.
ARG BASE=scaling-search-base/debian:bookworm
FROM ${BASE}

ENV LANG=C.UTF-8 \
    PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && apt-get install --yes --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p "$PGDATA" /var/run/postgresql \
    && chown postgres:postgres "$PGDATA" /var/run/postgresql \
    && chmod 700 "$PGDATA"
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
