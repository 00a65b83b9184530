# outbox-relay container image. Multi-stage: build with the Rust toolchain, ship a slim runtime.
# (No Docker engine runs on the development machines; this file is kept correct by reading.)
#   docker build -t outbox-relay .
#   docker run --rm -e RELAY_POSTGRES__URL=postgres://relay:pw@db:5432/app \
#                   -e RELAY_KAFKA__BROKERS=kafka:9092 outbox-relay

# Base images are pinned by digest (the multi-platform index), so a rebuild uses the same bytes
# until someone moves the pin on purpose. To update: `scripts/pin-images` (asks Docker Hub for the
# current digest of each tag and rewrites the FROM lines), rebuild, run the tests, commit.
# The digests below are those Docker resolved for these tags in a build log of 2026-09-27; the
# development machines cannot reach Docker Hub, so they were not pulled here.
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev libcurl4-openssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY relay ./relay
# Targets the manifest names (examples, tests) and the bench workspace member: cargo reads them
# even when only the relay is built.
COPY examples ./examples
COPY tests ./tests
COPY bench ./bench
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
WORKDIR /app
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY sql ./sql
COPY config/relay.toml ./config/relay.toml
USER 10001
# The admin listener: GET /metrics, /healthz, /readyz (read-only). In a container it must listen
# on all interfaces for probes and scrapers. The transaction oracle's listener
# (RELAY_TRANSACTIONS__HTTP_ADDR) is off unless set, and needs RELAY_TRANSACTIONS__HTTP_TOKEN_FILE.
ENV RELAY_HTTP__ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]
