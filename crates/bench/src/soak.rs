//! `soak`: C clients in rooms, 10% of them misbehaving — flooding sends (expect
//! `rate_limited`, then close 4008), stalling their reader (expect close 4009: the stalled
//! readers share one room, `PREFIX-soak-slow`, and post 4000-byte messages into it while not
//! reading, so each one's outbound queue overflows), sending garbage (expect `error bad_request`), dropping the connection abruptly
//! and resuming with `since`. Well-behaved clients post at human rates and must receive every
//! acked message of their room exactly once, in order; the run fails (exit 1) otherwise.
//!
//! Beside them, `--attackers K` of each kind in [`crate::attack`] (half-open HTTP heads,
//! join/leave churn over fresh names, history hogs that never read, refreshes to a narrower
//! claim, silent `/echo` sockets), counted apart; with `--server-pid` the report gives the
//! node's RSS and open files over the run.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::attack::AttackReport;
use crate::driver::{counts, ConnectPhase, Delivery, Drain, Latency, Loss, Traffic};
use crate::member::{Behaviour, Counts, MemberSpec, SendPlan};
use crate::{Common, HumanPace};

/// Options of `soak`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Clients.
    #[arg(short = 'c', long, default_value_t = 2000)]
    pub clients: usize,
    /// Members per room.
    #[arg(long, default_value_t = 50)]
    pub room_size: usize,
    /// Fraction of clients that misbehave (split evenly over the four behaviours).
    #[arg(long, default_value_t = 0.1)]
    pub misbehave_fraction: f64,
    /// Attackers of each kind (see `attack`); 0 for a baseline run without them.
    #[arg(long, default_value_t = 20)]
    pub attackers: usize,
    /// The server's `api.key`: the report then counts the rooms `GET /api/rooms` lists at the
    /// end (churned rooms are forgotten after `history.empty_room_ttl_s`).
    #[arg(long, env = "PARLEY_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Duration, well-behaved clients' pace and message size.
    #[command(flatten)]
    pub pace: HumanPace,
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
    /// The attackers and the server's resources over the run.
    pub attack: AttackReport,
    /// Well-behaved clients lost, duplicated and reordered nothing.
    pub ok: bool,
}

/// Runs `soak`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let human = o.pace.plan();
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
                    o.pace.size
                },
                reconnect_every,
                churn_every: None,
                checked: matches!(behaviour, Behaviour::Good | Behaviour::Abrupt),
            }
        })
        .collect();
    let is = |b: Behaviour| move |o: &crate::member::Outcome| o.spec.behaviour == b;
    let attack = crate::attack::start(
        &o.common,
        o.attackers,
        format!("{}-soak-slow", o.common.prefix),
        o.api_key.clone(),
    )
    .await?;
    let t = Traffic::run(
        &o.common,
        specs,
        |s| s.behaviour == Behaviour::Good,
        o.pace.duration(),
        |_| Drain::Quiet,
    )
    .await?;
    let attack = attack.finish().await;
    let outcomes = &t.outcomes;
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
                counts: counts(outcomes, is(b)),
            },
        );
    }
    let good_loss = t.loss(is(Behaviour::Good));
    let ok = good_loss.clean() && good_loss.members > 0;
    Ok(Report {
        run: "soak",
        clients: o.clients,
        rooms: o.clients.div_ceil(m),
        behaviours,
        good_latency: t.latency(is(Behaviour::Good)),
        abrupt_loss: t.loss(is(Behaviour::Abrupt)),
        good_loss,
        ok,
        attack,
        connect: t.connect,
        delivery: t.delivery,
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let mut s = format!(
            "soak: {} clients ({} failed) in {} rooms for {} s: {}\n{}\n",
            self.connect.joined,
            self.connect.failed,
            self.rooms,
            self.delivery.duration_s,
            if self.ok { "OK" } else { "FAILED" },
            self.delivery.human(),
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
            "well-behaved {}\nwell-behaved: {}\nabrupt reconnectors: lost {} of {}, recovered {} / not {}\n",
            self.good_latency.human("latency"),
            self.good_loss.human(),
            self.abrupt_loss.lost,
            self.abrupt_loss.expected,
            self.abrupt_loss.recovered,
            self.abrupt_loss.not_recovered,
        );
        s += &self.attack.human();
        s
    }
}
