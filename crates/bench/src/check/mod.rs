//! `check`: a fault-injecting consistency checker in the spirit of Jepsen (issue #11).
//!
//! It starts the nodes itself (one on SQLite, or several on its own `redis-server` with an
//! AOF, each behind a TCP relay), runs a workload of clients over several rooms
//! ([`client`]), injects faults on a schedule drawn from `--seed` (the nemesis), heals
//! everything, lets the clients settle, reads every room's log back over the HTTP API and
//! checks what the clients saw against it ([`verify`]). See docs/OPERATIONS.md, "Faults".

pub mod client;
pub mod verify;
pub mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use parley_protocol::received::Event;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use crate::net::{parse_source_ips, Dialer};
use crate::Common;
use client::{ClientCtl, ClientSpec, Phase, Record, Shared};
use verify::{FinalLog, Verdicts};
use world::{http_get, Link, Node, Redis, Relay};

/// Where the nodes keep their log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One node on SQLite.
    Single,
    /// Several nodes on one redis-server.
    Cluster,
}

/// A fault the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL a node, restart it.
    Kill,
    /// SIGSTOP a node past `presence.ttl_ms`, then SIGCONT.
    Pause,
    /// SIGKILL redis-server, restart it from its AOF (cluster).
    RedisRestart,
    /// `SAVE` a snapshot; later SIGKILL redis-server and restart it from that snapshot (cluster).
    Rollback,
    /// Cut or delay a node's link to Redis (cluster).
    Partition,
    /// Drop client sockets without a close.
    Drop,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::RedisRestart => "redis-restart",
            Fault::Rollback => "rollback",
            Fault::Partition => "partition",
            Fault::Drop => "drop",
        }
    }

    fn cluster_only(self) -> bool {
        matches!(
            self,
            Fault::RedisRestart | Fault::Rollback | Fault::Partition
        )
    }
}

/// Options of `check`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Shared options (`--json`, `--quiet`, `--secret`, `--source-ips`; the URLs are the
    /// checker's own nodes).
    #[command(flatten)]
    pub common: Common,
    /// One node on SQLite, or a cluster on redis-server.
    #[arg(long, value_enum, default_value_t = Mode::Cluster)]
    pub mode: Mode,
    /// Nodes in cluster mode.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Faults to inject, comma-separated (cluster-only faults are skipped in single mode).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,pause,redis-restart,rollback,partition,drop"
    )]
    pub faults: Vec<Fault>,
    /// Seed of the fault schedule and the clients' choices (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of workload under faults (then heal, settle and check).
    #[arg(short = 'd', long, default_value_t = 60)]
    pub duration: u64,
    /// Client connections (the first two share one user).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Rooms.
    #[arg(long, default_value_t = 3)]
    pub rooms: usize,
    /// Rooms each client joins: client i takes rooms i·N … i·N + N − 1 (mod `--rooms`), so
    /// `--rooms-per-client 1` with half as many rooms as clients makes rooms of two, like
    /// direct messages. Default: each room with probability 0.6 (few, crowded rooms).
    #[arg(long, value_name = "N")]
    pub rooms_per_client: Option<usize>,
    /// `presence.ttl_ms` given to the nodes.
    #[arg(long, default_value_t = 2000)]
    pub ttl_ms: u64,
    /// The parley binary (default: `parley` next to this executable).
    #[arg(long)]
    pub parley_bin: Option<PathBuf>,
    /// Extra `--set key=value` for every node (repeatable).
    #[arg(long = "node-set", value_name = "KEY=VALUE")]
    pub node_set: Vec<String>,
    /// Where to write failure histories and keep the run's directory (default: a temp dir,
    /// kept only on failure).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A fault injected, for the report and the histories.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    /// Milliseconds since the start.
    pub ms: u64,
    /// What was done.
    pub what: String,
}

