//! `soak`: C clients in rooms, 10% of them misbehaving — flooding sends (expect
//! `rate_limited`, then close 4008), stalling their reader (expect close 4009: the stalled
//! readers share one room, `PREFIX-soak-slow`, and post 4000-byte messages into it while not
//! reading, so each one's outbound queue overflows), sending garbage (expect `error bad_request`), dropping the connection abruptly
//! and resuming with `since`. Well-behaved clients post at human rates and must receive every
//! acked message of their room exactly once, in order; the run fails (exit 1) otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::driver::{
    counts, latency, post_and_drain, ConnectPhase, Delivery, Latency, Loss, Swarm,
};
use crate::member::{Behaviour, Counts, MemberSpec, SendPlan};
use crate::{bench_line, cpu_line, Common};

/// Options of `soak`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Clients.
    #[arg(short = 'c', long, default_value_t = 2000)]
    pub clients: usize,
    /// Seconds of traffic.
    #[arg(short = 'd', long, default_value_t = 60)]
    pub duration: u64,
    /// Members per room.
    #[arg(long, default_value_t = 50)]
    pub room_size: usize,
    /// Fraction of clients that misbehave (split evenly over the four behaviours).
    #[arg(long, default_value_t = 0.1)]
    pub misbehave_fraction: f64,
    /// Shortest pause between a well-behaved client's messages, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub send_min_s: f64,
    /// Longest pause between a well-behaved client's messages, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub send_max_s: f64,
    /// Content size, bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

/// One behaviour's clients.
#[derive(Debug, Serialize)]
pub struct Group {
    /// Clients with this behaviour.
    pub clients: u64,
    /// Their counters (sent, acked, rate_limited, bad_request, closes by code, reconnects...).
    pub counts: Counts,
}

/// The result of `soak`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always `soak`.
    pub run: &'static str,
    /// Clients.
    pub clients: usize,
    /// Rooms.
    pub rooms: usize,
    /// The connect phase.
    pub connect: ConnectPhase,
    /// Delivery figures (all clients) and server CPU.
    pub delivery: Delivery,
    /// Counters per behaviour.
    pub behaviours: BTreeMap<String, Group>,
    /// Latency seen by well-behaved clients.
    pub good_latency: Latency,
    /// Loss over well-behaved clients: must be zero.
    pub good_loss: Loss,
    /// Loss over clients that reconnect abruptly with `since` (reported, not judged).
    pub abrupt_loss: Loss,
    /// Well-behaved clients lost, duplicated and reordered nothing.
    pub ok: bool,
}

