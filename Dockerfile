# syntax=docker/dockerfile:1
# mqbridge: build with `docker build -t mqbridge .`, run the quickstart config with
#   docker run --stop-timeout 30 -p 127.0.0.1:1883:1883 -e MQBRIDGE_LISTEN=0.0.0.0:1883 \
#     -v mqbridge-data:/var/lib/mqbridge mqbridge
# (--stop-timeout, or compose's stop_grace_period, must exceed the config's
# shutdown_timeout, 10s by default: docker stop waits that long after SIGTERM, then kills.)
FROM rust:1.95-bookworm AS build
# cmake builds librdkafka (the kafka sink); OpenSSL's headers are in the image already.
RUN apt-get update && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from the manifests alone, in a layer of their own: a change to src/
# rebuilds only mqbridge itself. Empty stand-ins for src/ let cargo load the package
# (benches/ is declared in Cargo.toml, so cargo needs it to read the manifest; it is not built).
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY migrations migrations
# COPY keeps the files' own times, which can be older than the stand-ins' build.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip target/release/mqbridge

FROM debian:bookworm-slim
# ca-certificates brings openssl and libssl3, which librdkafka (the kafka sink) links.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/mqbridge --create-home mqbridge
COPY --from=build /src/target/release/mqbridge /usr/local/bin/mqbridge
COPY config /etc/mqbridge
USER mqbridge
WORKDIR /var/lib/mqbridge
# MQTT (the embedded broker of the default config; set MQBRIDGE_LISTEN=0.0.0.0:1883) and
# the admin API (/healthz, /readyz, /metrics; the default config listens on 127.0.0.1:9883
# inside the container: to publish it, give a config with a token and `admin.listen:
# 0.0.0.0:9883`, since any address but loopback needs one).
EXPOSE 1883 9883
# `mqbridge health` asks the admin server's /healthz (the slim image has no curl). A
# config of your own needs `admin:` on 127.0.0.1:9883 for it (or override HEALTHCHECK).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["mqbridge", "health", "http://127.0.0.1:9883/healthz"]
# SIGTERM stops taking messages, flushes within shutdown_timeout and acknowledges what
# settled; give the container a longer stop timeout than that (see the top of this file).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqbridge"]
CMD ["run", "--config", "/etc/mqbridge/mqbridge.yaml"]
