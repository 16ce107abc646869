//! `chat`: a realistic mix. Many rooms of a few to a few hundred members (sizes drawn
//! log-uniformly), every member posting at a human rate, some members leaving and rejoining,
//! some dropping their connection and resuming with `since`/`epoch` (which must answer
//! `recovered: true` with nothing missing). Reports the same figures as `fanout`.

use clap::Args;
use rand::Rng;
use serde::Serialize;

use crate::driver::{ConnectPhase, Delivery, Drain, Latency, Loss, Traffic};
use crate::member::{Behaviour, Counts, MemberSpec};
use crate::{Common, HumanPace};

/// Options of `chat`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Clients.
    #[arg(short = 'c', long, default_value_t = 2000)]
    pub clients: usize,
    /// Smallest room.
    #[arg(long, default_value_t = 3)]
    pub min_room: usize,
    /// Largest room.
    #[arg(long, default_value_t = 300)]
    pub max_room: usize,
    /// Duration, pace and message size.
    #[command(flatten)]
    pub pace: HumanPace,
    /// Fraction of members that leave and rejoin now and then.
    #[arg(long, default_value_t = 0.1)]
    pub churn_fraction: f64,
    /// Fraction of members that drop their connection now and then and resume with `since`.
    #[arg(long, default_value_t = 0.1)]
    pub reconnect_fraction: f64,
}

/// The result of `chat`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always `chat`.
    pub run: &'static str,
    /// Clients.
    pub clients: usize,
    /// Rooms.
    pub rooms: usize,
    /// Largest room.
    pub largest_room: usize,
    /// The connect phase.
    pub connect: ConnectPhase,
    /// Delivery figures and server CPU.
    pub delivery: Delivery,
    /// Send-to-deliver latency.
    pub latency: Latency,
    /// Loss over every member, within each membership interval.
    pub loss: Loss,
    /// Counters: leaves, rejoins, reconnects, closes.
    pub counts: Counts,
}

/// Room sizes drawn log-uniformly between the bounds until `clients` are placed.
pub fn room_sizes(clients: usize, min: usize, max: usize) -> Vec<usize> {
    let (min, max) = (min.max(1), max.max(min.max(1)));
    let mut rng = rand::thread_rng();
    let mut sizes = Vec::new();
    let mut left = clients;
    while left > 0 {
        let x: f64 = rng.gen_range((min as f64).ln()..=(max as f64).ln());
        let size = (x.exp().round() as usize).clamp(min, max).min(left);
        sizes.push(size);
        left -= size;
    }
    sizes
}

/// Runs `chat`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let sizes = room_sizes(o.clients, o.min_room, o.max_room);
    let plan = o.pace.plan();
    let every = Some(o.pace.bounds());
    let mut rng = rand::thread_rng();
    let mut specs = Vec::with_capacity(o.clients);
    for (r, &size) in sizes.iter().enumerate() {
        for _ in 0..size {
            let i = specs.len();
            let roll: f64 = rng.gen();
            let churn = roll < o.churn_fraction;
            let reconnect = !churn && roll < o.churn_fraction + o.reconnect_fraction;
            specs.push(MemberSpec {
                slot: i,
                user: format!("{}-u{i}", o.common.prefix),
                room: format!("{}-chat-{r}", o.common.prefix),
                behaviour: if reconnect {
                    Behaviour::Abrupt
                } else {
                    Behaviour::Good
                },
                send: Some(plan),
                content_bytes: o.pace.size,
                reconnect_every: reconnect.then_some(every).flatten(),
                churn_every: churn.then_some(every).flatten(),
                checked: true,
            });
        }
    }
    let t = Traffic::run(
        &o.common,
        specs,
        |_| true,
        o.pace.duration(),
        |_| Drain::Quiet,
    )
    .await?;
    Ok(Report {
        run: "chat",
        clients: o.clients,
        rooms: sizes.len(),
        largest_room: sizes.iter().copied().max().unwrap_or(0),
        latency: t.latency(|_| true),
        loss: t.loss(|_| true),
        connect: t.connect,
        delivery: t.delivery,
        counts: t.counts,
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        format!(
            "chat: {} clients ({} failed) in {} rooms (largest {}) for {} s\n{}\n\
             leaves {} rejoins {} reconnects {} (recovered {}, not recovered {}); closes {:?}\n\
             {}\n{}\n",
            self.connect.joined,
            self.connect.failed,
            self.rooms,
            self.largest_room,
            self.delivery.duration_s,
            self.delivery.human(),
            self.counts.leaves,
            self.counts.rejoins,
            self.counts.reconnects,
            self.loss.recovered,
            self.loss.not_recovered,
            self.counts.closes,
            self.latency.human("latency"),
            self.loss.human(),
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn room_sizes_cover_every_client() {
        let sizes = super::room_sizes(2000, 3, 300);
        assert_eq!(sizes.iter().sum::<usize>(), 2000);
        assert!(sizes.iter().all(|&s| s <= 300));
    }
}
