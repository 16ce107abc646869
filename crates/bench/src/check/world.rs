//! The processes a check run owns: a `redis-server` with an append-only file, the parley nodes,
//! and one TCP relay per node between it and Redis (the partition fault). Plus the two tiny
//! clients the checker needs besides WebSockets: HTTP GET for the API and RESP for Redis.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// A free loopback port (bound and released at once).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Sends one command to Redis, then QUIT, and returns the raw reply text.
pub async fn redis_cmd(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let talk = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        req.push_str("*1\r\n$4\r\nQUIT\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    timeout(Duration::from_secs(30), talk)
        .await
        .context("redis command timed out")?
}

/// `GET path` with the API key (HTTP/1.0, so the answer ends with the connection): status and
/// body.
pub async fn http_get(port: u16, path: &str, key: &str) -> anyhow::Result<(u16, String)> {
    let talk = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = timeout(Duration::from_secs(5), talk)
        .await
        .context("http timeout")??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("bad http answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("bad http status")?;
    Ok((status, body.to_owned()))
}

/// The `redis-server` of a cluster run: AOF with `appendfsync always`, in its own directory.
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    snapshot: Option<PathBuf>,
}

impl Redis {
    /// Starts it on a free port with an empty directory under `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Redis> {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        let mut redis = Redis {
            port: free_port()?,
            dir,
            child: None,
            snapshot: None,
        };
        redis.spawn(true).await?;
        Ok(redis)
    }

    async fn spawn(&mut self, aof: bool) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendfsync", "always"])
            .args(["--appendonly", if aof { "yes" } else { "no" }])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (is it on PATH?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(reply) = redis_cmd(self.port, &["PING"]).await {
                if reply.contains("PONG") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not answer PING", self.port);
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGKILL, then start again from its AOF.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn(true).await
    }

    /// Whether a snapshot is kept for a later rollback.
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// `SAVE`, and keep a copy of the RDB file for [`Redis::rollback`].
    pub async fn snapshot(&mut self) -> anyhow::Result<()> {
        let reply = redis_cmd(self.port, &["SAVE"]).await?;
        if !reply.starts_with("+OK") {
            bail!("SAVE answered {reply:?}");
        }
        let copy = self.dir.join("snapshot.rdb");
        std::fs::rename(self.dir.join("dump.rdb"), &copy)?;
        self.snapshot = Some(copy);
        Ok(())
    }

    /// SIGKILL, then start from the kept snapshot with the AOF off (the acked writes since the
    /// snapshot are gone), then turn the AOF back on (rewritten from the rolled-back data) so
    /// later restarts keep what comes next.
    pub async fn rollback(&mut self) -> anyhow::Result<()> {
        let snapshot = self
            .snapshot
            .take()
            .context("no snapshot to roll back to")?;
        self.kill().await;
        let _ = std::fs::remove_dir_all(self.dir.join("appendonlydir"));
        let _ = std::fs::remove_file(self.dir.join("appendonly.aof"));
        std::fs::copy(&snapshot, self.dir.join("dump.rdb"))?;
        self.spawn(false).await?;
        redis_cmd(self.port, &["CONFIG", "SET", "appendonly", "yes"]).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = redis_cmd(self.port, &["INFO", "persistence"]).await?;
            if info.contains("aof_enabled:1")
                && info.contains("aof_rewrite_in_progress:0")
                && info.contains("aof_rewrite_scheduled:0")
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("redis did not finish its AOF rewrite after the rollback");
            }
            sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        Ok(())
    }
}

/// What a relay does to the bytes between a node and Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Passes them.
    Open,
    /// Closes every connection and refuses new ones (closes them at once).
    Cut,
    /// Passes each chunk after this delay.
    Delay(Duration),
}

/// A TCP relay from a loopback port to Redis.
pub struct Relay {
    /// The port the node connects to.
    pub port: u16,
    mode: watch::Sender<Link>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying a free port to `upstream`.
    pub async fn start(upstream: u16) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, rx) = watch::channel(Link::Open);
        let task = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let cut = *rx.borrow() == Link::Cut;
                if cut {
                    drop(down);
                    continue;
                }
                tokio::spawn(relay_conn(down, upstream, rx.clone()));
            }
        });
        Ok(Relay { port, mode, task })
    }

    /// Changes what the relay does.
    pub fn set(&self, link: Link) {
        self.mode.send_replace(link);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_conn(down: TcpStream, upstream: u16, rx: watch::Receiver<Link>) {
    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    tokio::select! {
        _ = pump(dr, uw, rx.clone()) => {}
        _ = pump(ur, dw, rx) => {}
    }
}

async fn pump(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, mut rx: watch::Receiver<Link>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = rx.changed() => {
                let cut = changed.is_err() || *rx.borrow() == Link::Cut;
                if cut {
                    return;
                }
                continue;
            }
        };
        let link = *rx.borrow();
        match link {
            Link::Cut => return,
            Link::Delay(d) => sleep(d).await,
            Link::Open => {}
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One parley node process.
pub struct Node {
    /// Its index in the run.
    pub index: usize,
    /// Its port on 127.0.0.1.
    pub port: u16,
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped.
    pub paused: bool,
}

impl Node {
    /// Starts `exe --bind 127.0.0.1:PORT args…`, logging to `dir/node-I.log`, and waits for
    /// `/healthz`.
    pub async fn start(
        index: usize,
        exe: &Path,
        args: Vec<String>,
        dir: &Path,
    ) -> anyhow::Result<Node> {
        let mut node = Node {
            index,
            port: free_port()?,
            exe: exe.to_owned(),
            args,
            log: dir.join(format!("node-{index}.log")),
            child: None,
            paused: false,
        };
        node.spawn().await?;
        Ok(node)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.exe)
            .arg("--bind")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("PARLEY_CHECK_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(self.port, "/healthz", "").await {
                return Ok(());
            }
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "node {} exited at start ({status}); see {}",
                        self.index,
                        self.log.display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("node {} did not answer /healthz", self.index);
            }
            sleep(Duration::from_millis(25)).await;
        }
    }

    /// Whether its process runs (and is not stopped).
    pub fn up(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.paused = false;
    }

    /// Starts it again on the same port (and database).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn().await
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn pause(&mut self, stop: bool) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("node not running")?;
        let sig = if stop { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {sig} {pid} failed");
        }
        self.paused = stop;
        Ok(())
    }
}
