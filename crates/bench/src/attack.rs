//! Attackers for `soak` (issue #12): clients that try to make a node spend memory, files or
//! storage without limit, run beside the crowd and counted apart from it.
//!
//! - `half_open`: TCP connections that send part of an HTTP request head and stall. Each
//!   counts whether the server closed it (a header-read timeout) and after how long; one the
//!   server closes is replaced, so the pressure stays constant.
//! - `churn`: a WebSocket that joins and leaves rooms of fresh names, within the join rate.
//! - `history_hog`: a WebSocket with a tiny receive buffer that asks for 200-event pages of
//!   the big room and never reads; the server should cut it (4009) and it comes back.
//! - `narrow_refresh`: joins a room its token allows, then refreshes to a token whose `rooms`
//!   claim excludes it; expects `left` with `reason: forbidden`, then reconnects.
//! - `silent_echo`: upgrades `/echo` by hand and never sends a byte (nor a pong); counts
//!   whether the server closes it.
//!
//! A sampler reads the server's RSS and open files (/proc/PID/fd) every second for the report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::net::{unix_nanos, Ws};
use crate::Common;

/// Named counters, shared by the attackers.
#[derive(Default, Clone)]
struct Tally(Arc<Mutex<BTreeMap<String, u64>>>);

impl Tally {
    fn add(&self, name: &str, n: u64) {
        *self
            .0
            .lock()
            .expect("tally")
            .entry(name.to_owned())
            .or_default() += n;
    }

    fn max(&self, name: &str, n: u64) {
        let mut map = self.0.lock().expect("tally");
        let v = map.entry(name.to_owned()).or_default();
        *v = (*v).max(n);
    }

    fn take(&self) -> BTreeMap<String, u64> {
        self.0.lock().expect("tally").clone()
    }
}

/// The server's resources over the run, from /proc (with `--server-pid`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct ServerPeak {
    /// Samples taken (one a second).
    pub samples: u64,
    /// RSS at the first sample, KiB.
    pub rss_kib_start: u64,
    /// Highest RSS, KiB.
    pub rss_kib_max: u64,
    /// RSS at the last sample, KiB.
    pub rss_kib_end: u64,
    /// Open files (entries of /proc/PID/fd) at the first sample.
    pub open_files_start: u64,
    /// Most open files.
    pub open_files_max: u64,
    /// Open files at the last sample.
    pub open_files_end: u64,
}

/// What the attackers did and what the server did to them.
#[derive(Debug, Default, Serialize)]
pub struct AttackReport {
    /// Attackers of each kind.
    pub per_kind: usize,
    /// Counters, `kind.what`.
    pub counts: BTreeMap<String, u64>,
    /// Rooms `GET /api/rooms` listed at the end (with `--api-key`).
    pub rooms_listed_end: Option<u64>,
    /// The server's RSS and open files over the run.
    pub server: Option<ServerPeak>,
}

impl AttackReport {
    /// A human summary.
    pub fn human(&self) -> String {
        let mut s = format!("attackers: {} of each kind\n", self.per_kind);
        for (k, v) in &self.counts {
            s += &format!("  {k} {v}\n");
        }
        if let Some(rooms) = self.rooms_listed_end {
            s += &format!("rooms listed by GET /api/rooms at the end: {rooms}\n");
        }
        if let Some(p) = &self.server {
            s += &format!(
                "server RSS KiB start {} max {} end {}; open files start {} max {} end {} ({} samples)\n",
                p.rss_kib_start, p.rss_kib_max, p.rss_kib_end, p.open_files_start,
                p.open_files_max, p.open_files_end, p.samples
            );
        }
        s
    }
}

/// The running attackers and sampler; [`Attack::finish`] stops them and reports.
pub struct Attack {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    tally: Tally,
    peak: Arc<Mutex<Option<ServerPeak>>>,
    per_kind: usize,
    http: SocketAddr,
    api_key: Option<String>,
}

/// Where the attackers aim.
struct Target {
    addr: SocketAddr,
    host: String,
    key: Option<EncodingKey>,
    prefix: String,
    big_room: String,
}

