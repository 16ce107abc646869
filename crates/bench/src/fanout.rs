//! `fanout`: N members in one room (K of them publish, together R messages/s of S bytes, for
//! T seconds). Reports deliveries/s, send-to-deliver latency, loss and duplicates (every
//! member must get every acked message once), the server's CPU per delivery, and what the
//! publishers really offered.
//!
//! Publishers keep an absolute schedule (a late send does not delay the next ones) and stamp
//! each message with its scheduled time, so a late send shows as latency and as `send_lag`
//! instead of as a lower offered rate. With `--publisher-process` the K publishers run in a
//! child process of their own (hidden subcommand `publish`), so a bench process busy reading
//! thousands of sockets cannot hold them back; its counts (sent, acked, the acked seqs, its
//! own deliveries and loss) come back as JSON on its stdout and are merged into the report.
//!
//! The server limits sends per connection (default 10/s, burst 20): start it with
//! `--set limits.send_rate=100000 --set limits.send_burst=100000` for fan-out runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::driver::{ConnectPhase, Delivery, Drain, Latency, Loss, Offered, Swarm};
use crate::member::{Behaviour, Counts, Ctx, MemberSpec, SendPlan};
use crate::procfs::CpuFigures;
use crate::procs::{self, Child};
use crate::{process_cpu_line, Common};

/// What is published: the rate, size and duration `fanout` and `publish` share.
#[derive(Args, Debug, Clone)]
pub struct Load {
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

impl Load {
    /// `k` publishers from `first_slot` on, users `PREFIX-u<slot>`, posting into `room` on
    /// the schedule.
    fn publishers(&self, common: &Common, room: &str, first_slot: usize) -> Vec<MemberSpec> {
        let k = self.publishers.max(1);
        let period = Duration::from_secs_f64(1.0 / (self.rate / k as f64).max(0.001));
        (first_slot..first_slot + k)
            .map(|slot| member(common, room, slot, Some(SendPlan::Fixed(period)), self.size))
            .collect()
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }
}

fn member(
    common: &Common,
    room: &str,
    slot: usize,
    send: Option<SendPlan>,
    size: usize,
) -> MemberSpec {
    MemberSpec {
        slot,
        user: format!("{}-u{slot}", common.prefix),
        room: room.to_owned(),
        behaviour: Behaviour::Good,
        send,
        content_bytes: size,
        reconnect_every: None,
        churn_every: None,
        checked: true,
    }
}

/// Done once every member has every acked message.
fn all_delivered(ctx: &Ctx, members: u64) -> Drain {
    let acked: u64 = ctx.acks.snapshot().values().map(|v| v.len() as u64).sum();
    if acked > 0 && ctx.deliveries.load(Ordering::Relaxed) >= acked * members {
        Drain::Complete
    } else {
        Drain::Quiet
    }
}

/// Options of `fanout`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Members of the room, publishers included.
    #[arg(short = 'n', long, default_value_t = 2000)]
    pub members: usize,
    /// Rate, size, duration, publishers.
    #[command(flatten)]
    pub load: Load,
    /// Run the K publishers in a child process of their own (so a busy receiving process
    /// cannot delay them); the N − K receivers stay in this one.
    #[arg(long)]
    pub publisher_process: bool,
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
    /// Whether the publishers ran in a process of their own.
    pub publisher_process: bool,
    /// Offered messages per second.
    pub rate: f64,
    /// Content bytes.
    pub size: usize,
    /// What the publishers really offered, and how late they sent.
    pub offered: Offered,
    /// The connect phase (receivers, then the publisher process, if any).
    pub connect: ConnectPhase,
    /// Delivery figures and server CPU (deliveries of every member, in both processes).
    pub delivery: Delivery,
    /// The publisher process's own CPU over its sending phase.
    pub publisher_cpu: Option<CpuFigures>,
    /// Send-to-deliver latency, from the scheduled send time, over every member in this
    /// process (with `--publisher-process`: the receivers).
    pub latency: Latency,
    /// Loss over every member (expected = members × acked).
    pub loss: Loss,
}

/// Runs `fanout`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let k = o.load.publishers.clamp(1, o.members.max(1));
    let load = Load {
        publishers: k,
        ..o.load.clone()
    };
    let room = format!("{}-fanout", o.common.prefix);
    let (in_process, receivers) = if o.publisher_process {
        (0, o.members - k)
    } else {
        (k, o.members)
    };
    let mut specs = load.publishers(&o.common, &room, 0);
    specs.truncate(in_process);
    specs.extend((in_process..receivers).map(|i| member(&o.common, &room, i, None, o.load.size)));
    let (swarm, connect) = Swarm::start(&o.common, specs, |_| true).await?;
    let joined = connect.joined;
    let mut report = if o.publisher_process {
        with_publisher_process(o, &load, &room, swarm, connect).await?
    } else {
        let t = swarm
            .traffic(connect, &o.common, load.duration(), |ctx| {
                all_delivered(ctx, joined)
            })
            .await;
        Report {
            run: "fanout",
            members: o.members,
            publishers: k,
            publisher_process: false,
            rate: o.load.rate,
            size: o.load.size,
            offered: Offered::of(&t.outcomes, o.load.rate, load.duration()),
            publisher_cpu: None,
            latency: t.latency(|_| true),
            loss: t.loss(|_| true),
            connect: t.connect,
            delivery: t.delivery,
        }
    };
    report.offered.target_rate = o.load.rate;
    Ok(report)
}

