//! The shared run flow: spawn members, wait until all joined, let them post for the run's
//! duration, drain, measure the server from /proc, and fold the outcomes into figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::member::{new_histogram, run_member, Counts, Ctx, MemberSpec, Outcome};
use crate::net::{parse_source_ips, unix_nanos, Dialer};
use crate::procfs::{round3, sample, CpuFigures, Sample};
use crate::Common;
use crate::{bench_line, cpu_line};

/// Longest the drain after the sending phase may take.
pub const MAX_DRAIN: Duration = Duration::from_secs(60);

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// How many deliveries were measured.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of a µs histogram.
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// `what ms: p50 … (n samples)` for the human summaries.
    pub fn human(&self, what: &str) -> String {
        format!(
            "{what} ms: p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ({} samples)",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// Loss accounting over a set of members.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Loss {
    /// Members counted.
    pub members: u64,
    /// Acked messages these members should have received (sum over members).
    pub expected: u64,
    /// Of those, not received.
    pub lost: u64,
    /// Events received more than once.
    pub duplicated: u64,
    /// Seqs skipped in a live stream.
    pub seq_gaps: u64,
    /// Events received below the highest seq seen.
    pub out_of_order: u64,
    /// Rejoins with `since` answered `recovered: true`.
    pub recovered: u64,
    /// Rejoins with `since` answered `recovered: false`.
    pub not_recovered: u64,
}

impl Loss {
    /// Folds the members that `pick` selects.
    pub fn over(
        outcomes: &[Outcome],
        acks: &HashMap<String, Vec<u64>>,
        pick: impl Fn(&Outcome) -> bool,
    ) -> Loss {
        let mut loss = Loss::default();
        let empty = Vec::new();
        for o in outcomes.iter().filter(|o| o.connected && pick(o)) {
            let acked = acks.get(&o.spec.room).unwrap_or(&empty);
            loss.members += 1;
            loss.expected += o.track.expected(acked);
            loss.lost += o.track.lost(acked);
            loss.duplicated += o.track.duplicates;
            loss.seq_gaps += o.track.gaps;
            loss.out_of_order += o.track.out_of_order;
            loss.recovered += o.track.recovered;
            loss.not_recovered += o.track.not_recovered;
        }
        loss
    }

    /// Nothing lost, duplicated or reordered.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.seq_gaps == 0 && self.out_of_order == 0
    }

    /// Adds the loss over other members (another process's).
    pub fn add(&mut self, o: &Loss) {
        self.members += o.members;
        self.expected += o.expected;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.seq_gaps += o.seq_gaps;
        self.out_of_order += o.out_of_order;
        self.recovered += o.recovered;
        self.not_recovered += o.not_recovered;
    }

    /// `lost … of … expected, …` for the human summaries.
    pub fn human(&self) -> String {
        format!(
            "lost {} of {} expected, duplicated {}, seq gaps {}, out of order {}",
            self.lost, self.expected, self.duplicated, self.seq_gaps, self.out_of_order
        )
    }
}

/// The connect phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectPhase {
    /// Members asked for.
    pub attempted: u64,
    /// Members connected and joined.
    pub joined: u64,
    /// Members that failed to connect or join.
    pub failed: u64,
    /// Failures by category.
    pub failures: BTreeMap<String, u64>,
    /// From the first connect to the last join, seconds.
    pub secs: f64,
    /// Joined connections per second.
    pub rate_per_s: f64,
    /// The bench process's own CPU over the connect phase (client and server share the
    /// machine: a busy bench limits what the server is offered).
    pub bench_cpu: Option<CpuFigures>,
}

impl ConnectPhase {
    /// One connect phase out of several processes': counts and failures summed, the rate over
    /// `secs` (from the first process's first connect to the last join anywhere), CPU summed.
    pub fn merge(phases: &[ConnectPhase], secs: f64) -> ConnectPhase {
        let mut failures = BTreeMap::new();
        for p in phases {
            for (k, v) in &p.failures {
                *failures.entry(k.clone()).or_default() += v;
            }
        }
        let joined = phases.iter().map(|p| p.joined).sum::<u64>();
        ConnectPhase {
            attempted: phases.iter().map(|p| p.attempted).sum(),
            joined,
            failed: phases.iter().map(|p| p.failed).sum(),
            failures,
            secs: round3(secs),
            rate_per_s: if secs > 0.0 {
                (joined as f64 / secs).round()
            } else {
                0.0
            },
            bench_cpu: CpuFigures::sum(phases.iter().filter_map(|p| p.bench_cpu.as_ref())),
        }
    }