/// The result of `check`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always `check`.
    pub run: &'static str,
    /// `pass` or `fail`.
    pub verdict: &'static str,
    /// The seed (rerun with `--seed`).
    pub seed: u64,
    /// The mode.
    pub mode: Mode,
    /// Faults asked for.
    pub faults_enabled: Vec<String>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Every fault with its time.
    pub timeline: Vec<FaultEvent>,
    /// Checks: passed/failed/exempt and the first failures.
    pub checks: BTreeMap<String, verify::Tally>,
    /// The clients' counters, summed.
    pub workload: client::Counts,
    /// Acked messages.
    pub acked: u64,
    /// Events in the final logs.
    pub final_events: u64,
    /// Failure histories written (one file per offending room).
    pub histories: Vec<String>,
    /// The run's directory (node and Redis logs), when kept.
    pub dir: Option<String>,
    /// Seconds, start to verdict.
    pub elapsed_s: f64,
    /// Every check held.
    pub ok: bool,
}

impl Report {
    /// A human summary.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "check {:?}: {} (seed {}, {:.0} s)",
            self.mode,
            self.verdict.to_uppercase(),
            self.seed,
            self.elapsed_s
        );
        let _ = writeln!(s, "faults injected: {:?}", self.faults);
        let w = &self.workload;
        let _ = writeln!(
            s,
            "workload: {} sends, {} acks ({} duplicate), {} live events, {} joins ({} with since, {} not recovered), {} leaves, {} connects ({} failed), {} dropped, closes {:?}, errors {:?}",
            w.sends, w.acks, w.duplicate_acks, w.events, w.joins, w.resumes, w.not_recovered, w.leaves, w.connects, w.connect_failures, w.dropped, w.closes, w.errors
        );
        for (name, t) in &self.checks {
            let _ = writeln!(
                s,
                "  {name:<14} {:>6} passed {:>4} failed{}",
                t.passed,
                t.failed,
                if t.exempt > 0 {
                    format!(" {:>4} exempt", t.exempt)
                } else {
                    String::new()
                }
            );
            for f in t.failures.iter().take(5) {
                let _ = writeln!(s, "      {f}");
            }
        }
        for h in &self.histories {
            let _ = writeln!(s, "history of an offending room: {h}");
        }
        if let Some(d) = &self.dir {
            let _ = writeln!(s, "run directory (node and redis logs): {d}");
        }
        s
    }
}

fn progress(o: &Options, origin: Instant, text: &str) {
    if !o.common.quiet {
        eprintln!("[check {:>6.1}s] {text}", origin.elapsed().as_secs_f64());
    }
}

struct World {
    redis: Option<Redis>,
    relays: Vec<Relay>,
    nodes: Vec<Node>,
}

impl World {
    async fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(r) = &mut self.redis {
            if crate::check::world::redis_cmd(r.port, &["PING"])
                .await
                .is_err()
            {
                r.restart().await?;
            }
        }
        for relay in &self.relays {
            relay.set(Link::Open);
        }
        for n in &mut self.nodes {
            if n.paused {
                n.pause(false)?;
            }
            if !n.up() {
                n.restart().await?;
            }
        }
        Ok(())
    }
}

/// The source addresses of the clients' sockets (`--source-ips`; empty: the OS picks). The
/// nodes keep the default cap of 100 connections per client address, so more clients than
/// about 90 per address (the checker's own HTTP reads need some room) are refused here, with
/// what to do, rather than failing in the middle of the run.
fn client_sources(o: &Options) -> anyhow::Result<Vec<std::net::IpAddr>> {
    let sources = match &o.common.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    let cap_raised = o
        .node_set
        .iter()
        .any(|s| s.starts_with("limits.max_connections_per_ip="));
    let per_address = o.clients.div_ceil(sources.len().max(1));
    if per_address > CLIENTS_PER_ADDRESS && !cap_raised {
        bail!(
            "{} clients from {} source address(es) is {per_address} per address, over the \
             nodes' cap of {NODES_CAP_PER_ADDRESS} per address: spread them with --source-ips \
             (e.g. 127.0.0.1-127.0.0.200) or raise the cap with \
             --node-set limits.max_connections_per_ip=N",
            o.clients,
            sources.len().max(1)
        );
    }
    Ok(sources)
}

/// The nodes' default `limits.max_connections_per_ip` (a unit test holds it to the server's).
const NODES_CAP_PER_ADDRESS: usize = 100;

/// Most clients per source address under that cap, leaving room for the checker's HTTP reads.
const CLIENTS_PER_ADDRESS: usize = NODES_CAP_PER_ADDRESS - 10;

