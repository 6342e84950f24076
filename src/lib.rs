//! mqbridge: takes MQTT messages and forwards them where they are needed, acknowledging
//! each one only once it is stored.
//!
//! ```text
//!  broker ──▶ source::mqtt ──▶ source::intake ──Message──▶ [spool] ──▶ pipeline (rules: decode ▶ filter ▶ transform)
//!  (or devices ──▶ broker, the embedded one, each connection ──▶ its own intake ──▶ the same path)
//!                 ▲                                     │ records, each holding a share of the message's Ack
//!                 │                                     ▼
//!                 │                sink::driver (queue ▶ batch ▶ write ▶ per-record retry) ──▶ postgres / sqlite / webhook / influxdb / republish / mqtt / file
//!                 │                                     └──▶ dead letter (another sink) with the reason
//!                 └── PUBACK/PUBREC in arrival order (the intake's AckSequencer) once the message is
//!                     fsynced to the spool, or, without a spool, once every share settled
//! ```
//!
//! Modules, in the order data flows through them:
//! - [`config`]: the YAML rules file → a validated [`config::Plan`] (errors with
//!   file:line:col), each sink's settings included ([`config::sinks`]), its templates and
//!   jq programs compiled once for `run`, `check` and `try` alike. It imports no
//!   component: components take their settings from it as values.
//! - [`topic`]: MQTT topic filters, matching and `{name}` captures.
//! - [`mqtt`]: rumqttc connection options.
//! - [`source`]: where messages come from: the [`source::Source`] trait, the external
//!   broker's client, and [`source::intake`], the one hand-off every connection uses; or
//!   [`broker`]: the embedded MQTT broker devices connect to, a `Source` too, whose
//!   connections hand off through the same intake.
//! - [`message`]: the [`message::Message`] passed along.
//! - [`record`]: the [`record::Record`] a rule makes of a message and a sink writes (a
//!   JSON value; an object of a transform's named keys keeps its keys once per rule).
//! - [`spool`]: the durable local log between the source and the rules (optional).
//! - [`rule`]: decode (JSON, text, bytes, CBOR, MessagePack, Protobuf, Sparkplug B), jq filter/transform (a transform that only picks paths runs
//!   without jq), templates; [`pipeline`] routes messages through them, evaluating them
//!   on the [`eval_pool`]'s threads, each run under a deadline (Sparkplug B's decoding,
//!   which remembers births and `seq`, on the router in arrival order; the rebirth
//!   requests it asks for go to the broker through the same [`sink::publish::Publish`]).
//! - [`sink`]: the [`sink::Sink`] trait, the delivery driver, retries and each sink type,
//!   opened from its settings. Sinks know nothing of sources or the broker: the republish
//!   sink publishes through [`sink::publish::Publish`]; the `mqtt` sink (edge to cloud)
//!   on a [`sink::publish::Connection`] of its own, through [`mqtt`].
//! - [`delivery`]: settlement shares and in-order acknowledgements.
//! - [`app`]: wires it all from a plan (the republish sink's publisher too: the embedded
//!   broker, or a connection to the external one) and orders shutdown; [`shutdown`]: signals.
//! - [`dryrun`]: `mqbridge try` (and the admin API's "try a message"), one message through
//!   the rules and what each sink would do.
//! - [`tap`]: a rule's live tail: the router offers each outcome to whoever watches (the
//!   admin API's `/api/v1/rules/{name}/tail`).
//! - [`replay`]: `mqbridge replay`, dead letters sent again through their sink or rule, each
//!   success marked in the file's `.replayed` sidecar.
//! - [`health`]: the readiness registry the source, the spool and the sinks update;
//!   [`admin`]: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`, `/api/v1/…`,
//!   the dashboard), started first and stopped last by `app`. Metrics are recorded where the work happens
//!   (`metrics::counter!` and the like in `source`, `spool`, `pipeline`, `broker::stats`
//!   and `sink::driver`) and rendered by [`admin::exporter`]; gauges the components can
//!   answer cheaply (sink queue depths, the embedded broker's sessions) are read when
//!   `/metrics` is scraped. `admin` also reads the embedded broker (`/api/v1/clients`),
//!   which `app` hands it.
//!
//! - Small pieces shared across components: [`der`] (a few lines of DER, for certificate
//!   names and public keys) and [`http_client`] (how an HTTP client shows a URL and an
//!   error: the HTTP sinks and the broker's HTTP authenticator). The HTTP sinks (webhook,
//!   influxdb) share their client and status classification in [`sink::http`].
//!
//! Dependencies point one way (no cycles): `app` imports the components (`source`,
//! `broker`, `spool`, `pipeline`, `sink`, `admin`); they import `config`, which hands
//! them their settings as values; and any of them may import the pure pieces: `rule`,
//! `topic`, `message`, `delivery`, `health`.

pub mod admin;
pub mod app;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod der;
pub mod dryrun;
pub mod eval_pool;
pub mod health;
pub mod http_client;
pub mod message;
pub mod mqtt;
pub mod pipeline;
pub mod record;
pub mod replay;
pub mod rule;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod spool;
pub mod tap;
pub mod topic;

/// Installs the process-wide TLS crypto provider (ring). Call first thing in `main` and
/// in tests that open TLS connections; calling it twice is harmless.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
