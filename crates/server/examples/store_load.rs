//! The single-node log's write path alone, without sockets: commits batches of chat messages
//! spread over many small rooms and prints the process's CPU per message (the writer and the
//! checkpointer thread, user + system, which includes the kernel's file writes and fsyncs).
//! CPU time, unlike latency, hardly moves when the machine is shared, so this measures one
//! change of the store at a time (docs/BENCHMARKS.md, "Store write path").
//!
//! ```sh
//! cargo run --release -p parley --example store_load -- [ROOMS] [BATCH] [MESSAGES] [ids]
//! ```
//! Defaults: 5,000 rooms, batches of 250, 200,000 messages, no client ids (`ids`: every
//! message has one, as from the JS client). The indexer settles every 1,000 ms (the default
//! `store.settle_ms`; `SETTLE_MS` sets it); the time each settle took is printed too. The
//! figures run until everything is settled.

use std::sync::Arc;
use std::time::Instant;

use parley::config::{Config, Synchronous};
use parley::policy::Policies;
use parley::store::sqlite::{open_log, Draft};

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses): utime is the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (rooms, batch, messages) = (arg(0, 5_000), arg(1, 250), arg(2, 200_000));
    let ids = args.iter().any(|a| a == "ids");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config::default();
    let policies = Arc::new(Policies::from_config(&config).expect("policies"));
    let (mut writer, _reader) = open_log(
        &dir.path().join("load.db"),
        Synchronous::Full,
        &config.history,
        policies,
    )
    .expect("open the log");
    if let Some(ms) = std::env::var("SETTLE_MS").ok().and_then(|v| v.parse().ok()) {
        writer.set_settle_every(std::time::Duration::from_millis(ms));
    }
    let names: Vec<Arc<str>> = (0..rooms).map(|r| Arc::from(format!("dm{r}"))).collect();
    let users: Vec<Arc<str>> = (0..rooms * 2).map(|u| Arc::from(format!("u{u}"))).collect();
    let content = "x".repeat(100);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (cpu0, wall0) = (cpu_secs(), Instant::now());
    let mut sent = 0;
    let settles = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let settles = settles.clone();
        writer.on_settle(move |took| settles.lock().unwrap().push(took.as_secs_f64() * 1e3));
    }
    while sent < messages {
        let drafts: Vec<Draft> = (0..batch)
            .map(|i| {
                let user = next() as usize % users.len();
                Draft::Message {
                    room: names[user / 2].clone(),
                    user: users[user].clone(),
                    name: users[user].clone(),
                    content: content.clone(),
                    client_id: ids.then(|| format!("c{}", sent + i)),
                }
            })
            .collect();
        writer.commit(&drafts).expect("commit");

        sent += batch;
    }
    // Until the indexer has written everything into SQLite.
    while !writer.is_settled() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (cpu, wall) = (cpu_secs() - cpu0, wall0.elapsed().as_secs_f64());
    println!(
        "rooms {rooms} batch {batch} messages {sent} ids {ids}: {:.1} us CPU/msg, {:.0} msg/s, {:.2} ms/commit",
        cpu * 1e6 / sent as f64,
        sent as f64 / wall,
        wall * 1e3 / (sent / batch) as f64
    );
    let settles = settles.lock().unwrap();
    println!(
        "settles {}: {:.1} ms on average, {:.1} ms at most (on the indexer's thread)",
        settles.len(),
        settles.iter().sum::<f64>() / settles.len().max(1) as f64,
        settles.iter().cloned().fold(0.0, f64::max)
    );
}