impl Target {
    fn token(&self, user: &str, rooms: Option<Vec<String>>) -> String {
        match &self.key {
            Some(key) => {
                let now = unix_nanos() / 1_000_000_000;
                let mut claims = json!({"sub": user, "exp": now + 86_400, "iat": now});
                if let Some(rooms) = rooms {
                    claims["rooms"] = json!(rooms);
                }
                let token = jsonwebtoken::encode(&Header::default(), &claims, key)
                    .expect("HS256 signing cannot fail");
                format!("token={token}")
            }
            None => format!("user={user}"),
        }
    }

    async fn ws(
        &self,
        user: &str,
        rooms: Option<Vec<String>>,
        recv_buffer: Option<u32>,
    ) -> anyhow::Result<Ws> {
        let socket = TcpSocket::new_v4()?;
        if let Some(size) = recv_buffer {
            let _ = socket.set_recv_buffer_size(size);
        }
        let stream = socket.connect(self.addr).await?;
        let url = format!("ws://{}/ws?{}", self.host, self.token(user, rooms));
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::client_async(url, stream),
        )
        .await
        .context("upgrade timed out")??;
        expect(&mut ws, |f| f["type"] == "authenticated").await?;
        Ok(ws)
    }
}

/// Reads frames until one satisfies `want`; returns it. Errors on close or after 30 s.
async fn expect(ws: &mut Ws, want: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(text) = msg? {
                let frame: Value = serde_json::from_str(&text)?;
                if want(&frame) {
                    return Ok(frame);
                }
            }
        }
        anyhow::bail!("closed")
    })
    .await
    .context("no answer in 30 s")?
}

/// Starts `per_kind` attackers of each kind (none with 0) and the sampler of `--server-pid`.
pub async fn start(
    common: &Common,
    per_kind: usize,
    big_room: String,
    api_key: Option<String>,
) -> anyhow::Result<Attack> {
    let url = common.urls.first().context("give a --url")?;
    let rest = url
        .strip_prefix("ws://")
        .context("only ws:// URLs are supported")?;
    let host = rest.split(['/', '?']).next().unwrap_or(rest).to_owned();
    let addr = tokio::net::lookup_host(&host)
        .await?
        .next()
        .context("no address")?;
    let target = Arc::new(Target {
        addr,
        host,
        key: common
            .secret
            .as_deref()
            .map(|s| EncodingKey::from_secret(s.as_bytes())),
        prefix: common.prefix.clone(),
        big_room,
    });
    let stop = CancellationToken::new();
    let tally = Tally::default();
    let mut tasks = JoinSet::new();
    let peak = Arc::new(Mutex::new(None));
    if !common.server_pids.is_empty() {
        tasks.spawn(sample(
            common.server_pids.clone(),
            peak.clone(),
            stop.clone(),
        ));
    }
    for i in 0..per_kind {
        let (t, s, c) = (target.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move { half_open(&t, &s, &c).await });
        let (t, s, c) = (target.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move { churn(i, &t, &s, &c).await });
        let (t, s, c) = (target.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move { history_hog(i, &t, &s, &c).await });
        if target.key.is_some() {
            let (t, s, c) = (target.clone(), stop.clone(), tally.clone());
            tasks.spawn(async move { narrow_refresh(i, &t, &s, &c).await });
        }
        let (t, s, c) = (target.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move { silent_echo(&t, &s, &c).await });
    }
    Ok(Attack {
        stop,
        tasks,
        tally,
        peak,
        per_kind,
        http: addr,
        api_key,
    })
}

impl Attack {
    /// Stops every attacker and the sampler; counts what they saw.
    pub async fn finish(mut self) -> AttackReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let rooms_listed_end = match &self.api_key {
            Some(key) => count_rooms(self.http, key).await.ok(),
            None => None,
        };
        AttackReport {
            per_kind: self.per_kind,
            counts: self.tally.take(),
            rooms_listed_end,
            server: self.peak.lock().expect("peak").clone(),
        }
    }
}

async fn sample(pids: Vec<u32>, peak: Arc<Mutex<Option<ServerPeak>>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(s) = crate::procfs::sample(&pids) else {
            continue;
        };
        let files: u64 = pids
            .iter()
            .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
            .map(|d| d.count() as u64)
            .sum();
        let mut guard = peak.lock().expect("peak");
        let p = guard.get_or_insert_with(|| ServerPeak {
            rss_kib_start: s.rss_kib,
            open_files_start: files,
            ..ServerPeak::default()
        });
        p.samples += 1;
        p.rss_kib_max = p.rss_kib_max.max(s.rss_kib);
        p.rss_kib_end = s.rss_kib;
        p.open_files_max = p.open_files_max.max(files);
        p.open_files_end = files;
    }
}

