# syntax=docker/dockerfile:1
# mqbridge: build with `docker build -t mqbridge .`, run with
#   docker run -v $PWD/config:/etc/mqbridge -v mqbridge-data:/var/lib/mqbridge mqbridge
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
# Declared in Cargo.toml, so cargo needs them to read the manifest (they are not built).
COPY benches benches
RUN cargo build --release --locked && strip target/release/mqbridge

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/mqbridge --create-home mqbridge
COPY --from=build /src/target/release/mqbridge /usr/local/bin/mqbridge
COPY config /etc/mqbridge
USER mqbridge
WORKDIR /var/lib/mqbridge
# SIGTERM flushes and acknowledges what settled; give it the configured shutdown_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqbridge"]
CMD ["run", "--config", "/etc/mqbridge/mqbridge.yaml"]