    /// `N joined (F failed) in S s (R/s)` for the human summaries.
    pub fn human(&self) -> String {
        format!(
            "{} joined, {} failed in {:.2} s ({:.0}/s)",
            self.joined, self.failed, self.secs, self.rate_per_s
        )
    }
}

/// How the drain after the sending phase stands, as a run judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Something outside the swarm is still in flight (a publisher process has not reported):
    /// keep waiting even if deliveries stopped.
    Busy,
    /// Stop once deliveries have not moved for a second.
    Quiet,
    /// Everything expected arrived: stop now.
    Complete,
}

/// A spawned set of members.
pub struct Swarm {
    /// Their shared state.
    pub ctx: Arc<Ctx>,
    handles: Vec<JoinHandle<Outcome>>,
    /// The progress bar (stderr).
    pub bar: ProgressBar,
    /// Server reading before the first connect.
    pub before: Option<Sample>,
}

impl Swarm {
    /// Spawns the members and waits until each has joined or failed.
    pub async fn start(
        common: &Common,
        specs: Vec<MemberSpec>,
        record_latency: impl Fn(&MemberSpec) -> bool,
    ) -> anyhow::Result<(Swarm, ConnectPhase)> {
        let sources = match &common.source_ips {
            Some(spec) => parse_source_ips(spec)?,
            None => Vec::new(),
        };
        let dialer = Dialer::new(
            &common.urls,
            sources,
            common.secret.as_deref(),
            common.connect_concurrency,
        )
        .await?;
        let before = sample(&common.server_pids);
        let bench_before = sample(&[std::process::id()]);
        let ctx = Ctx::new(dialer);
        let total = specs.len() as u64;
        let bar = if common.json || common.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total)
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg:12} [{bar:40}] {pos}/{len} {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message("connecting");
        let handles = specs
            .into_iter()
            .map(|spec| {
                let latency = record_latency(&spec);
                tokio::spawn(run_member(ctx.clone(), spec, latency))
            })
            .collect();
        loop {
            let done = ctx.joined.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed);
            bar.set_position(done);
            if done >= total {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = Duration::from_nanos(ctx.last_join_ns.load(Ordering::Relaxed)).as_secs_f64();
        let joined = ctx.joined.load(Ordering::Relaxed);
        let phase = ConnectPhase {
            attempted: total,
            joined,
            failed: ctx.failed.load(Ordering::Relaxed),
            failures: ctx.failures.lock().expect("failures lock").clone(),
            secs: round3(secs),
            rate_per_s: if secs > 0.0 {
                (joined as f64 / secs).round()
            } else {
                0.0
            },
            bench_cpu: bench_before
                .zip(sample(&[std::process::id()]))
                .map(|(a, b)| CpuFigures::between(a, b, ctx.origin.elapsed().as_secs_f64(), None)),
        };
        Ok((
            Swarm {
                ctx,
                handles,
                bar,
                before,
            },
            phase,
        ))
    }

    /// Stops every member and collects their outcomes.
    pub async fn finish(self) -> Vec<Outcome> {
        self.ctx.stop.cancel();
        let mut out = Vec::with_capacity(self.handles.len());
        for h in self.handles {
            if let Ok(o) = h.await {
                out.push(o);
            }
        }
        self.bar.finish_and_clear();
        out
    }

    /// Lets the members post for `duration`, drains, stops them and collects.
    pub async fn traffic(
        self,
        connect: ConnectPhase,
        common: &Common,
        duration: Duration,
        drain: impl Fn(&Ctx) -> Drain,
    ) -> Traffic {
        let (mut delivery, acks) = post_and_drain(&self, common, duration, drain).await;
        let outcomes = self.finish().await;
        let counts = counts(&outcomes, |_| true);
        delivery.sent = counts.sent;
        delivery.rate_limited = counts.rate_limited;
        Traffic {
            connect,
            delivery,
            acks,
            outcomes,
            counts,
        }
    }
}