/// Runs `check`.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    let origin = Instant::now();
    let seed = o.seed.unwrap_or_else(rand::random);
    let mut faults: Vec<Fault> = o
        .faults
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if o.mode == Mode::Single {
        faults.retain(|f| !f.cluster_only());
    }
    progress(
        o,
        origin,
        &format!(
            "seed {seed}, mode {:?}, faults {:?}",
            o.mode,
            faults.iter().map(|f| f.name()).collect::<Vec<_>>()
        ),
    );
    let sources = client_sources(o)?;
    if let Some(n) = o.rooms_per_client {
        if n == 0 || n > o.rooms.max(1) {
            bail!(
                "--rooms-per-client {n}: give 1 to --rooms ({})",
                o.rooms.max(1)
            );
        }
    }
    let exe = match &o.parley_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable directory")?
            .join("parley"),
    };
    if !exe.exists() {
        bail!(
            "{} not found (build it, or give --parley-bin)",
            exe.display()
        );
    }
    let tmp = tempfile::Builder::new().prefix("parley-check-").tempdir()?;
    let dir = match &o.out {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_owned(),
    };
    let secret = o
        .common
        .secret
        .clone()
        .unwrap_or_else(|| format!("check-secret-{seed}"));
    let api_key = format!("check-key-{seed}");

    // The world.
    let mut redis = None;
    let mut relays = Vec::new();
    let n_nodes = if o.mode == Mode::Single {
        1
    } else {
        o.nodes.max(1)
    };
    if o.mode == Mode::Cluster {
        let r = Redis::start(&dir).await?;
        for _ in 0..n_nodes {
            relays.push(Relay::start(r.port).await?);
        }
        redis = Some(r);
    }
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        let mut args: Vec<String> = vec![
            "--jwt-secret".into(),
            secret.clone(),
            "--api-key".into(),
            api_key.clone(),
        ];
        match o.mode {
            Mode::Single => {
                args.push("--db".into());
                args.push(dir.join("parley.db").display().to_string());
            }
            Mode::Cluster => {
                args.push("--redis".into());
                let relay = relays.get(i).context("a relay per node")?;
                args.push(format!("redis://127.0.0.1:{}", relay.port));
            }
        }
        for set in [
            format!("presence.ttl_ms={}", o.ttl_ms),
            // No retention unless asked for (`--node-set history.max_len=…`): a long run
            // writes more than the default 10000 events to a room.
            "history.max_len=1000000".into(),
            "limits.send_rate=1000".into(),
            "limits.send_burst=1000".into(),
            "limits.join_rate=1000".into(),
            "limits.join_burst=1000".into(),
        ]
        .into_iter()
        .chain(o.node_set.iter().cloned())
        {
            args.push("--set".into());
            args.push(set);
        }
        nodes.push(Node::start(i, &exe, args, &dir).await?);
    }
    let mut world = World {
        redis,
        relays,
        nodes,
    };
    progress(
        o,
        origin,
        &format!("{} node(s) up in {}", n_nodes, dir.display()),
    );

    // The clients.
    let urls: Vec<String> = world
        .nodes
        .iter()
        .map(|n| format!("ws://127.0.0.1:{}/ws", n.port))
        .collect();
    let dialer = Dialer::new(&urls, sources, Some(&secret), 64).await?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let shared = Arc::new(Shared {
        dialer,
        nodes: n_nodes,
        phase: phase_rx,
        origin,
    });
    let mut plan = StdRng::seed_from_u64(seed);
    let rooms: Vec<String> = (0..o.rooms.max(1)).map(|i| format!("room-{i}")).collect();
    let mut ctls = Vec::new();
    for i in 0..o.clients.max(2) {
        // Clients 0 and 1 are one user with two connections, in the same rooms.
        let user = if i < 2 {
            "u0".to_owned()
        } else {
            format!("u{}", i - 1)
        };
        let my_rooms = if i == 1 {
            ctls.first()
                .map(|c: &Arc<ClientCtl>| c.spec.rooms.clone())
                .unwrap_or_default()
        } else if let Some(n) = o.rooms_per_client {
            (0..n)
                .map(|k| rooms[(i * n + k) % rooms.len()].clone())
                .collect()
        } else {
            let mut r: Vec<String> = rooms
                .iter()
                .filter(|_| plan.gen_bool(0.6))
                .cloned()
                .collect();
            if r.is_empty() {
                r.push(rooms[i % rooms.len()].clone());
            }
            r
        };
        ctls.push(Arc::new(ClientCtl {
            spec: ClientSpec {
                index: i,
                user,
                rooms: my_rooms,
                seed: plan.gen(),
            },
            drop_now: tokio::sync::Notify::new(),
            settled: std::sync::atomic::AtomicBool::new(false),
            record: Mutex::new(Record::default()),
        }));
    }
    let tasks: Vec<_> = ctls
        .iter()
        .map(|c| tokio::spawn(client::run(c.clone(), shared.clone())))
        .collect();

    // The nemesis.
    let mut timeline = Vec::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut rollback_done = false;
    let end = origin + Duration::from_secs(o.duration);
    let note = |timeline: &mut Vec<FaultEvent>, what: String| {
        progress(o, origin, &what);
        timeline.push(FaultEvent {
            ms: origin.elapsed().as_millis() as u64,
            what,
        });
    };
    sleep(Duration::from_millis(1500)).await;
    while Instant::now() < end && !faults.is_empty() {
        let fault = faults[plan.gen_range(0..faults.len())];
        let node = plan.gen_range(0..n_nodes);
        let hold = Duration::from_millis(plan.gen_range(500..3000));
        let quiet = Duration::from_millis(plan.gen_range(1000..3000));
        match fault {
            Fault::Kill => {
                note(&mut timeline, format!("kill: SIGKILL node {node}"));
                world.nodes[node].kill().await;
                sleep(hold).await;
                world.nodes[node].restart().await?;
                note(&mut timeline, format!("kill: node {node} restarted"));
            }
            Fault::Pause => {
                let hold = Duration::from_millis(o.ttl_ms * 2 + plan.gen_range(0..1500));
                note(
                    &mut timeline,
                    format!("pause: SIGSTOP node {node} for {} ms", hold.as_millis()),
                );
                world.nodes[node].pause(true)?;
                sleep(hold).await;
                world.nodes[node].pause(false)?;
                note(&mut timeline, format!("pause: SIGCONT node {node}"));
            }
            Fault::RedisRestart => {
                let r = world.redis.as_mut().context("redis")?;
                note(&mut timeline, "redis-restart: SIGKILL redis-server".into());
                r.kill().await;
                sleep(hold).await;
                r.restart().await?;
                note(
                    &mut timeline,
                    "redis-restart: redis-server restarted from its AOF".into(),
                );
            }
            Fault::Rollback => {
                let r = world.redis.as_mut().context("redis")?;
                if r.has_snapshot() {
                    note(
                        &mut timeline,
                        "rollback: SIGKILL redis-server, restart from the older snapshot (AOF off)"
                            .into(),
                    );
                    r.rollback().await?;
                    rollback_done = true;
                    note(
                        &mut timeline,
                        "rollback: redis-server back on the snapshot, AOF on again".into(),
                    );
                } else {
                    r.snapshot().await?;
                    note(
                        &mut timeline,
                        "rollback: SAVE, snapshot kept for a later rollback".into(),
                    );
                    // The snapshot alone is no fault: do not count it.
                    sleep(quiet).await;
                    continue;
                }
            }
            Fault::Partition => {
                let relay = &world.relays[node];
                let link = if plan.gen_bool(0.6) {
                    Link::Cut
                } else {
                    Link::Delay(Duration::from_millis(plan.gen_range(20..300)))
                };
                let hold = if plan.gen_bool(0.3) {
                    Duration::from_millis(o.ttl_ms * 2 + plan.gen_range(0..1500))
                } else {
                    hold
                };
                note(
                    &mut timeline,
                    format!(
                        "partition: node {node} link to redis {link:?} for {} ms",
                        hold.as_millis()
                    ),
                );
                relay.set(link);
                sleep(hold).await;
                relay.set(Link::Open);
                note(&mut timeline, format!("partition: node {node} link healed"));
            }
            Fault::Drop => {
                let k = plan.gen_range(1..=3.min(ctls.len()));
                let mut who = Vec::new();
                for _ in 0..k {
                    let c = plan.gen_range(0..ctls.len());
                    ctls[c].drop_now.notify_one();
                    who.push(c);
                }
                note(&mut timeline, format!("drop: sockets of clients {who:?}"));
            }
        }
        *counts.entry(fault.name().to_owned()).or_default() += 1;
        sleep(quiet).await;
    }

    // Heal, settle.
    world.heal().await?;
    progress(o, origin, "faults over, everything healed; settling");
    let _ = phase_tx.send(Phase::Settle);
    let mut verdicts = Verdicts::default();
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let unsettled: Vec<usize> = ctls
            .iter()
            .filter(|c| !c.settled.load(Ordering::SeqCst))
            .map(|c| c.spec.index)
            .collect();
        if unsettled.is_empty() {
            break true;
        }
        if Instant::now() > settle_deadline {
            verdicts.case("settle", "-", false, || {
                format!("clients {unsettled:?} could not join their rooms and get every send acked within 60 s of healing")
            });
            break false;
        }
        sleep(Duration::from_millis(100)).await;
    };
    if settled {
        verdicts.case("settle", "-", true, String::new);
    }
    // A pause is judged by presence after the run, and the workload's own leaves and rejoins
    // mend what a pause broke: so one more pause comes once the clients have settled (they no
    // longer leave or rejoin), before presence is checked.
    if faults.contains(&Fault::Pause) {
        let node = plan.gen_range(0..n_nodes);
        let hold = Duration::from_millis(o.ttl_ms * 2 + plan.gen_range(0..1500));
        note(
            &mut timeline,
            format!(
                "pause (closing): SIGSTOP node {node} for {} ms",
                hold.as_millis()
            ),
        );
        world.nodes[node].pause(true)?;
        sleep(hold).await;
        world.nodes[node].pause(false)?;
        note(&mut timeline, format!("pause: SIGCONT node {node}"));
        *counts.entry(Fault::Pause.name().to_owned()).or_default() += 1;
    }

    progress(o, origin, "clients settled; checking presence");

    // Presence: every node lists exactly the users with a joined connection.
    let mut expected: BTreeMap<String, BTreeSet<String>> =
        rooms.iter().map(|r| (r.clone(), BTreeSet::new())).collect();
    for c in &ctls {
        for r in &c.spec.rooms {
            expected
                .entry(r.clone())
                .or_default()
                .insert(c.spec.user.clone());
        }
    }
    let presence_deadline =
        Instant::now() + Duration::from_millis(o.ttl_ms * 3) + Duration::from_secs(15);
    let mut last: BTreeMap<(String, usize), Result<BTreeSet<String>, String>> = BTreeMap::new();
    loop {
        last.clear();
        for room in expected.keys() {
            for n in &world.nodes {
                let got = room_users(n.port, &api_key, room).await;
                last.insert((room.clone(), n.index), got);
            }
        }
        let all_ok = last
            .iter()
            .all(|((room, _), got)| got.as_ref().is_ok_and(|g| Some(g) == expected.get(room)));
        if all_ok || Instant::now() > presence_deadline {
            break;
        }
        sleep(Duration::from_millis(250)).await;
    }
    for ((room, node), got) in &last {
        let want = &expected[room];
        v_presence(&mut verdicts, room, *node, want, got);
    }

    // The final logs, and the streams' catching up with them.
    progress(o, origin, "reading the final logs");
    let mut logs: BTreeMap<String, FinalLog> = BTreeMap::new();
    for attempt in 0..5 {
        logs.clear();
        for room in &rooms {
            let events = read_log(world.nodes[0].port, &api_key, room).await?;
            logs.insert(
                room.clone(),
                FinalLog {
                    epoch: None,
                    events,
                },
            );
        }
        sleep(Duration::from_millis(1500)).await;
        let mut stable = true;
        for room in &rooms {
            let again = read_log(world.nodes[0].port, &api_key, room).await?;
            if again.last().map(Event::seq) != logs[room].events.last().map(Event::seq) {
                stable = false;
            }
        }
        if stable || attempt == 4 {
            break;
        }
    }
    let _ = phase_tx.send(Phase::Stop);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let mut segments = Vec::new();
    let mut acks = Vec::new();
    let mut lines = Vec::new();
    let mut workload = client::Counts::default();
    for c in &ctls {
        let mut rec = c.record.lock().expect("record lock");
        segments.append(&mut rec.segments);
        acks.append(&mut rec.acks);
        lines.append(&mut rec.lines);
        add_counts(&mut workload, &rec.counts);
        let checked = rec.order_checked;
        let violations = std::mem::take(&mut rec.order_violations);
        let errors = std::mem::take(&mut rec.protocol_errors);
        drop(rec);
        for _ in 0..checked.saturating_sub(violations.len() as u64) {
            verdicts.case("order", "-", true, String::new);
        }
        for (room, why) in violations {
            verdicts.case("order", &room, false, || why);
        }
        for (room, why) in errors {
            verdicts.case("protocol", room.as_deref().unwrap_or("-"), false, || why);
        }
    }
    verdicts.tally_ensure("protocol");
    // The epoch of each room: the one its streams open at the end were in.
    for s in segments
        .iter()
        .filter(|s| s.end.as_deref() == Some("client closed (end of run)"))
    {
        if let Some(log) = logs.get_mut(&s.room) {
            log.epoch.get_or_insert_with(|| s.epoch.clone());
        }
    }
    // `caught_up` looks at streams open when the log was read: they ended with the run.
    let mut at_end = segments.clone();
    for s in &mut at_end {
        if s.end.as_deref() == Some("client closed (end of run)") {
            s.end = None;
        }
    }
    let retention = o
        .node_set
        .iter()
        .any(|s| s.starts_with("history.ttl_s") || s.starts_with("history.max_len"));
    verify::acked_in_log(&mut verdicts, &acks, &logs, rollback_done, retention);
    verify::log_contiguous(&mut verdicts, &logs, retention);
    verify::same_event(&mut verdicts, &segments, &acks, &logs);
    verify::contiguous(&mut verdicts, &segments);
    verify::recovered(&mut verdicts, &segments);
    verify::caught_up(&mut verdicts, &at_end, &logs);

    let ok = verdicts.ok();
    let mut histories = Vec::new();
    lines.sort_by_key(|l| l.ms);
    for room in &verdicts.bad_rooms {
        let path = dir.join(format!(
            "history-{}.txt",
            if room == "-" { "all" } else { room }
        ));
        let mut text = String::new();
        let _ = writeln!(
            text,
            "parley-bench check, seed {seed}, mode {:?}; room {room}",
            o.mode
        );
        let _ = writeln!(text, "\n== failures ==");
        for (name, t) in &verdicts.checks {
            for f in &t.failures {
                if room == "-" || f.starts_with(&format!("room {room}:")) {
                    let _ = writeln!(text, "{name}: {f}");
                }
            }
        }
        let _ = writeln!(text, "\n== faults ==");
        for f in &timeline {
            let _ = writeln!(text, "{:>8} ms  {}", f.ms, f.what);
        }
        let _ = writeln!(
            text,
            "\n== frames (client, node, > sent / < received / # note) =="
        );
        for l in &lines {
            if room == "-" || l.room.as_deref() == Some(room.as_str()) || l.room.is_none() {
                let _ = writeln!(text, "{:>8} ms  {}", l.ms, l.text);
            }
        }
        if let Some(log) = logs.get(room) {
            let _ = writeln!(text, "\n== final log (epoch {:?}) ==", log.epoch);
            for e in &log.events {
                let _ = writeln!(text, "{:>6}  {}", e.seq(), client::fingerprint(e));
            }
        }
        std::fs::write(&path, text)?;
        histories.push(path.display().to_string());
    }
    let keep = !ok || o.out.is_some();
    let dir_kept = if keep {
        if o.out.is_none() {
            let kept = tmp.keep();
            Some(kept.display().to_string())
        } else {
            Some(dir.display().to_string())
        }
    } else {
        None
    };
    drop(world);
    let report = Report {
        run: "check",
        verdict: if ok { "pass" } else { "fail" },
        seed,
        mode: o.mode,
        faults_enabled: faults.iter().map(|f| f.name().to_owned()).collect(),
        faults: counts,
        timeline,
        checks: verdicts.checks.clone(),
        workload,
        acked: acks.len() as u64,
        final_events: logs.values().map(|l| l.events.len() as u64).sum(),
        histories,
        dir: dir_kept,
        elapsed_s: origin.elapsed().as_secs_f64(),
        ok,
    };
    progress(
        o,
        origin,
        &format!("verdict: {} (seed {seed})", report.verdict),
    );
    Ok(report)
}

