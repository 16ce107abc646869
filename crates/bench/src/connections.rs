//! `connections`: N authenticated connections in rooms of M, held idle. Reports the connect
//! rate, failures, and with `--server-pid` the server's RSS growth per connection, how soon
//! after the last join its CPU is idle again (join storm), and its idle CPU over the hold.
//!
//! A process may hold at most 20,000 open files, so more connections need `--processes P`:
//! the run starts P child processes (hidden subcommand `hold`), each opening its share (child
//! i takes URL i when there are at least P URLs), waits until every child has reported its
//! connect phase on stdout, measures the servers as for one process, and merges the
//! children's figures (the rate is all joined over the time from the first child's first
//! connect to the last join in any child).

use std::collections::VecDeque;
use std::time::Duration;

use clap::Args;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::driver::{counts, ConnectPhase, Swarm};
use crate::member::{Behaviour, Counts, MemberSpec};
use crate::net::unix_nanos;
use crate::procfs::{clock_ticks, round3, sample, CpuFigures, Sample};
use crate::procs::{self, Child};
use crate::Common;

/// Options of `connections`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// Members per room (rooms `PREFIX-0`, `PREFIX-1`, ...); N for a join storm into one room.
    #[arg(short = 'm', long, default_value_t = 100)]
    pub room_size: usize,
    /// Seconds to hold the connections idle (idle CPU is measured over this).
    #[arg(long, default_value_t = 30)]
    pub hold: u64,
    /// Longest wait, seconds, for the server's CPU to settle after the last join.
    #[arg(long, default_value_t = 60)]
    pub settle_timeout: u64,
    /// Client processes to open the connections from (about 19,500 sockets fit in one; use 2
    /// for 39,000). This process starts them and measures the servers.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
}

/// The result of `connections`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always `connections`.
    pub run: &'static str,
    /// Connections asked for.
    pub connections: usize,
    /// Members per room.
    pub room_size: usize,
    /// Rooms used.
    pub rooms: usize,
    /// Client processes the connections were opened from.
    pub processes: usize,
    /// The connect phase: rate and failures.
    pub connect: ConnectPhase,
    /// Seconds from the last join until the server's CPU was idle (under 5% of a core over
    /// 500 ms); with `--server-pid`.
    pub idle_after_last_join_s: Option<f64>,
    /// Server CPU from the first connect until idle again.
    pub join_phase_cpu: Option<CpuFigures>,
    /// Server RSS before the first connect, KiB.
    pub rss_before_kib: Option<u64>,
    /// Server RSS once all joined and settled, KiB.
    pub rss_after_kib: Option<u64>,
    /// (after − before) / joined connections, bytes.
    pub rss_per_connection_bytes: Option<f64>,
    /// Hold length, seconds.
    pub hold_s: u64,
    /// Server CPU over the hold.
    pub idle_cpu: Option<CpuFigures>,
    /// Connections the server closed during the run, and other counters.
    pub counts: Counts,
    /// With `--processes`: each client process's own connect phase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_process: Vec<ConnectPhase>,
}

/// Connections `first..first + count` in rooms of `m` (by global index, so children of one
/// run share rooms as one process would).
fn specs(common: &Common, first: usize, count: usize, m: usize) -> Vec<MemberSpec> {
    (first..first + count)
        .map(|i| MemberSpec {
            slot: i,
            user: format!("{}-u{i}", common.prefix),
            room: format!("{}-{}", common.prefix, i / m),
            behaviour: Behaviour::Good,
            send: None,
            content_bytes: 0,
            reconnect_every: None,
            churn_every: None,
            checked: false,
        })
        .collect()
}

/// What the servers did once every connection was open.
struct ServerFigures {
    idle_after: Option<f64>,
    join_phase_cpu: Option<CpuFigures>,
    rss_after: Option<Sample>,
    rss_per: Option<f64>,
    idle_cpu: Option<CpuFigures>,
}