/// Sleeps `d` unless stopped; `false` when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Reads until the peer closes (or stops); returns whether the peer closed, and whether it
/// sent anything first.
async fn until_closed(stream: &mut TcpStream, stop: &CancellationToken) -> (bool, bool) {
    let mut buf = [0u8; 4096];
    let mut answered = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return (false, answered),
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => return (true, answered),
                Ok(_) => answered = true,
            },
        }
    }
}

async fn half_open(t: &Target, stop: &CancellationToken, tally: &Tally) {
    while !stop.is_cancelled() {
        let Ok(mut stream) = TcpStream::connect(t.addr).await else {
            tally.add("half_open.connect_failed", 1);
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        };
        tally.add("half_open.opened", 1);
        // A request head that never ends.
        let head = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n",
            t.host
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            tally.add("half_open.closed_by_server", 1);
            continue;
        }
        let opened = Instant::now();
        let (closed, answered) = until_closed(&mut stream, stop).await;
        if closed {
            tally.add("half_open.closed_by_server", 1);
            tally.add(
                "half_open.held_ms_total",
                opened.elapsed().as_millis() as u64,
            );
            tally.max("half_open.held_ms_max", opened.elapsed().as_millis() as u64);
            if answered {
                tally.add("half_open.answered_before_close", 1);
            }
            if !pause(stop, Duration::from_millis(100)).await {
                return;
            }
        } else {
            tally.add("half_open.still_open_at_end", 1);
            tally.max("half_open.held_ms_max", opened.elapsed().as_millis() as u64);
        }
    }
}

async fn silent_echo(t: &Target, stop: &CancellationToken, tally: &Tally) {
    while !stop.is_cancelled() {
        let Ok(mut stream) = TcpStream::connect(t.addr).await else {
            tally.add("silent_echo.connect_failed", 1);
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        };
        let head = format!(
            "GET /echo HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            t.host
        );
        let mut answer = Vec::new();
        let upgraded = stream.write_all(head.as_bytes()).await.is_ok() && {
            let mut buf = [0u8; 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        answer.extend_from_slice(&buf[..n]);
                        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                            break answer.starts_with(b"HTTP/1.1 101");
                        }
                    }
                    _ => break false,
                }
            }
        };
        if !upgraded {
            tally.add("silent_echo.refused", 1);
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        tally.add("silent_echo.opened", 1);
        let opened = Instant::now();
        // Never a byte back: no pong, no close frame.
        let (closed, _) = until_closed(&mut stream, stop).await;
        if closed {
            tally.add("silent_echo.closed_by_server", 1);
            tally.max(
                "silent_echo.held_ms_max",
                opened.elapsed().as_millis() as u64,
            );
            if !pause(stop, Duration::from_millis(100)).await {
                return;
            }
        } else {
            tally.add("silent_echo.still_open_at_end", 1);
            tally.max(
                "silent_echo.held_ms_max",
                opened.elapsed().as_millis() as u64,
            );
        }
    }
}

async fn churn(i: usize, t: &Target, stop: &CancellationToken, tally: &Tally) {
    let user = format!("{}-churn{i}", t.prefix);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let result: anyhow::Result<()> = async {
            let mut ws = t.ws(&user, None, None).await?;
            tally.add("churn.connects", 1);
            while !stop.is_cancelled() {
                n += 1;
                let room = format!("{}-churn-{i}-{n}", t.prefix);
                for ty in ["join", "leave"] {
                    loop {
                        ws.send(Message::text(json!({"type": ty, "room": room}).to_string()))
                            .await?;
                        let answer = expect(&mut ws, |f| {
                            f["room"] == room.as_str()
                                && (f["type"] == "joined"
                                    || f["type"] == "left"
                                    || f["type"] == "error")
                        })
                        .await?;
                        if answer["code"] == "rate_limited" {
                            tally.add("churn.rate_limited", 1);
                            let ms = answer["retry_after_ms"].as_u64().unwrap_or(200);
                            if !pause(stop, Duration::from_millis(ms)).await {
                                return Ok(());
                            }
                            continue;
                        }
                        if answer["type"] == "error" {
                            tally.add("churn.errors", 1);
                        } else {
                            tally.add(
                                &format!("churn.{}", answer["type"].as_str().unwrap_or("?")),
                                1,
                            );
                        }
                        break;
                    }
                }
                // Two join-bucket tokens per cycle: 2.5 cycles/s would use all of 5/s.
                if !pause(stop, Duration::from_millis(500)).await {
                    break;
                }
            }
            let _ = ws.close(None).await;
            Ok(())
        }
        .await;
        if result.is_err() {
            tally.add("churn.dropped", 1);
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
        }
    }
}

