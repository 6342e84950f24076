//! The `mqbridge` command: parse the CLI, set up logging, load the config, and hand over
//! to [`mqbridge::app::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mqbridge::config;
use mqbridge::message::Message;

/// mimalloc instead of glibc's allocator: the message path allocates and frees small
/// values at a high rate across threads, where glibc spent about a third of the cycles
/// (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mqbridge",
    version,
    about = "Forward MQTT messages to databases, webhooks and brokers; acknowledged only once stored."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MQBRIDGE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Without a subcommand: `run` with the default config.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default when no command is given).
    Run {
        /// Rules file.
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "MQBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a rules file and print the plan; exit 1 with every error otherwise.
    Check { file: PathBuf },
    /// Run one message through the rules and print what would be written, without side effects.
    Try {
        file: PathBuf,
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        payload: Payload,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
    },
    /// Send dead letters (JSON lines, as the `file` sink writes them) again under the
    /// current config: a sink's letter to that sink, a rule's through that rule. Letters
    /// that succeed are listed in `FILE.replayed` and skipped next time. Exit 0 when
    /// nothing failed, 1 otherwise, 2 when the config is invalid.
    Replay {
        /// Rules file.
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "MQBRIDGE_CONFIG")]
        config: PathBuf,
        /// Only letters of this sink.
        #[arg(long)]
        sink: Option<String>,
        /// Only letters of this rule.
        #[arg(long)]
        rule: Option<String>,
        /// Only letters whose last attempt was at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<jiff::Timestamp>,
        /// The dead-letter file.
        dead_letters: PathBuf,
    },
    /// Print the JSON Schema of the rules file.
    Schema,
    /// Read a password from stdin and print its argon2 hash for `embedded.users`.
    Passwd,
    /// Ask a running mqbridge's admin server whether it is alive (GET /healthz); exit 0
    /// if it answers 200, 1 otherwise. For container health checks.
    Health {
        /// The health URL.
        #[arg(default_value = DEFAULT_HEALTH_URL)]
        url: String,
    },
}

/// The payload `try` runs through the rules: exactly one of these.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Payload {
    /// The payload as text.
    #[arg(long)]
    payload: Option<String>,
    /// The payload as hex digits, for binary payloads such as CBOR or MessagePack
    /// (whitespace between them is ignored): `a16174f94d60`.
    #[arg(long, value_name = "HEX", value_parser = hex_bytes)]
    payload_hex: Option<bytes::Bytes>,
    /// The payload read from a file, byte for byte.
    #[arg(long, value_name = "PATH")]
    payload_file: Option<PathBuf>,
}

impl Payload {
    /// The payload's bytes; the error says which file could not be read.
    fn read(self) -> Result<bytes::Bytes, String> {
        match (self.payload, self.payload_hex, self.payload_file) {
            (Some(text), _, _) => Ok(text.into()),
            (_, Some(bytes), _) => Ok(bytes),
            (_, _, Some(path)) => std::fs::read(&path)
                .map(Into::into)
                .map_err(|e| format!("cannot read the payload file {}: {e}", path.display())),
            (None, None, None) => unreachable!("clap requires one payload argument"),
        }
    }
}

fn hex_bytes(digits: &str) -> Result<bytes::Bytes, String> {
    let digits: String = digits.split_ascii_whitespace().collect();
    hex::decode(digits)
        .map(Into::into)
        .map_err(|e| format!("not hex digits: {e}"))
}

/// `admin.listen`'s default address.
const DEFAULT_HEALTH_URL: &str = "http://127.0.0.1:9883/healthz";

/// The log target of why `run` stopped: shown whatever `RUST_LOG` filters out.
const EXIT_LOG: &str = "mqbridge::exit";

