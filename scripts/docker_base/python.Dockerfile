# A local stand-in for Docker Hub's python:3.11-slim, for machines that cannot reach Docker Hub
# (scripts/compose_check.sh builds it only then). Debian bookworm's own Python 3.11, with `python`
# and `pip` on PATH installing system-wide as in the official image, and this machine's CA bundle
# so that pip reaches PyPI through whatever TLS setup the machine has.
ARG BASE=scaling-search-base/debian:bookworm
FROM ${BASE}

ENV LANG=C.UTF-8
# Into the system bundle, /etc/ssl/certs/ca-certificates.crt, as update-ca-certificates (run by
# the ca-certificates package) rebuilds it: copied there directly, it would be overwritten.
COPY ca-certificates.crt /usr/local/share/ca-certificates/host-bundle.crt
RUN apt-get update \
    && apt-get install --yes --no-install-recommends ca-certificates python3 python3-pip \
        python3-venv \
    && update-ca-certificates > /dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip \
    && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
CMD ["python3"]