async fn history_hog(i: usize, t: &Target, stop: &CancellationToken, tally: &Tally) {
    let user = format!("{}-hog{i}", t.prefix);
    while !stop.is_cancelled() {
        let Ok(mut ws) = t.ws(&user, None, Some(4096)).await else {
            tally.add("history_hog.connect_failed", 1);
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        };
        tally.add("history_hog.connects", 1);
        let opened = Instant::now();
        let mut cut = false;
        while !stop.is_cancelled() {
            let ask = json!({"type": "history", "room": t.big_room, "limit": 200}).to_string();
            // Never reads: the answers pile up in the server's queue for this connection.
            if ws.send(Message::text(ask)).await.is_err() {
                cut = true;
                break;
            }
            tally.add("history_hog.requests", 1);
            if !pause(stop, Duration::from_millis(200)).await {
                break;
            }
        }
        if cut {
            tally.add("history_hog.cut_by_server", 1);
            tally.max(
                "history_hog.held_ms_max",
                opened.elapsed().as_millis() as u64,
            );
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
        } else {
            tally.add("history_hog.still_open_at_end", 1);
        }
    }
}

async fn narrow_refresh(i: usize, t: &Target, stop: &CancellationToken, tally: &Tally) {
    let user = format!("{}-narrow{i}", t.prefix);
    let room = format!("{}-narrow-{i}", t.prefix);
    let wide = vec![format!("{}-narrow-*", t.prefix)];
    let narrow = vec![format!("{}-nowhere", t.prefix)];
    while !stop.is_cancelled() {
        let result: anyhow::Result<()> = async {
            let mut ws = t.ws(&user, Some(wide.clone()), None).await?;
            ws.send(Message::text(
                json!({"type": "join", "room": room}).to_string(),
            ))
            .await?;
            let joined = expect(&mut ws, |f| f["room"] == room.as_str()).await?;
            if joined["type"] != "joined" {
                tally.add("narrow_refresh.join_refused", 1);
                let _ = ws.close(None).await;
                pause(stop, Duration::from_secs(2)).await;
                return Ok(());
            }
            pause(stop, Duration::from_secs(1)).await;
            let token = t.token(&user, Some(narrow.clone()));
            let token = token.strip_prefix("token=").unwrap_or(&token).to_owned();
            ws.send(Message::text(
                json!({"type": "refresh", "token": token}).to_string(),
            ))
            .await?;
            tally.add("narrow_refresh.refreshes", 1);
            let left = expect(&mut ws, |f| f["type"] == "left" || f["type"] == "error").await?;
            if left["type"] == "left"
                && left["reason"] == "forbidden"
                && left["room"] == room.as_str()
            {
                tally.add("narrow_refresh.left_forbidden", 1);
            } else {
                tally.add("narrow_refresh.unexpected", 1);
            }
            let _ = ws.close(None).await;
            pause(stop, Duration::from_secs(1)).await;
            Ok(())
        }
        .await;
        if result.is_err() {
            tally.add("narrow_refresh.dropped", 1);
            if !pause(stop, Duration::from_secs(1)).await {
                return;
            }
        }
    }
}

/// `GET /api/rooms` by hand: the number of rooms listed.
async fn count_rooms(addr: SocketAddr, key: &str) -> anyhow::Result<u64> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /api/rooms HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut body)).await??;
    let text = String::from_utf8_lossy(&body);
    let json = text.split("\r\n\r\n").nth(1).context("no body")?;
    let value: Value = serde_json::from_str(json)?;
    Ok(value["rooms"].as_array().map_or(0, |r| r.len() as u64))
}
