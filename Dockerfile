# The binaries of `examples` in a small runtime image:
#   docker build -t outbox .
#   docker run --rm outbox producer_pg_to_kafka --help
# docker-compose.yml runs the relay and the consumer from it
# (`docker compose --profile pipeline up -d --wait`).

FROM rust:1-bookworm AS build
# librdkafka is built from source by rdkafka-sys; TLS everywhere links the
# system's OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake python3 zlib1g-dev libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p examples --bins \
 && mkdir -p /out \
 && cp target/release/producer_pg_to_kafka target/release/consumer_to_clickhouse \
       target/release/outbox target/release/service_enqueue /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home outbox
COPY --from=build /out/ /usr/local/bin/
USER outbox
# Inside a container the metrics endpoint must listen beyond loopback to be
# scraped; publish its port only where the scraper runs.
ENV OUTBOX_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
CMD ["producer_pg_to_kafka", "--help"]
