//! `parley-bench`: the load tool for parley.
//!
//! Five runs, each a library entry point the binary and the smoke test share:
//! - [`connections::run`]: N authenticated connections in rooms of M, held idle; connect rate,
//!   failures, the server's RSS per connection, idle CPU, and how soon after the last join the
//!   server is idle again (the join storm, with M = N).
//! - [`fanout::run`]: N members of one room, K publishers at R messages/s of S bytes;
//!   deliveries/s, latency percentiles, loss and duplicates, server CPU per delivery.
//! - [`chat::run`]: many rooms of a few to a few hundred members at human rates, with leaves,
//!   rejoins and reconnects with `since`/`epoch`.
//! - [`soak::run`]: a crowd with 10% misbehaving clients (floods, stalled readers, garbage,
//!   abrupt disconnects); well-behaved clients must lose nothing.
//! - [`check::run`]: a fault-injecting consistency checker that starts its own nodes (and
//!   redis-server), injects faults from a seed and checks what every client saw against the
//!   final logs (docs/OPERATIONS.md, "Faults").
//!
//! Every run spreads sockets over `--source-ips` and `--url`s, bounds connect concurrency, and
//! reads the server's /proc entries given `--server-pid`. Two runs can use child processes of
//! the same executable ([`procs`]): `fanout --publisher-process` (hidden subcommand `publish`)
//! and `connections --processes P` (hidden subcommand `hold`).

pub mod attack;
pub mod chat;
pub mod check;
pub mod connections;
pub mod driver;
pub mod fanout;
pub mod member;
pub mod net;
pub mod procfs;
pub mod procs;
pub mod recorder;
pub mod soak;
pub mod track;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

/// Options every subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server WebSocket URL, e.g. ws://127.0.0.1:3000/ws; repeat for cluster nodes (clients
    /// take them round robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:3000/ws")]
    pub urls: Vec<String>,
    /// Source addresses for client sockets: an IPv4 range `127.0.0.1-127.0.0.200` or a comma
    /// list; by default the OS picks. Spreading over many addresses keeps each under the
    /// server's per-IP cap.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// HS256 secret: connect with a JWT minted per user; without it, anonymous `?user=`.
    #[arg(long, env = "PARLEY_BENCH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Server process id for RSS and CPU figures from /proc (repeat: one per node; summed).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Connects (TCP + upgrade + auth + join) in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Prefix of user and room names (runs against one server should differ).
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Print one JSON object on stdout instead of the human summary (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// The parley-bench executable that child processes (`--publisher-process`,
    /// `--processes`) are started from; by default this one.
    #[arg(long, env = "PARLEY_BENCH_EXE", hide = true)]
    pub bench_exe: Option<std::path::PathBuf>,
}

/// Duration, human posting pace and message size, shared by `chat` and `soak`.
#[derive(Args, Debug, Clone)]
pub struct HumanPace {
    /// Seconds of traffic.
    #[arg(short = 'd', long, default_value_t = 60)]
    pub duration: u64,
    /// Shortest pause between a member's messages, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub send_min_s: f64,
    /// Longest pause between a member's messages, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub send_max_s: f64,
    /// Content size, bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

impl HumanPace {
    /// The traffic's duration.
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }

    /// The pause bounds.
    pub fn bounds(&self) -> (Duration, Duration) {
        (
            Duration::from_secs_f64(self.send_min_s),
            Duration::from_secs_f64(self.send_max_s.max(self.send_min_s)),
        )
    }

    /// A random pause between the bounds.
    pub fn plan(&self) -> member::SendPlan {
        let (a, b) = self.bounds();
        member::SendPlan::Random(a, b)
    }
}

/// parley-bench: load tool for parley servers and clusters.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// The run.
    #[command(subcommand)]
    pub command: Command,
}

