//! `connections`: N authenticated connections in rooms of M, held idle. Reports the connect
//! rate, failures, and with `--server-pid` the server's RSS growth per connection, how soon
//! after the last join its CPU is idle again (join storm), and its idle CPU over the hold.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use crate::driver::{counts, ConnectPhase, Swarm};
use crate::member::{Behaviour, Counts, MemberSpec};
use crate::procfs::{clock_ticks, round3, sample, CpuFigures};
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
}

/// Runs `connections`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let m = o.room_size.max(1);
    let specs = (0..o.connections)
        .map(|i| MemberSpec {
            slot: i,
            user: format!("{}-u{i}", o.common.prefix),
            room: format!("{}-{}", o.common.prefix, i / m),
            behaviour: Behaviour::Good,
            send: None,
            content_bytes: 0,
            reconnect_every: None,
            churn_every: None,
            checked: false,
        })
        .collect();
    let (swarm, connect) = Swarm::start(&o.common, specs, |_| false).await?;
    let pids = &o.common.server_pids;
    let before = swarm.before;
    let last_join = swarm.ctx.origin + Duration::from_secs_f64(connect.secs);

    // Settle: the first 500 ms window (sampled every 100 ms) with under 5% of a core.
    let mut idle_after = None;
    let mut join_phase_cpu = None;
    if let Some(before) = swarm.before {
        swarm.bar.set_message("settling");
        let hz = clock_ticks() as f64;
        let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
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
                        (t0 - swarm.ctx.origin).as_secs_f64(),
                        None,
                    ));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let settled = sample(pids);
    let rss_per = match (swarm.before, settled) {
        (Some(b), Some(a)) if connect.joined > 0 => {
            Some(((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / connect.joined as f64).round())
        }
        _ => None,
    };

    swarm.bar.set_message("holding");
    swarm.bar.set_length(o.hold.max(1));
    swarm.bar.set_position(0);
    let hold_start = Instant::now();
    let at_hold = sample(pids);
    while hold_start.elapsed() < Duration::from_secs(o.hold) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        swarm.bar.set_position(hold_start.elapsed().as_secs());
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
    let outcomes = swarm.finish().await;
    Ok(Report {
        run: "connections",
        connections: o.connections,
        room_size: m,
        rooms: o.connections.div_ceil(m),
        connect,
        idle_after_last_join_s: idle_after,
        join_phase_cpu,
        rss_before_kib: before.map(|s| s.rss_kib),
        rss_after_kib: settled.map(|s| s.rss_kib),
        rss_per_connection_bytes: rss_per,
        hold_s: o.hold,
        idle_cpu,
        counts: counts(&outcomes, |_| true),
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let mut s = format!(
            "connections: {} joined, {} failed in {:.2} s ({:.0}/s), {} rooms of {}\n",
            self.connect.joined,
            self.connect.failed,
            self.connect.secs,
            self.connect.rate_per_s,
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