/// Figures of a run that posts messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// Seconds members posted for.
    pub duration_s: f64,
    /// Messages posted.
    pub sent: u64,
    /// Messages acked.
    pub acked: u64,
    /// `rate_limited` refusals.
    pub rate_limited: u64,
    /// Live deliveries of bench messages, all members.
    pub deliveries: u64,
    /// Deliveries per second, from the go signal to the last delivery.
    pub deliveries_per_s: f64,
    /// Seconds from the go signal to the last delivery.
    pub delivery_window_s: f64,
    /// Seconds the drain (after the last send) took until deliveries stopped.
    pub drain_s: f64,
    /// Server CPU over the delivery window (with `--server-pid`).
    pub server_cpu: Option<CpuFigures>,
    /// The bench process's own CPU over the same window.
    pub bench_cpu: Option<CpuFigures>,
}

impl Delivery {
    /// The delivery lines of the human summaries, server and bench CPU included.
    pub fn human(&self) -> String {
        format!(
            "sent {} acked {} rate_limited {}; deliveries {} = {:.0}/s over {:.2} s (drain {:.2} s)\n{}\n{}",
            self.sent,
            self.acked,
            self.rate_limited,
            self.deliveries,
            self.deliveries_per_s,
            self.delivery_window_s,
            self.drain_s,
            cpu_line(&self.server_cpu),
            bench_line(&self.bench_cpu),
        )
    }
}

/// What a run that posts collects: the connect phase, the delivery figures, the acked seqs
/// per room, every member's outcome and their counters summed.
pub struct Traffic {
    /// The connect phase.
    pub connect: ConnectPhase,
    /// Delivery figures (`sent` and `rate_limited` filled in from the counters).
    pub delivery: Delivery,
    /// Acked seqs per room.
    pub acks: HashMap<String, Vec<u64>>,
    /// Every member's outcome.
    pub outcomes: Vec<Outcome>,
    /// Every member's counters, summed.
    pub counts: Counts,
}

impl Traffic {
    /// Starts the members, lets them post for `duration`, drains and collects.
    pub async fn run(
        common: &Common,
        specs: Vec<MemberSpec>,
        record_latency: impl Fn(&MemberSpec) -> bool,
        duration: Duration,
        drain: impl Fn(&Ctx) -> Drain,
    ) -> anyhow::Result<Traffic> {
        let (swarm, connect) = Swarm::start(common, specs, record_latency).await?;
        Ok(swarm.traffic(connect, common, duration, drain).await)
    }

    /// The latency over the members `pick` selects.
    pub fn latency(&self, pick: impl Fn(&Outcome) -> bool) -> Latency {
        latency(&self.outcomes, pick)
    }

    /// The loss over the members `pick` selects.
    pub fn loss(&self, pick: impl Fn(&Outcome) -> bool) -> Loss {
        Loss::over(&self.outcomes, &self.acks, pick)
    }
}

/// What fixed-rate publishers offered against what was asked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Offered {
    /// Messages per second asked for, all publishers together.
    pub target_rate: f64,
    /// Sends due by the schedule while sending lasted.
    pub scheduled: u64,
    /// Sends made.
    pub sent: u64,
    /// Sends made per second of the sending phase.
    pub rate_per_s: f64,
    /// How late sends were against their schedule (a late send is stamped with its scheduled
    /// time, so this lateness is part of the delivery latency too).
    pub send_lag: Latency,
}

impl Offered {
    /// Folds the fixed-rate publishers among `outcomes`.
    pub fn of(outcomes: &[Outcome], target_rate: f64, duration: Duration) -> Offered {
        let mut lag = new_histogram();
        let (mut sent, mut unsent) = (0, 0);
        for o in outcomes.iter().filter(|o| o.send_lag.is_some()) {
            if let Some(h) = &o.send_lag {
                let _ = lag.add(h);
            }
            sent += o.counts.sent;
            unsent += o.unsent;
        }
        let secs = duration.as_secs_f64();
        Offered {
            target_rate,
            scheduled: sent + unsent,
            sent,
            rate_per_s: if secs > 0.0 {
                round3(sent as f64 / secs)
            } else {
                0.0
            },
            send_lag: Latency::of(&lag),
        }
    }

