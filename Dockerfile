# syntax=docker/dockerfile:1
# NeoPro services: one image, every binary (neopro-broker, neopro-ingestor,
# neopro-edge, neopro-analytics, neopro-sim). compose.yaml picks the binary
# with `command`. Pure-Rust TLS (rustls) and bundled SQLite: the runtime stage
# needs no OpenSSL and no libsqlite3.

# ---- build ----
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Dependencies first, so that a source change does not refetch the registry.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY .cargo .cargo
COPY schema schema
COPY runtime runtime
COPY broker broker
COPY ingestor ingestor
COPY edge-publisher edge-publisher
COPY analytics analytics
COPY simulator simulator
COPY vendor vendor
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p broker -p ingestor -p edge-publisher -p analytics -p simulator \
 && mkdir -p /out \
 && cp target/release/neopro-broker target/release/neopro-ingestor target/release/neopro-edge \
       target/release/neopro-analytics target/release/neopro-sim /out/

# ---- runtime ----
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/neopro --create-home neopro \
 && mkdir -p /var/lib/neopro/data /credentials \
 && chown -R neopro /var/lib/neopro /credentials
COPY --from=builder /out/ /usr/local/bin/
USER neopro
WORKDIR /var/lib/neopro
ENV RUST_LOG=info HOME=/var/lib/neopro
# MQTT, broker metrics, ingestor, analytics, edge (the TV's endpoint).
EXPOSE 1883 9883 8080 8081 3000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["neopro-sim", "--help"]