impl Verdicts {
    fn tally_ensure(&mut self, check: &str) {
        self.checks.entry(check.to_owned()).or_default();
    }
}

fn v_presence(
    v: &mut Verdicts,
    room: &str,
    node: usize,
    want: &BTreeSet<String>,
    got: &Result<BTreeSet<String>, String>,
) {
    let ok = got.as_ref().is_ok_and(|g| g == want);
    v.case("presence", room, ok, || {
        format!("node {node} lists {got:?}, the joined users are {want:?} (after the faults stopped, polled until the deadline)")
    });
}

fn add_counts(sum: &mut client::Counts, c: &client::Counts) {
    sum.connects += c.connects;
    sum.connect_failures += c.connect_failures;
    sum.sends += c.sends;
    sum.acks += c.acks;
    sum.duplicate_acks += c.duplicate_acks;
    sum.events += c.events;
    sum.leaves += c.leaves;
    sum.joins += c.joins;
    sum.resumes += c.resumes;
    sum.not_recovered += c.not_recovered;
    sum.dropped += c.dropped;
    for (k, n) in &c.errors {
        *sum.errors.entry(k.clone()).or_default() += n;
    }
    for (k, n) in &c.closes {
        *sum.closes.entry(k.clone()).or_default() += n;
    }
}

