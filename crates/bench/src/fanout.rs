//! `fanout`: N members in one room (the first K of them publish, together R messages/s of S
//! bytes, for T seconds). Reports deliveries/s, send-to-deliver latency, loss and duplicates
//! (every member must get every acked message once), and the server's CPU per delivery.
//!
//! The server limits sends per connection (default 10/s, burst 20): start it with
//! `--set limits.send_rate=100000 --set limits.send_burst=100000` for fan-out runs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::driver::{
    counts, latency, post_and_drain, ConnectPhase, Delivery, Latency, Loss, Swarm,
};
use crate::member::{Behaviour, MemberSpec, SendPlan};
use crate::{bench_line, cpu_line, Common};

/// Options of `fanout`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Members of the room, publishers included.
    #[arg(short = 'n', long, default_value_t = 2000)]
    pub members: usize,
    /// Messages per second, all publishers together.
    #[arg(short = 'r', long, default_value_t = 50.0)]
    pub rate: f64,
    /// Content size, bytes (at least the timestamp prefix).
    #[arg(short = 's', long, default_value_t = 64)]
    pub size: usize,
    /// Seconds to publish for.
    #[arg(short = 't', long, default_value_t = 20)]
    pub duration: u64,
    /// Publisher connections (the server limits sends per connection).
    #[arg(short = 'k', long, default_value_t = 1)]
    pub publishers: usize,
}

/// The result of `fanout`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always `fanout`.
    pub run: &'static str,
    /// Members of the room.
    pub members: usize,
    /// Publisher connections.
    pub publishers: usize,
    /// Offered messages per second.
    pub rate: f64,
    /// Content bytes.
    pub size: usize,
    /// The connect phase.
    pub connect: ConnectPhase,
    /// Delivery figures and server CPU.
    pub delivery: Delivery,
    /// Send-to-deliver latency over every member.
    pub latency: Latency,
    /// Loss over every member (expected = members × acked).
    pub loss: Loss,
}

/// Runs `fanout`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let k = o.publishers.clamp(1, o.members.max(1));
    let per_publisher = (o.rate / k as f64).max(0.001);
    let period = Duration::from_secs_f64(1.0 / per_publisher);
    let room = format!("{}-fanout", o.common.prefix);
    let specs = (0..o.members)
        .map(|i| MemberSpec {
            slot: i,
            user: format!("{}-u{i}", o.common.prefix),
            room: room.clone(),
            behaviour: Behaviour::Good,
            send: (i < k).then_some(SendPlan::Fixed(period)),
            content_bytes: o.size,
            reconnect_every: None,
            churn_every: None,
            checked: true,
        })
        .collect();
    let (swarm, connect) = Swarm::start(&o.common, specs, |_| true).await?;
    let members = connect.joined;
    let (mut delivery, acks) =
        post_and_drain(&swarm, &o.common, Duration::from_secs(o.duration), |ctx| {
            let acked: u64 = ctx.acks.snapshot().values().map(|v| v.len() as u64).sum();
            acked > 0 && ctx.deliveries.load(Ordering::Relaxed) >= acked * members
        })
        .await;
    let outcomes = swarm.finish().await;
    let c = counts(&outcomes, |_| true);
    delivery.sent = c.sent;
    delivery.rate_limited = c.rate_limited;
    Ok(Report {
        run: "fanout",
        members: o.members,
        publishers: k,
        rate: o.rate,
        size: o.size,
        connect,
        latency: latency(&outcomes, |_| true),
        loss: Loss::over(&outcomes, &acks, |_| true),
        delivery,
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let d = &self.delivery;
        let l = &self.latency;
        format!(
            "fanout: {} members ({} failed), {} publisher(s), {} msg/s × {} B for {} s\n\
             sent {} acked {} rate_limited {}; deliveries {} = {:.0}/s over {:.2} s (drain {:.2} s)\n\
             latency ms: p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ({} samples)\n\
             lost {} of {} expected, duplicated {}, seq gaps {}\n{}\n{}\n",
            self.connect.joined,
            self.connect.failed,
            self.publishers,
            self.rate,
            self.size,
            d.duration_s,
            d.sent,
            d.acked,
            d.rate_limited,
            d.deliveries,
            d.deliveries_per_s,
            d.delivery_window_s,
            d.drain_s,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            l.count,
            self.loss.lost,
            self.loss.expected,
            self.loss.duplicated,
            self.loss.seq_gaps,
            cpu_line(&d.server_cpu),
            bench_line(&d.bench_cpu),
        )
    }
}