/// The receivers (already joined in `swarm`) here, the publishers in a child process.
async fn with_publisher_process(
    o: &Options,
    load: &Load,
    room: &str,
    swarm: Swarm,
    connect: ConnectPhase,
) -> anyhow::Result<Report> {
    let receivers = connect.joined;
    let mut args = vec!["publish".to_owned()];
    args.extend(procs::common_args(&o.common, &o.common.urls));
    args.extend([
        "--room".to_owned(),
        room.to_owned(),
        "--first-slot".to_owned(),
        (o.members - load.publishers).to_string(),
        "-r".to_owned(),
        load.rate.to_string(),
        "-s".to_owned(),
        load.size.to_string(),
        "-t".to_owned(),
        load.duration.to_string(),
        "-k".to_owned(),
        load.publishers.to_string(),
    ]);
    let exe = procs::exe(&o.common)?;
    let mut child = Child::spawn(
        "publisher process".into(),
        &exe,
        args,
        o.common.secret.as_deref(),
    )?;
    let _ready: PublisherReady = child.next().await?;
    child.tell("go").await?;
    // The child's figures arrive once it has drained; until then the drain here stays open.
    let reported = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let waiter = {
        let (reported, acked) = (reported.clone(), acked.clone());
        tokio::spawn(async move {
            let result = child.next::<PublisherReport>().await;
            if let Ok(r) = &result {
                acked.store(r.counts.acked, Ordering::Relaxed);
            }
            reported.store(true, Ordering::Release);
            (result, child)
        })
    };
    let t = swarm
        .traffic(connect, &o.common, load.duration(), |ctx| {
            if !reported.load(Ordering::Acquire) {
                return Drain::Busy;
            }
            let acked = acked.load(Ordering::Relaxed);
            if acked > 0 && ctx.deliveries.load(Ordering::Relaxed) >= acked * receivers {
                Drain::Complete
            } else {
                Drain::Quiet
            }
        })
        .await;
    let (result, child) = waiter.await?;
    let p = result?;
    child.wait().await?;

    let latency = t.latency(|_| true);
    let mut loss = Loss::over(&t.outcomes, &p.acks, |_| true);
    loss.add(&p.loss);
    let mut delivery = t.delivery;
    delivery.sent = p.counts.sent;
    delivery.acked = p.counts.acked;
    delivery.rate_limited = p.counts.rate_limited;
    delivery.deliveries += p.counts.deliveries;
    if delivery.delivery_window_s > 0.0 {
        delivery.deliveries_per_s =
            (delivery.deliveries as f64 / delivery.delivery_window_s).round();
    }
    let connect = ConnectPhase::merge(
        &[t.connect.clone(), p.connect.clone()],
        t.connect.secs + p.connect.secs,
    );
    Ok(Report {
        run: "fanout",
        members: o.members,
        publishers: load.publishers,
        publisher_process: true,
        rate: o.load.rate,
        size: o.load.size,
        offered: p.offered,
        connect,
        delivery,
        publisher_cpu: p.cpu,
        latency,
        loss,
    })
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let d = &self.delivery;
        format!(
            "fanout: {} members ({} failed), {} publisher(s){}, {} msg/s × {} B for {} s\n\
             {}\n{}\n{}\n{}\n{}",
            self.connect.joined,
            self.connect.failed,
            self.publishers,
            if self.publisher_process {
                " in a process of their own"
            } else {
                ""
            },
            self.rate,
            self.size,
            d.duration_s,
            self.offered.human(),
            d.human(),
            self.latency.human("latency"),
            self.loss.human(),
            process_cpu_line("publisher process", &self.publisher_cpu),
        )
    }
}

/// Options of the hidden `publish` subcommand: the publisher process of
/// `fanout --publisher-process`.
#[derive(Args, Debug, Clone)]
pub struct PublishOptions {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// The room.
    #[arg(long)]
    pub room: String,
    /// Slot (user name and source address) of the first publisher.
    #[arg(long, default_value_t = 0)]
    pub first_slot: usize,
    /// Rate, size, duration, publishers.
    #[command(flatten)]
    pub load: Load,
}

/// The publisher process's first line: its publishers joined.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublisherReady {
    /// Its connect phase.
    pub connect: ConnectPhase,
}

/// The publisher process's figures (its last line).
#[derive(Debug, Serialize, Deserialize)]
pub struct PublisherReport {
    /// Its connect phase.
    pub connect: ConnectPhase,
    /// What it offered.
    pub offered: Offered,
    /// Its publishers' counters (sent, acked, their own deliveries).
    pub counts: Counts,
    /// The publishers' own loss as members of the room.
    pub loss: Loss,
    /// The acked seqs per room.
    pub acks: HashMap<String, Vec<u64>>,
    /// Its own CPU over the sending phase.
    pub cpu: Option<CpuFigures>,
}

/// Runs `publish`: joins the publishers, prints [`PublisherReady`], waits for `go` on stdin,
/// publishes on schedule for the duration, drains, and returns [`PublisherReport`] (printed
/// as the last line).
pub async fn publish(o: &PublishOptions) -> anyhow::Result<PublisherReport> {
    let specs = o.load.publishers(&o.common, &o.room, o.first_slot);
    let (swarm, connect) = Swarm::start(&o.common, specs, |_| false).await?;
    procs::say(&PublisherReady {
        connect: connect.clone(),
    })?;
    let mut words = procs::parent_words();
    if procs::hear(&mut words).await.as_deref() != Some("go") {
        anyhow::bail!("publish: no `go` from the parent");
    }
    let joined = connect.joined;
    let t = swarm
        .traffic(connect, &o.common, o.load.duration(), |ctx| {
            all_delivered(ctx, joined)
        })
        .await;
    Ok(PublisherReport {
        offered: Offered::of(&t.outcomes, o.load.rate, o.load.duration()),
        counts: t.counts.clone(),
        loss: t.loss(|_| true),
        cpu: t.delivery.bench_cpu.clone(),
        acks: t.acks,
        connect: t.connect,
    })
}
