# Chitram: a multi-stage build of the `chitram` binary onto a small Debian runtime.
#
#   docker build -t chitram .
#   docker run -p 8000:8000 -v chitram-data:/var/lib/chitram chitram
#
# With no config file the embedded default applies (SQLite and three filesystem shards under
# /var/lib/chitram/data). `docker compose up` runs the full deployment: Postgres and four MinIO
# shards (see docs/docker.md).
#
# Only standard Dockerfile instructions are used (no BuildKit-only syntax), so both BuildKit and
# the classic builder can build it.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- skeleton: the manifests, with every Rust source replaced by a stub ----------------------
# Copying the whole context here and stubbing it means this stage reruns on every change, but
# its output (COPY --from=skeleton below) is byte-identical until Cargo.toml, Cargo.lock or the
# set of target files changes, so the dependency layer that follows stays cached. Stubs exist
# for every file cargo may need to load the manifest (src/main.rs, src/lib.rs, src/bin/, and
# anything under benches/, tests/ and examples/, where explicit [[bench]]/[[test]] entries
# must point at an existing file); only the library and binaries are compiled from them.
FROM ${RUST_IMAGE} AS skeleton
WORKDIR /context
COPY . .
RUN set -eu; \
    mkdir -p /skeleton/src; \
    echo 'fn main() {}' > /tmp/stub.rs; \
    cp Cargo.toml Cargo.lock /skeleton/; \
    if [ -f build.rs ]; then cp build.rs /skeleton/; fi; \
    if [ -d .cargo ]; then cp -R .cargo /skeleton/; fi; \
    if [ -f rust-toolchain.toml ]; then cp rust-toolchain.toml /skeleton/; fi; \
    if [ -f src/lib.rs ]; then : > /skeleton/src/lib.rs; fi; \
    if [ -f src/main.rs ]; then cp /tmp/stub.rs /skeleton/src/main.rs; fi; \
    for dir in src/bin benches tests examples; do \
        [ -d "$dir" ] || continue; \
        find "$dir" -type f -name '*.rs' -exec sh -c \
            'for f; do mkdir -p "/skeleton/${f%/*}"; cp /tmp/stub.rs "/skeleton/$f"; done' \
            stub {} +; \
    done

# --- builder -----------------------------------------------------------------------------------
# The full (non-slim) Rust image: aws-lc-sys (TLS for HTTPS to S3) and the bundled SQLite are C
# code built with its gcc; no cmake or clang is needed on x86_64/aarch64 Linux.
FROM ${RUST_IMAGE} AS builder
WORKDIR /build
ENV CARGO_TERM_COLOR=never

# 1. Dependencies only, from the skeleton: cached until Cargo.toml or Cargo.lock change.
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked

# 2. The real sources (migrations/ is embedded by sqlx::migrate! at compile time). The stub
#    build left artifacts for the chitram package itself; clean them so cargo cannot take the
#    copied sources (whose mtimes come from the build context) for unchanged.
COPY . .
RUN cargo clean --release --package chitram \
    && cargo build --release --locked \
    && cp target/release/chitram /usr/local/bin/chitram \
    && /usr/local/bin/chitram --version

# --- runtime -----------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# ca-certificates: HTTPS to S3 endpoints. curl: the health check. Versions are not pinned:
# bookworm's point releases carry the security fixes we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid so bind-mounted directories can be chown'ed to match.
RUN groupadd --system --gid 10001 chitram \
    && useradd --system --uid 10001 --gid chitram --home-dir /var/lib/chitram \
        --no-create-home --shell /usr/sbin/nologin chitram \
    && mkdir -p /var/lib/chitram /etc/chitram \
    && chown chitram:chitram /var/lib/chitram

COPY --from=builder /usr/local/bin/chitram /usr/local/bin/chitram

# Relative paths in the config (the default's sqlite://data/chitram.db and data/shards/*)
# resolve here, inside the volume.
WORKDIR /var/lib/chitram
VOLUME ["/var/lib/chitram"]
USER 10001:10001

# Inside a container the service must listen on every interface, not the default 127.0.0.1.
ENV CHITRAM__SERVER__BIND=0.0.0.0:8000
EXPOSE 8000

# /health answers 200 while the database and at least one shard answer (`ok` or `degraded`),
# 503 otherwise; --fail-with-body keeps the JSON (which names the failing component) in
# `docker inspect`. It assumes port 8000: override it if you change the bind address.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["curl", "-sS", "--fail-with-body", "--max-time", "4", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["chitram"]
CMD ["serve"]
