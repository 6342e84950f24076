//! End-to-end tests against real services: Mosquitto, PostgreSQL, MariaDB, InfluxDB, NATS
//! and a Kafka-API broker (Tansu) on loopback, SQLite files, and the mqbridge binary. Run
//! through `scripts/test.sh` (the README's test command), which makes sure the services
//! are installed.

mod admin;
mod broker;
mod cli;
mod cloud;
mod crash;
mod dashboard;
mod decoders;
mod embedded;
mod embedded_auth;
mod embedded_limits;
mod embedded_listeners;
mod embedded_state;
mod faults;
mod flow;
mod hook_server;
mod influx;
#[cfg(feature = "kafka")]
mod kafka;
mod migrate;
mod mysql;
#[cfg(feature = "nats")]
mod nats;
mod postgres;
mod quickstart;
mod reload;
mod replay;
mod scale;
#[cfg(feature = "protobuf")]
mod sparkplug;
mod spool;
mod util;
mod webhook;