#[derive(Deserialize)]
struct UsersPage {
    users: Vec<String>,
}

#[derive(Deserialize)]
struct MessagesPage {
    messages: Vec<Event>,
    more: bool,
}

async fn room_users(port: u16, key: &str, room: &str) -> Result<BTreeSet<String>, String> {
    let (status, body) = http_get(port, &format!("/api/rooms/{room}/users"), key)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    let page: UsersPage = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(page.users.into_iter().collect())
}

/// Reads a room's whole log through `GET /api/rooms/{room}/messages?after=N&limit=200`.
async fn read_log(port: u16, key: &str, room: &str) -> anyhow::Result<Vec<Event>> {
    let mut events: Vec<Event> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = events.last().map_or(0, Event::seq);
        let path = format!("/api/rooms/{room}/messages?after={after}&limit=200");
        match http_get(port, &path, key).await {
            Ok((200, body)) => {
                let page: MessagesPage = serde_json::from_str(&body)
                    .with_context(|| format!("page of {room}: {body}"))?;
                let empty = page.messages.is_empty();
                events.extend(page.messages);
                if !page.more || empty {
                    return Ok(events);
                }
            }
            other => {
                if Instant::now() > deadline {
                    bail!("reading the log of {room}: {other:?}");
                }
                sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn options(args: &str) -> Options {
        let argv = std::iter::once("parley-bench").chain(args.split_whitespace());
        match Cli::try_parse_from(argv).expect("arguments").command {
            Command::Check(o) => o,
            _ => unreachable!("a check command"),
        }
    }

    /// More clients than one address may hold are refused before any node starts, unless they
    /// are spread over source addresses or the cap is raised; the addresses are the ones given.
    #[test]
    fn clients_beyond_the_per_address_cap_need_source_addresses() {
        let err = client_sources(&options("check --clients 200")).unwrap_err();
        assert!(err.to_string().contains("--source-ips"), "{err}");
        let sources = client_sources(&options(
            "check --clients 200 --source-ips 127.0.0.1-127.0.0.3",
        ))
        .expect("67 per address");
        assert_eq!(sources.len(), 3);
        assert!(client_sources(&options(
            "check --clients 300 --source-ips 127.0.0.1-127.0.0.3"
        ))
        .is_err());
        let raised = "check --clients 200 --node-set limits.max_connections_per_ip=1000";
        assert!(client_sources(&options(raised))
            .expect("cap raised")
            .is_empty());
        assert!(client_sources(&options("check"))
            .expect("8 clients")
            .is_empty());
    }

    /// The cap the checker plans for is the nodes' default.
    #[test]
    fn the_planned_cap_is_the_servers_default() {
        let limits = parley::config::LimitsConfig::default();
        assert_eq!(NODES_CAP_PER_ADDRESS, limits.max_connections_per_ip);
    }
}