/// Waits for the servers to settle after the last join (the first 500 ms window, sampled
/// every 100 ms, under 5% of a core), reads their RSS, then holds and measures idle CPU.
async fn measure(
    o: &Options,
    before: Option<Sample>,
    origin: Instant,
    last_join: Instant,
    joined: u64,
    bar: &ProgressBar,
) -> ServerFigures {
    let pids = &o.common.server_pids;
    let mut idle_after = None;
    let mut join_phase_cpu = None;
    if let Some(before) = before {
        bar.set_message("settling");
        let hz = clock_ticks() as f64;
        let mut window: VecDeque<(Instant, u64)> = VecDeque::new();
        let deadline = Instant::now() + Duration::from_secs(o.settle_timeout);
        while Instant::now() < deadline {
            let Some(s) = sample(pids) else { break };
            let now = Instant::now();
            window.push_back((now, s.ticks()));
            while window.len() > 6 {
                window.pop_front();
            }
            if window.len() == 6 {
                let (t0, c0) = window[0];
                let secs = (now - t0).as_secs_f64();
                if (s.ticks() - c0) as f64 / hz <= 0.05 * secs {
                    idle_after = Some(round3(
                        t0.saturating_duration_since(last_join).as_secs_f64(),
                    ));
                    join_phase_cpu = Some(CpuFigures::between(
                        before,
                        s,
                        t0.saturating_duration_since(origin).as_secs_f64(),
                        None,
                    ));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let settled = sample(pids);
    let rss_per = match (before, settled) {
        (Some(b), Some(a)) if joined > 0 => {
            Some(((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / joined as f64).round())
        }
        _ => None,
    };

    bar.set_message("holding");
    bar.set_length(o.hold.max(1));
    bar.set_position(0);
    let hold_start = Instant::now();
    let at_hold = sample(pids);
    while hold_start.elapsed() < Duration::from_secs(o.hold) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(hold_start.elapsed().as_secs());
    }
    let idle_cpu = match (at_hold, sample(pids)) {
        (Some(a), Some(b)) => Some(CpuFigures::between(
            a,
            b,
            hold_start.elapsed().as_secs_f64(),
            None,
        )),
        _ => None,
    };
    ServerFigures {
        idle_after,
        join_phase_cpu,
        rss_after: settled,
        rss_per,
        idle_cpu,
    }
}

impl Report {
    fn new(
        o: &Options,
        connect: ConnectPhase,
        before: Option<Sample>,
        server: ServerFigures,
        counts: Counts,
    ) -> Report {
        let m = o.room_size.max(1);
        Report {
            run: "connections",
            connections: o.connections,
            room_size: m,
            rooms: o.connections.div_ceil(m),
            processes: o.processes.max(1),
            connect,
            idle_after_last_join_s: server.idle_after,
            join_phase_cpu: server.join_phase_cpu,
            rss_before_kib: before.map(|s| s.rss_kib),
            rss_after_kib: server.rss_after.map(|s| s.rss_kib),
            rss_per_connection_bytes: server.rss_per,
            hold_s: o.hold,
            idle_cpu: server.idle_cpu,
            counts,
            per_process: Vec::new(),
        }
    }
}

/// Runs `connections`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    if o.processes > 1 {
        return run_split(o).await;
    }
    let specs = specs(&o.common, 0, o.connections, o.room_size.max(1));
    let (swarm, connect) = Swarm::start(&o.common, specs, |_| false).await?;
    let origin = swarm.ctx.origin;
    let last_join = origin + Duration::from_secs_f64(connect.secs);
    let server = measure(
        o,
        swarm.before,
        origin,
        last_join,
        connect.joined,
        &swarm.bar,
    )
    .await;
    let before = swarm.before;
    let outcomes = swarm.finish().await;
    Ok(Report::new(
        o,
        connect,
        before,
        server,
        counts(&outcomes, |_| true),
    ))
}

/// The `Instant` of a unix-ns time in the past.
fn instant_of(unix_ns: u64) -> Instant {
    let now = Instant::now();
    now.checked_sub(Duration::from_nanos(unix_nanos().saturating_sub(unix_ns)))
        .unwrap_or(now)
}

/// `connections --processes P`: the connections in P child processes.
async fn run_split(o: &Options) -> anyhow::Result<Report> {
    let before = sample(&o.common.server_pids);
    let exe = procs::exe(&o.common)?;
    let parts = o.processes;
    let mut children = Vec::with_capacity(parts);
    for (i, (first, count)) in procs::shares(o.connections, parts).into_iter().enumerate() {
        let mut args = vec!["hold".to_owned()];
        args.extend(procs::common_args(
            &o.common,
            &procs::urls_for(&o.common.urls, i, parts),
        ));
        args.extend([
            "--first-index".to_owned(),
            first.to_string(),
            "-n".to_owned(),
            count.to_string(),
            "-m".to_owned(),
            o.room_size.max(1).to_string(),
        ]);
        children.push(Child::spawn(
            format!("bench process {i}"),
            &exe,
            args,
            o.common.secret.as_deref(),
        )?);
    }
    let bar = if o.common.json || o.common.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_message(format!("connecting from {parts} processes"));
    let mut ready = Vec::with_capacity(parts);
    for child in &mut children {
        ready.push(child.next::<HoldReady>().await?);
    }
    let started = ready.iter().map(|r| r.started_unix_ns).min().unwrap_or(0);
    let last = ready
        .iter()
        .map(|r| r.last_join_unix_ns)
        .max()
        .unwrap_or(0)
        .max(started);
    let phases: Vec<ConnectPhase> = ready.into_iter().map(|r| r.connect).collect();
    let connect = ConnectPhase::merge(&phases, (last - started) as f64 / 1e9);
    let joined = connect.joined;
    let server = measure(
        o,
        before,
        instant_of(started),
        instant_of(last),
        joined,
        &bar,
    )
    .await;
    for child in &mut children {
        child.tell("stop").await?;
    }
    let mut total = Counts::default();
    for mut child in children {
        let done: HoldDone = child.next().await?;
        total.add(&done.counts);
        child.wait().await?;
    }
    bar.finish_and_clear();
    let mut report = Report::new(o, connect, before, server, total);
    report.per_process = phases;
    Ok(report)
}

/// Options of the hidden `hold` subcommand: one child process of `connections --processes`.
#[derive(Args, Debug, Clone)]
pub struct HoldOptions {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Global index of this process's first connection (users `PREFIX-u<index>`, rooms
    /// `PREFIX-<index / M>`).
    #[arg(long, default_value_t = 0)]
    pub first_index: usize,
    /// Connections this process opens.
    #[arg(short = 'n', long)]
    pub connections: usize,
    /// Members per room.
    #[arg(short = 'm', long, default_value_t = 100)]
    pub room_size: usize,
}

/// A `hold` child's first line: its connect phase.
#[derive(Debug, Serialize, Deserialize)]
pub struct HoldReady {
    /// Its connect phase.
    pub connect: ConnectPhase,
    /// Its first connect, unix ns.
    pub started_unix_ns: u64,
    /// Its last join, unix ns.
    pub last_join_unix_ns: u64,
}

/// A `hold` child's last line, after `stop`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HoldDone {
    /// Its connections' counters (closes by the server during the hold).
    pub counts: Counts,
}

/// Runs `hold`: opens the share, prints [`HoldReady`], holds until `stop` (or stdin closes),
/// and returns [`HoldDone`] (printed as the last line).
pub async fn hold(o: &HoldOptions) -> anyhow::Result<HoldDone> {
    let specs = specs(&o.common, o.first_index, o.connections, o.room_size.max(1));
    let (swarm, connect) = Swarm::start(&o.common, specs, |_| false).await?;
    let started = swarm.ctx.origin_unix_ns;
    procs::say(&HoldReady {
        last_join_unix_ns: started + (connect.secs * 1e9) as u64,
        started_unix_ns: started,
        connect,
    })?;
    let mut words = procs::parent_words();
    while let Some(word) = procs::hear(&mut words).await {
        if word == "stop" {
            break;
        }
    }
    let outcomes = swarm.finish().await;
    Ok(HoldDone {
        counts: counts(&outcomes, |_| true),
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let mut s = format!(
            "connections: {} from {} process(es), {} rooms of {}\n",
            self.connect.human(),
            self.processes,
            self.rooms,
            self.room_size
        );
        if !self.connect.failures.is_empty() {
            s += &format!("failures: {:?}\n", self.connect.failures);
        }
        if let Some(t) = self.idle_after_last_join_s {
            s += &format!("server idle {t:.2} s after the last join\n");
        }
        if let (Some(b), Some(a), Some(p)) = (
            self.rss_before_kib,
            self.rss_after_kib,
            self.rss_per_connection_bytes,
        ) {
            s += &format!("server RSS {b} KiB -> {a} KiB: {p:.0} bytes per connection\n");
        }
        if let Some(c) = &self.idle_cpu {
            s += &format!(
                "idle CPU over {:.1} s hold: {:.2}% of a core (user {:.2} s, system {:.2} s)\n",
                c.wall_s, c.percent_of_core, c.user_s, c.system_s
            );
        }
        if !self.counts.closes.is_empty() {
            s += &format!("closed by server: {:?}\n", self.counts.closes);
        }
        s
    }
}
