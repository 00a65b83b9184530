# outbox-relay container image. Multi-stage: build with the Rust toolchain, ship a slim runtime.
# (No Docker engine runs on the development machines; this file is kept correct by reading.)
#   docker build -t outbox-relay .
#   docker run --rm -e RELAY_POSTGRES__URL=postgres://relay:pw@db:5432/app \
#                   -e RELAY_KAFKA__BROKERS=kafka:9092 outbox-relay

FROM rust:1.95-bookworm AS build
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

FROM debian:bookworm-slim
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