    /// `offered …` for the human summaries.
    pub fn human(&self) -> String {
        format!(
            "offered {:.1} msg/s of {:.1} asked ({} sent of {} scheduled); {}",
            self.rate_per_s,
            self.target_rate,
            self.sent,
            self.scheduled,
            self.send_lag.human("send lag"),
        )
    }
}

/// Lets the members post for `duration`, then drains: waits until no send is pending, no
/// member is mid-reconnect, and deliveries have not moved for a second (or `drain` says
/// everything arrived, or holds the drain open). Returns the figures and the acked seqs per
/// room.
pub async fn post_and_drain(
    swarm: &Swarm,
    common: &Common,
    duration: Duration,
    drain: impl Fn(&Ctx) -> Drain,
) -> (Delivery, HashMap<String, Vec<u64>>) {
    let ctx = &swarm.ctx;
    let bar = &swarm.bar;
    bar.set_length(duration.as_secs().max(1));
    bar.set_position(0);
    bar.set_message("posting");
    let me = [std::process::id()];
    let cpu_start = sample(&common.server_pids);
    let bench_start = sample(&me);
    let go_ns = unix_nanos();
    let go = Instant::now();
    ctx.go.cancel();
    let deadline = go + duration;
    // Sending stops at the deadline itself, so `sent / duration` is the offered rate.
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_millis(200))).await;
        bar.set_position(go.elapsed().as_secs());
        bar.set_message(format!(
            "{} deliveries",
            ctx.deliveries.load(Ordering::Relaxed)
        ));
    }
    ctx.stop_send.cancel();
    bar.set_message("draining");
    let drain_start = Instant::now();
    let mut last_seen = ctx.deliveries.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    let mut cpu_end = sample(&common.server_pids);
    let mut bench_end = sample(&me);
    let mut cpu_end_at = Instant::now();
    while drain_start.elapsed() < MAX_DRAIN {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = ctx.deliveries.load(Ordering::Relaxed);
        let settled =
            ctx.pending.load(Ordering::Relaxed) <= 0 && ctx.busy.load(Ordering::Relaxed) <= 0;
        if now != last_seen {
            last_seen = now;
            last_change = Instant::now();
            cpu_end = sample(&common.server_pids);
            bench_end = sample(&me);
            cpu_end_at = Instant::now();
        }
        let quiet = last_change.elapsed() >= Duration::from_secs(1);
        match drain(ctx) {
            _ if !settled => {}
            Drain::Complete => break,
            Drain::Quiet if quiet => break,
            Drain::Quiet | Drain::Busy => {}
        }
    }
    let deliveries = ctx.deliveries.load(Ordering::Relaxed);
    let last_ns = ctx.last_delivery_ns.load(Ordering::Relaxed).max(go_ns);
    let window = (last_ns - go_ns) as f64 / 1e9;
    let acks = ctx.acks.snapshot();
    let server_cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some(CpuFigures::between(
            a,
            b,
            (cpu_end_at - go).as_secs_f64(),
            Some(deliveries),
        )),
        _ => None,
    };
    let delivery = Delivery {
        duration_s: duration.as_secs_f64(),
        sent: 0,
        acked: acks.values().map(|v| v.len() as u64).sum(),
        rate_limited: 0,
        deliveries,
        deliveries_per_s: if window > 0.0 {
            (deliveries as f64 / window).round()
        } else {
            0.0
        },
        delivery_window_s: round3(window),
        drain_s: round3(last_change.duration_since(drain_start).as_secs_f64()),
        server_cpu,
        bench_cpu: bench_start.zip(bench_end).map(|(a, b)| {
            CpuFigures::between(a, b, (cpu_end_at - go).as_secs_f64(), Some(deliveries))
        }),
    };
    (delivery, acks)
}

/// Sums the counters of the members `pick` selects.
pub fn counts(outcomes: &[Outcome], pick: impl Fn(&Outcome) -> bool) -> Counts {
    let mut total = Counts::default();
    for o in outcomes.iter().filter(|o| pick(o)) {
        total.add(&o.counts);
    }
    total
}

/// Merges the latency histograms of the members `pick` selects.
pub fn latency(outcomes: &[Outcome], pick: impl Fn(&Outcome) -> bool) -> Latency {
    let mut h = new_histogram();
    for o in outcomes.iter().filter(|o| pick(o)) {
        if let Some(l) = &o.latency {
            let _ = h.add(l);
        }
    }
    Latency::of(&h)
}