/// The quickstart: embedded broker on 127.0.0.1:1883, every message into SQLite.
const DEFAULT_CONFIG: &str = "config/mqbridge.yaml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    mqbridge::install_crypto();
    init_tracing(cli.log_format);
    let command = cli.command.unwrap_or_else(|| Command::Run {
        config: std::env::var_os("MQBRIDGE_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_CONFIG.into()),
    });
    match command {
        Command::Health { url } => health(&url),
        Command::Passwd => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("cannot read the password from stdin: {e}");
                return ExitCode::FAILURE;
            }
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                eprintln!("empty password: type it on stdin, e.g. `mqbridge passwd <<< 's3cret'`");
                return ExitCode::FAILURE;
            }
            println!("{}", mqbridge::broker::auth::hash_password(password));
            ExitCode::SUCCESS
        }
        Command::Schema => {
            let schema = schemars::schema_for!(config::RawConfig);
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).expect("schema serializes")
            );
            ExitCode::SUCCESS
        }
        Command::Check { file } => match config::load(&file, config::Checks::ForRun) {
            Ok(plan) => {
                print!("{}", describe(&plan));
                ExitCode::SUCCESS
            }
            Err(errs) => fail(&errs),
        },
        Command::Try {
            file,
            topic,
            payload,
            qos,
        } => {
            // Not the checks of this machine: `try` connects to nothing and reads no
            // secret, so it also works on a config meant for another machine.
            match config::load(&file, config::Checks::FileOnly) {
                Ok(plan) => {
                    let payload = match payload.read() {
                        Ok(p) => p,
                        Err(e) => {
                            eprintln!("{e}");
                            return ExitCode::FAILURE;
                        }
                    };
                    let msg = Message::detached(topic, payload, qos);
                    print!("{}", mqbridge::dryrun::explain(&plan, &msg));
                    msg.ack.settle();
                    ExitCode::SUCCESS
                }
                Err(errs) => fail(&errs),
            }
        }
        Command::Replay {
            config: file,
            sink,
            rule,
            since,
            dead_letters,
        } => {
            let plan = match config::load(&file, config::Checks::ForRun) {
                Ok(p) => p,
                Err(errs) => {
                    eprintln!("{errs}");
                    return ExitCode::from(2);
                }
            };
            let filter = mqbridge::replay::Filter { sink, rule, since };
            replay(plan, &dead_letters, &filter)
        }
        Command::Run { config: file } => {
            let plan = match config::load(&file, config::Checks::ForRun) {
                Ok(p) => p,
                Err(errs) => return fail(&errs),
            };
            let rt = mqbridge::eval_pool::runtime(plan.workers)
                .build()
                .expect("tokio runtime");
            let result = rt.block_on(async {
                let shutdown = mqbridge::shutdown::on_signal();
                mqbridge::app::run_from(plan, Some(file), shutdown).await
            });
            // Don't wait for a blocking thread stuck in a runaway jq program.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once, as a log line in the log's own format (e.g. JSON).
                    tracing::error!(target: EXIT_LOG, "{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `mqbridge health URL`: one GET, answered within a few seconds.
fn health(url: &str) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let answer = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()?;
        client.get(url).send().await
    });
    match answer {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("{url}: {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `mqbridge replay`: each failure, then the summary.
fn replay(
    plan: config::Plan,
    file: &std::path::Path,
    filter: &mqbridge::replay::Filter,
) -> ExitCode {
    use mqbridge::replay::{Replayer, replay_file};
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let summary = rt.block_on(async {
        let eval = mqbridge::eval_pool::EvalPool::start(
            "mqb-replay",
            1,
            mqbridge::eval_pool::EVAL_TIMEOUT,
        )?;
        let replayer = Replayer::new(std::sync::Arc::new(plan), eval);
        anyhow::Ok(replay_file(&replayer, file, filter).await?)
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    for f in &summary.failed {
        let id = f.message_id.as_deref().unwrap_or("-");
        println!("failed: line {} (message {id}): {}", f.line, f.reason);
    }
    if summary.incomplete_tail {
        println!("note: the last line is incomplete (still being written); left for next time");
    }
    println!("{summary}");
    if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fail(errs: &config::ConfigErrors) -> ExitCode {
    eprintln!("{errs}");
    ExitCode::FAILURE
}

/// The plan as `check` prints it (secrets are not part of it).
fn describe(plan: &config::Plan) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match &plan.broker {
        Some(b) => {
            let c = &b.connection;
            let _ = writeln!(
                out,
                "broker: {}://{}:{} as {:?} (MQTT {}, persistent session)",
                if c.tls { "mqtts" } else { "mqtt" },
                c.host,
                c.port,
                c.client_id,
                c.protocol
            );
            for s in &b.subscriptions {
                let _ = writeln!(out, "  subscribe {s} qos {}", b.qos);
            }
        }
        None => {
            let _ = writeln!(out, "broker: none");
        }
    }
    if let Some(e) = &plan.embedded {
        let mut listen: Vec<String> = e.listen.iter().map(|a| a.to_string()).collect();
        if listen.is_empty() {
            listen.push("(no plain TCP)".into());
        }
        let _ = writeln!(
            out,
            "embedded broker: listen {} ({} users, anonymous {}, {}; keepalive <= {}s, packets <= {} bytes, {} connections, {} in flight, {} queued)",
            listen.join(", "),
            e.users.len(),
            if e.allow_anonymous {
                "allowed"
            } else {
                "refused"
            },
            match &e.acl {
                config::Acl::Rules(rules) => format!("{} ACL rules", rules.len()),
                config::Acl::Mosquitto(file) => {
                    format!("Mosquitto ACL file of {} entries", file.entry_count())
                }
            },
            e.max_keepalive,
            e.max_packet_size,
            e.max_connections,
            e.max_inflight,
            e.max_queued_messages
        );
        let addrs = |l: &[std::net::SocketAddr]| {
            l.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(t) = e.tls.as_ref().filter(|t| !t.listen.is_empty()) {
            let _ = writeln!(
                out,
                "  mqtts: listen {} (certificate {})",
                addrs(&t.listen),
                t.cert_file.display()
            );
        }
        if let Some(w) = &e.websocket {
            let scheme = if w.tls { "wss" } else { "ws" };
            let _ = writeln!(out, "  {scheme}: listen {} on /mqtt", addrs(&w.listen));
        }
        if let Some(c) = e.tls.as_ref().and_then(|t| t.client_auth.as_ref()) {
            let _ = writeln!(
                out,
                "  client certificates (mqtts, wss): {} by the CAs of {}; username from {}",
                if c.required {
                    "required, signed"
                } else {
                    "optional, signed"
                },
                c.ca_file.display(),
                match c.username_from {
                    Some(config::raw::CertName::Cn) => "the certificate's CN",
                    Some(config::raw::CertName::San) => "the certificate's DNS (else URI) SAN",
                    None => "the CONNECT",
                }
            );
        }
        if let Some(p) = &e.persistence {
            let _ = writeln!(
                out,
                "  persistence: {} every {}",
                p.path.display(),
                config::units::Duration(p.flush_interval)
            );
        }
    }
    match &plan.spool {
        Some(s) => {
            let _ = writeln!(
                out,
                "spool: {} up to {}, fsync {} (acknowledged once on disk)",
                s.path.display(),
                config::units::ByteSize(s.max_bytes),
                match s.fsync {
                    config::Fsync::Batch => "batch",
                    config::Fsync::Always => "always",
                }
            );
        }
        None => {
            let _ = writeln!(out, "spool: none (acknowledged once every sink settled)");
        }
    }
    let _ = writeln!(out, "sinks:");
    for s in &plan.sinks {
        let _ = writeln!(out, "  {}: {}", s.name, s.settings.spec().describe());
    }
    let _ = writeln!(out, "rules:");
    for r in plan.rules.iter() {
        let from: Vec<&str> = r.from.iter().map(|f| f.pattern()).collect();
        let to: Vec<&str> = r.to.iter().map(|&i| &*plan.sinks[i].name).collect();
        let _ = writeln!(
            out,
            "  {}: from [{}] decode {}{}{} -> [{}]",
            r.name,
            from.join(", "),
            r.decode,
            if r.filter.is_some() { " filter" } else { "" },
            if r.transform.is_some() {
                " transform"
            } else {
                ""
            },
            to.join(", ")
        );
    }
    if let Some(i) = plan.dead_letter {
        let _ = writeln!(out, "dead letters: {}", plan.sinks[i].name);
    }
    match &plan.admin {
        Some(a) => {
            let token = match &a.token {
                Some(t) => t.describe(),
                None => "no token: /metrics and /api open to local processes".into(),
            };
            let _ = writeln!(out, "admin: http://{}/ ({token})", a.listen);
        }
        None => {
            let _ = writeln!(out, "admin: off");
        }
    }
    out
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(format!("{EXIT_LOG}=error").parse().expect("a directive"));
    let colour = log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Colour is for a person at a terminal: none when stderr is a file or a pipe, nor when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}
