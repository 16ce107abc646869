//! A real parley server in-process (as `crates/server/tests/common` starts it): 127.0.0.1, a
//! SQLite file in a temp dir, config overrides; stoppable and restartable on the same address
//! and database, so a client's reconnect finds it again.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use parley::config::{Config, Overrides};
use parley_client::{Events, RoomEvent};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for any one event before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) server.
pub struct Server {
    /// Where it listens; kept across restarts.
    pub addr: SocketAddr,
    /// Its SQLite file.
    pub db: PathBuf,
    settings: Vec<(String, toml::Value)>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

fn config(db: &std::path::Path, settings: &[(String, toml::Value)]) -> Config {
    let mut values = vec![(
        "store.db".to_owned(),
        toml::Value::from(db.display().to_string()),
    )];
    values.extend(settings.iter().cloned());
    Config::load(&Overrides {
        config_file: None,
        values,
    })
    .expect("test config")
}

impl Server {
    /// Starts an anonymous-mode server with `settings` (dotted names).
    pub async fn start(settings: &[(&str, toml::Value)]) -> Server {
        let dir = TempDir::new().unwrap();
        let db = dir.path().join("parley.db");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = Server {
            addr,
            db,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            shutdown: None,
            handle: None,
            _dir: dir,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (tx, rx) = oneshot::channel::<()>();
        let config = config(&self.db, &self.settings);
        self.handle = Some(tokio::spawn(parley::run(listener, config, async move {
            let _ = rx.await;
        })));
        self.shutdown = Some(tx);
    }

    /// `ws://addr/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Graceful shutdown (every socket gets 1001); waits for `run` to return.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("shutdown within 30 s")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// Starts again on the same address, with the same database unless `fresh_db`.
    pub async fn restart(&mut self, fresh_db: bool) {
        if fresh_db {
            self.db = self._dir.path().join(format!(
                "parley-{}.db",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
        }
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The next event, failing the test after [`TIMEOUT`].
pub async fn next(events: &mut Events) -> RoomEvent {
    tokio::time::timeout(TIMEOUT, events.recv())
        .await
        .expect("an event within the timeout")
        .expect("the client is still running")
}

/// Reads events until `pred` picks one; returns it and the events before it.
pub async fn until<T>(
    events: &mut Events,
    mut pred: impl FnMut(&RoomEvent) -> Option<T>,
) -> (T, Vec<RoomEvent>) {
    let mut seen = Vec::new();
    loop {
        let ev = next(events).await;
        if let Some(t) = pred(&ev) {
            return (t, seen);
        }
        seen.push(ev);
    }
}

/// A TCP proxy in front of a server that can black-hole its current connections: their bytes
/// are read and dropped in both directions, the sockets stay open, as when a network path dies
/// without a FIN. Connections made afterwards are forwarded normally.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut_below: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let cut_below = Arc::new(AtomicUsize::new(0));
        let (acc, cut) = (accepted.clone(), cut_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let index = acc.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if index < cut.load(Ordering::SeqCst) {
                                        continue; // black-holed
                                    }
                                    if to.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        // Keep the write half open while black-holed: no FIN reaches the peer.
                        if index >= cut.load(Ordering::SeqCst) {
                            let _ = to.shutdown().await;
                        } else {
                            std::future::pending::<()>().await;
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            accepted,
            cut_below,
        }
    }

    /// Black-holes every connection accepted so far.
    pub fn blackhole_existing(&self) {
        use std::sync::atomic::Ordering;
        self.cut_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}
