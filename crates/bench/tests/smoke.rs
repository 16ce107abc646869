//! Smoke test of every parley-bench run against a real in-process parley server: tiny sizes,
//! a couple of seconds each, asserting nothing was lost or duplicated and that messages were
//! delivered. No wall-clock assertions.

use std::net::SocketAddr;

use clap::Parser;
use parley::config::{Config, Overrides};
use parley_bench::{run, Cli, Report};
use tempfile::TempDir;
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _dir: TempDir,
}

async fn start(settings: &[(&str, toml::Value)]) -> Server {
    let dir = TempDir::new().unwrap();
    let mut values = vec![(
        "store.db".to_owned(),
        toml::Value::from(dir.path().join("parley.db").display().to_string()),
    )];
    values.extend(settings.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let config = Config::load(&Overrides {
        config_file: None,
        values,
    })
    .expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(parley::run(listener, config, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        _stop: tx,
        _dir: dir,
    }
}

async fn bench(server: &Server, args: &str) -> Report {
    bench_on(&[server], args).await
}

/// Runs `args` against every server (one `--url` each); child processes are started from the
/// real `parley-bench` binary (the test harness is not one).
async fn bench_on(servers: &[&Server], args: &str) -> Report {
    let pid = std::process::id().to_string();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("ws://{}/ws", s.addr))
        .collect();
    let mut argv = vec!["parley-bench"];
    argv.extend(args.split_whitespace());
    for url in &urls {
        argv.extend(["--url", url]);
    }
    argv.extend(["--server-pid", &pid, "--quiet"]);
    argv.extend(["--source-ips", "127.0.0.1-127.0.0.20"]);
    argv.extend(["--bench-exe", env!("CARGO_BIN_EXE_parley-bench")]);
    let cli = Cli::try_parse_from(argv).expect("arguments");
    run(&cli.command).await.expect("bench run")
}

fn fast_limits() -> Vec<(&'static str, toml::Value)> {
    vec![
        ("limits.send_rate", toml::Value::from(100_000.0)),
        ("limits.send_burst", toml::Value::from(100_000)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_run() {
    let server = start(&[]).await;
    let Report::Connections(r) = bench(&server, "connections -n 20 -m 5 --hold 1").await else {
        panic!("wrong report")
    };
    assert_eq!(r.connect.joined, 20, "{r:?}");
    assert_eq!(r.connect.failed, 0);
    assert!(r.rss_after_kib.is_some() && r.idle_cpu.is_some());
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["run"], "connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_run() {
    let server = start(&fast_limits()).await;
    let Report::Fanout(r) = bench(&server, "fanout -n 20 -r 50 -s 64 -t 2 -k 2").await else {
        panic!("wrong report")
    };
    assert_eq!(r.connect.joined, 20, "{r:?}");
    assert!(r.delivery.acked > 0, "{r:?}");
    assert!(r.delivery.deliveries > 0);
    assert_eq!(r.delivery.deliveries, r.delivery.acked * 20, "{r:?}");
    assert_eq!(
        (r.loss.lost, r.loss.duplicated, r.loss.seq_gaps),
        (0, 0, 0),
        "{r:?}"
    );
    assert!(r.latency.count > 0);
    assert!(r.delivery.server_cpu.is_some());
    assert!(!r.publisher_process);
    assert_eq!(r.offered.sent, r.delivery.sent, "{r:?}");
    assert!(r.offered.scheduled >= r.offered.sent);
    assert_eq!(r.offered.send_lag.count, r.offered.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_publisher_process() {
    let server = start(&fast_limits()).await;
    let args = "fanout -n 20 -r 50 -s 64 -t 2 -k 2 --publisher-process";
    let Report::Fanout(r) = bench(&server, args).await else {
        panic!("wrong report")
    };
    assert!(r.publisher_process);
    // 18 receivers here, 2 publishers in the child: merged.
    assert_eq!(r.connect.joined, 20, "{r:?}");
    assert_eq!(r.connect.failed, 0);
    assert!(r.delivery.acked > 0, "{r:?}");
    assert_eq!(r.delivery.sent, r.offered.sent, "{r:?}");
    assert_eq!(r.delivery.acked, r.delivery.sent, "{r:?}");
    assert_eq!(r.delivery.deliveries, r.delivery.acked * 20, "{r:?}");
    assert_eq!(r.loss.members, 20, "{r:?}");
    assert_eq!(r.loss.expected, r.delivery.acked * 20, "{r:?}");
    assert!(r.loss.clean(), "{r:?}");
    assert_eq!(r.latency.count, r.delivery.acked * 18, "{r:?}");
    assert!(r.publisher_cpu.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_two_processes_to_two_servers() {
    let (a, b) = (start(&[]).await, start(&[]).await);
    let args = "connections -n 20 -m 5 --hold 1 --processes 2";
    let Report::Connections(r) = bench_on(&[&a, &b], args).await else {
        panic!("wrong report")
    };
    assert_eq!(r.processes, 2);
    assert_eq!(r.connect.attempted, 20, "{r:?}");
    assert_eq!(r.connect.joined, 20, "{r:?}");
    assert_eq!(r.connect.failed, 0);
    assert!(r.connect.rate_per_s > 0.0, "{r:?}");
    assert!(r.rss_after_kib.is_some() && r.idle_cpu.is_some());
    assert!(r.counts.closes.is_empty(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_run() {
    let server = start(&[]).await;
    let args = "chat -c 20 --min-room 3 --max-room 8 -d 3 --send-min-s 0.2 --send-max-s 0.5 \
                --churn-fraction 0.2 --reconnect-fraction 0.2";
    let Report::Chat(r) = bench(&server, args).await else {
        panic!("wrong report")
    };
    assert_eq!(r.connect.joined, 20, "{r:?}");
    assert!(r.delivery.deliveries > 0, "{r:?}");
    assert!(r.loss.clean(), "{r:?}");
    assert_eq!(r.loss.not_recovered, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_run() {
    let server = start(&[]).await;
    let args = "soak -c 20 -d 3 --room-size 10 --misbehave-fraction 0.25 \
                --send-min-s 0.2 --send-max-s 0.5";
    let Report::Soak(r) = bench(&server, args).await else {
        panic!("wrong report")
    };
    assert!(r.ok, "{r:?}");
    assert!(r.delivery.deliveries > 0, "{r:?}");
    assert!(r.behaviours["garbage"].counts.bad_request > 0, "{r:?}");
    assert!(r.behaviours["flood"].counts.rate_limited > 0, "{r:?}");
}
