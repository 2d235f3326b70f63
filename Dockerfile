# syntax=docker/dockerfile:1
#
# kstash container image.
#
#   docker build -t kstash .
#   docker run --rm -p 8080:8080 \
#     -e KSTASH_KAFKA_BROKERS=kafka:9092 \
#     -e KSTASH_AUTH_TOKENS=... \
#     -e KSTASH_SIGNING_CURRENT_KEY=sig_... -e KSTASH_SIGNING_NEXT_KEY=sig_... \
#     kstash            # runs `kstash serve`
#
# See docker-compose.yml for a complete single-node Kafka + kstash setup.

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# 1. Dependencies only. Compile every crate in Cargo.lock against a stub
#    lib/bin so this slow layer (librdkafka's bundled C build, ring, ...)
#    stays cached until Cargo.toml or Cargo.lock change.
#    rdkafka's default features build librdkafka with its own configure/make
#    script and the C toolchain already in this image; no cmake needed.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# 2. The real source. `.dockerignore` keeps target/, .git/, .kafka/ ... out.
COPY . .
# COPY keeps the build context's mtimes, which are normally older than the
# stub build above, so cargo would consider the kstash crate up to date and
# ship the stub binary. Touch the crate roots to force a rebuild of kstash
# only (dependencies stay cached).
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin kstash \
 && install -D -m 0755 target/release/kstash /out/kstash

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: kstash delivers messages to HTTPS endpoints; keep the
# system trust store available for TLS. librdkafka is linked statically; the
# binary needs only glibc and zlib at runtime, both already in bookworm-slim.
# No curl: the HEALTHCHECK below uses bash's /dev/tcp instead.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Fixed, non-root uid/gid so volume ownership and Kubernetes
# `runAsNonRoot` checks are predictable.
RUN groupadd --system --gid 10001 kstash \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/kstash \
      --shell /usr/sbin/nologin kstash \
 && mkdir -p /var/lib/kstash \
 && chown 10001:10001 /var/lib/kstash

COPY --from=builder /out/kstash /usr/local/bin/kstash

# Writable working directory (e.g. for `kstash dev`'s local state).
WORKDIR /var/lib/kstash
USER 10001:10001

EXPOSE 8080

# Probes the unauthenticated GET /health endpoint without needing curl:
# bash's /dev/tcp opens the connection, the status line must contain " 200 ".
# The port follows KSTASH_SERVER_LISTEN when it is set (default 8080).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "listen=\"${KSTASH_SERVER_LISTEN:-0.0.0.0:8080}\"; exec 3<>\"/dev/tcp/127.0.0.1/${listen##*:}\" && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["kstash"]
CMD ["serve"]