/// Runs `soak`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let human = SendPlan::Random(
        Duration::from_secs_f64(o.send_min_s),
        Duration::from_secs_f64(o.send_max_s.max(o.send_min_s)),
    );
    let every_nth = if o.misbehave_fraction > 0.0 {
        ((1.0 / o.misbehave_fraction).round() as usize).max(1)
    } else {
        usize::MAX
    };
    let m = o.room_size.max(1);
    let specs = (0..o.clients)
        .map(|i| {
            let behaviour = if i % every_nth == every_nth - 1 {
                match (i / every_nth) % 4 {
                    0 => Behaviour::Flood,
                    1 => Behaviour::StopReading,
                    2 => Behaviour::Garbage,
                    _ => Behaviour::Abrupt,
                }
            } else {
                Behaviour::Good
            };
            let (send, reconnect_every) = match behaviour {
                Behaviour::Good => (Some(human), None),
                Behaviour::Flood => (Some(SendPlan::Fixed(Duration::from_millis(100))), None),
                Behaviour::StopReading => (
                    Some(SendPlan::Random(
                        Duration::from_secs(5),
                        Duration::from_secs(15),
                    )),
                    None,
                ),
                Behaviour::Garbage => (
                    Some(SendPlan::Random(
                        Duration::from_secs(1),
                        Duration::from_secs(2),
                    )),
                    None,
                ),
                Behaviour::Abrupt => (
                    Some(human),
                    Some((Duration::from_secs(3), Duration::from_secs(10))),
                ),
            };
            MemberSpec {
                slot: i,
                user: format!("{}-u{i}", o.common.prefix),
                room: if behaviour == Behaviour::StopReading {
                    format!("{}-soak-slow", o.common.prefix)
                } else {
                    format!("{}-soak-{}", o.common.prefix, i / m)
                },
                behaviour,
                send,
                content_bytes: if behaviour == Behaviour::StopReading {
                    4000
                } else {
                    o.size
                },
                reconnect_every,
                churn_every: None,
                checked: matches!(behaviour, Behaviour::Good | Behaviour::Abrupt),
            }
        })
        .collect();
    let (swarm, connect) =
        Swarm::start(&o.common, specs, |s| s.behaviour == Behaviour::Good).await?;
    let (mut delivery, acks) =
        post_and_drain(&swarm, &o.common, Duration::from_secs(o.duration), |_| {
            false
        })
        .await;
    let outcomes = swarm.finish().await;
    let all = counts(&outcomes, |_| true);
    delivery.sent = all.sent;
    delivery.rate_limited = all.rate_limited;
    let mut behaviours = BTreeMap::new();
    for b in [
        Behaviour::Good,
        Behaviour::Flood,
        Behaviour::StopReading,
        Behaviour::Garbage,
        Behaviour::Abrupt,
    ] {
        let name = serde_json::to_value(b)?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        behaviours.insert(
            name,
            Group {
                clients: outcomes.iter().filter(|o| o.spec.behaviour == b).count() as u64,
                counts: counts(&outcomes, |o| o.spec.behaviour == b),
            },
        );
    }
    let good_loss = Loss::over(&outcomes, &acks, |o| o.spec.behaviour == Behaviour::Good);
    let ok = good_loss.clean() && good_loss.members > 0;
    Ok(Report {
        run: "soak",
        clients: o.clients,
        rooms: o.clients.div_ceil(m),
        connect,
        delivery,
        behaviours,
        good_latency: latency(&outcomes, |o| o.spec.behaviour == Behaviour::Good),
        abrupt_loss: Loss::over(&outcomes, &acks, |o| o.spec.behaviour == Behaviour::Abrupt),
        good_loss,
        ok,
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let d = &self.delivery;
        let l = &self.good_latency;
        let mut s = format!(
            "soak: {} clients ({} failed) in {} rooms for {} s: {}\n\
             sent {} acked {} rate_limited {}; deliveries {} = {:.0}/s\n",
            self.connect.joined,
            self.connect.failed,
            self.rooms,
            d.duration_s,
            if self.ok { "OK" } else { "FAILED" },
            d.sent,
            d.acked,
            d.rate_limited,
            d.deliveries,
            d.deliveries_per_s,
        );
        for (name, g) in &self.behaviours {
            let c = &g.counts;
            s += &format!(
                "  {name:13} {:5} clients: sent {} acked {} rate_limited {} bad_request {} (garbage sent {}) stalls not closed {} reconnects {} closes {:?}\n",
                g.clients, c.sent, c.acked, c.rate_limited, c.bad_request, c.garbage_sent,
                c.stall_not_closed, c.reconnects, c.closes
            );
        }
        s += &format!(
            "well-behaved latency ms: p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ({} samples)\n\
             well-behaved: lost {} of {} expected, duplicated {}, seq gaps {}, out of order {}\n\
             abrupt reconnectors: lost {} of {}, recovered {} / not {}\n{}\n{}\n",
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            l.count,
            self.good_loss.lost,
            self.good_loss.expected,
            self.good_loss.duplicated,
            self.good_loss.seq_gaps,
            self.good_loss.out_of_order,
            self.abrupt_loss.lost,
            self.abrupt_loss.expected,
            self.abrupt_loss.recovered,
            self.abrupt_loss.not_recovered,
            cpu_line(&d.server_cpu),
            bench_line(&d.bench_cpu),
        );
        s
    }
}