/// The runs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open N connections in rooms of M and hold them: connect rate, RSS/connection, idle CPU.
    Connections(connections::Options),
    /// One room, N members, publishers at R msg/s: deliveries/s, latency, loss, CPU/delivery.
    Fanout(fanout::Options),
    /// A realistic mix of rooms, human-rate senders, leaves/rejoins and reconnects.
    Chat(chat::Options),
    /// A crowd with misbehaving clients; exits non-zero if a well-behaved client lost anything.
    Soak(soak::Options),
    /// Fault-injecting consistency checker: starts its own nodes (and redis-server), injects
    /// faults from a seed, checks every client's view against the final logs; exits non-zero
    /// if a check failed.
    Check(check::Options),
    /// The publisher process of `fanout --publisher-process` (JSON lines on stdout).
    #[command(hide = true)]
    Publish(fanout::PublishOptions),
    /// One client process of `connections --processes` (JSON lines on stdout).
    #[command(hide = true)]
    Hold(connections::HoldOptions),
}

impl Command {
    /// The options every subcommand shares.
    pub fn common(&self) -> &Common {
        match self {
            Command::Connections(o) => &o.common,
            Command::Fanout(o) => &o.common,
            Command::Chat(o) => &o.common,
            Command::Soak(o) => &o.common,
            Command::Check(o) => &o.common,
            Command::Publish(o) => &o.common,
            Command::Hold(o) => &o.common,
        }
    }
}

/// The result of any run.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Report {
    /// From `connections`.
    Connections(connections::Report),
    /// From `fanout`.
    Fanout(fanout::Report),
    /// From `chat`.
    Chat(chat::Report),
    /// From `soak`.
    Soak(soak::Report),
    /// From `check`.
    Check(check::Report),
    /// From the hidden `publish`.
    Publish(fanout::PublisherReport),
    /// From the hidden `hold`.
    Hold(connections::HoldDone),
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        match self {
            Report::Connections(r) => r.human(),
            Report::Fanout(r) => r.human(),
            Report::Chat(r) => r.human(),
            Report::Soak(r) => r.human(),
            Report::Check(r) => r.human(),
            Report::Publish(_) | Report::Hold(_) => serde_json::to_string(self).unwrap_or_default(),
        }
    }

    /// Whether the run met its hard requirement (soak: no loss for well-behaved clients).
    pub fn ok(&self) -> bool {
        match self {
            Report::Soak(r) => r.ok,
            Report::Check(r) => r.ok,
            _ => true,
        }
    }
}

/// Runs the command.
pub async fn run(command: &Command) -> anyhow::Result<Report> {
    Ok(match command {
        Command::Connections(o) => Report::Connections(connections::run(o).await?),
        Command::Fanout(o) => Report::Fanout(fanout::run(o).await?),
        Command::Chat(o) => Report::Chat(chat::run(o).await?),
        Command::Soak(o) => Report::Soak(soak::run(o).await?),
        Command::Check(o) => Report::Check(check::run(o).await?),
        Command::Publish(o) => Report::Publish(fanout::publish(o).await?),
        Command::Hold(o) => Report::Hold(connections::hold(o).await?),
    })
}

/// Formats the bench's own CPU for the human summaries.
pub(crate) fn bench_line(cpu: &Option<procfs::CpuFigures>) -> String {
    process_cpu_line("bench", cpu)
}

/// Formats a client process's own CPU (`who CPU: …`), empty without figures.
pub(crate) fn process_cpu_line(who: &str, cpu: &Option<procfs::CpuFigures>) -> String {
    match cpu {
        None => String::new(),
        Some(c) => format!(
            "{who} CPU: user {:.2} s, system {:.2} s ({:.0}% of a core)",
            c.user_s, c.system_s, c.percent_of_core
        ),
    }
}

/// Formats optional server CPU figures for the human summaries.
pub(crate) fn cpu_line(cpu: &Option<procfs::CpuFigures>) -> String {
    match cpu {
        None => "server CPU: (give --server-pid)".to_owned(),
        Some(c) => format!(
            "server CPU: user {:.2} s, system {:.2} s over {:.1} s ({:.0}% of a core); per delivery: user {} µs, system {} µs",
            c.user_s,
            c.system_s,
            c.wall_s,
            c.percent_of_core,
            c.user_us_per_delivery.map_or("-".into(), |v| format!("{v:.3}")),
            c.system_us_per_delivery.map_or("-".into(), |v| format!("{v:.3}")),
        ),
    }
}
