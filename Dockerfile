# oauth-smtp-relay container image: multi-stage, non-root, spool on a volume.
#
#   podman build --format docker -t oauth-smtp-relay .          (docker build -t oauth-smtp-relay .)
#   podman build --format docker --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t oauth-smtp-relay .
#
# BASE_IMAGE must provide python3 (>= 3.11) with the venv module (python:3.x-slim does; on plain Debian
# install python3 and python3-venv). Both stages use it, so the venv's interpreter exists at run time.
# --format docker keeps the HEALTHCHECK (the OCI image format has no place for it).
# See docs/docker.md for running it as a sidecar (compose, Kubernetes).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . /src
RUN python3 -m venv /opt/oauth-smtp-relay \
 && /opt/oauth-smtp-relay/bin/pip install --no-cache-dir /src \
 && /opt/oauth-smtp-relay/bin/oauth-smtp-relay --version \
 && /opt/oauth-smtp-relay/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && find /opt/oauth-smtp-relay -name '*.dist-info' -prune -o -type d -name tests -prune -exec rm -rf {} + \
 && /opt/oauth-smtp-relay/bin/oauth-smtp-relay --version
# The runtime layer carries no installer: pip and setuptools (~23 MB) leave the venv after the install.

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="oauth-smtp-relay" \
      org.opencontainers.image.description="Plain SMTP in, Exchange Online out with OAuth 2.0 (XOAUTH2) app-only tokens"
COPY --from=build /opt/oauth-smtp-relay /opt/oauth-smtp-relay
# A fixed non-root UID/GID (10001) so volume and secret permissions can be set from outside.
RUN (groupadd --system --gid 10001 relay || addgroup -S -g 10001 relay) \
 && (useradd --system --uid 10001 --gid 10001 --home-dir /var/spool/oauth-smtp-relay --no-create-home \
        --shell /usr/sbin/nologin relay || adduser -S -D -H -u 10001 -G relay relay) \
 && mkdir -p /var/spool/oauth-smtp-relay /etc/oauth-smtp-relay \
 && chown 10001:10001 /var/spool/oauth-smtp-relay && chmod 0700 /var/spool/oauth-smtp-relay
ENV PATH=/opt/oauth-smtp-relay/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/spool/oauth-smtp-relay
# The queue: mount a volume here so accepted mail survives a container restart.
VOLUME ["/var/spool/oauth-smtp-relay"]
EXPOSE 2525
# The config is mounted at /etc/oauth-smtp-relay/config.yaml (read-only is fine); secrets come from
# /run/secrets (client_secret_file: /run/secrets/client_secret). The health check needs
# observability.http (e.g. 127.0.0.1:9465) in the config: it asks /readyz and exits 0 or 1.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["oauth-smtp-relay", "health", "-c", "/etc/oauth-smtp-relay/config.yaml", "--timeout", "5"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["oauth-smtp-relay"]
CMD ["serve", "-c", "/etc/oauth-smtp-relay/config.yaml"]
