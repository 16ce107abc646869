//! A throwaway `redis-server` for cluster tests: a child process on a free loopback port,
//! without persistence, killed when dropped. A missing binary fails the test loudly: the
//! cluster suite is never skipped.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// With persistence: the AOF directory (kept across restarts).
    dir: Option<tempfile::TempDir>,
    /// Persistence by RDB snapshots only (`SAVE`), no AOF.
    snapshots: bool,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a fresh, empty server on a free port.
    pub fn start() -> RedisServer {
        Self::start_in(None, false)
    }

    /// Starts a server that fsyncs every write to an append-only file, so a SIGKILL and a
    /// restart keep everything it acknowledged.
    pub fn start_persistent() -> RedisServer {
        Self::start_in(Some(tempfile::TempDir::new().unwrap()), false)
    }

    /// Starts a server that persists only the RDB snapshots the test asks for (`SAVE`), so a
    /// SIGKILL and a restart bring back the last snapshot: less than it acknowledged.
    pub fn start_snapshotting() -> RedisServer {
        Self::start_in(Some(tempfile::TempDir::new().unwrap()), true)
    }

    /// A port found free may be taken by someone else before redis-server binds it: then our
    /// child exits (or another server answers there), and we try another port.
    fn start_in(dir: Option<tempfile::TempDir>, snapshots: bool) -> RedisServer {
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir,
            snapshots,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.try_spawn() {
                return server;
            }
            server.kill();
        }
        panic!("redis-server could not bind a free port in five tries");
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server on port {} did not start",
            self.port
        );
    }

    /// Starts the child and waits until it answers on its port: true when the server there is
    /// ours (its `process_id` is our child's).
    fn try_spawn(&mut self) -> bool {
        let mut args: Vec<String> = ["--port", &self.port.to_string(), "--bind", "127.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let persistence: &[&str] = match &self.dir {
            Some(_) if self.snapshots => &[
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ],
            Some(_) => &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            None => &["--save", "", "--appendonly", "no"],
        };
        args.extend(persistence.iter().map(|s| s.to_string()));
        if let Some(dir) = &self.dir {
            args.push("--dir".into());
            args.push(dir.path().display().to_string());
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the cluster tests need it: \
                 apt-get install -y redis-server"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                return false;
            }
            if self.ping() {
                return self.process_id() == Some(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The `process_id` of the server answering on the port.
    fn process_id(&self) -> Option<u32> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        conn.write_all(b"INFO server\r\n").ok()?;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.contains("process_id:") || !text[text.find("process_id:")?..].contains('\n') {
            let n = conn.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let rest = &text[text.find("process_id:")? + "process_id:".len()..];
        rest[..rest.find('\r')?].trim().parse().ok()
    }

    /// Whether it answers PING.
    pub fn ping(&self) -> bool {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        if conn.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        conn.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills it (SIGKILL): everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: empty, or with its data when persistent.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a command through `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `SAVE`, keeping a copy of the RDB file for [`RedisServer::roll_back`].
    pub fn snapshot(&mut self) {
        assert_eq!(self.cli(&["SAVE"]).trim(), "OK");
        let dir = self.dir.as_ref().expect("a persistent server").path();
        std::fs::rename(dir.join("dump.rdb"), dir.join("snapshot.rdb")).unwrap();
    }

    /// The operator's restore of an older backup: SIGKILL, then start from the snapshot kept by
    /// [`RedisServer::snapshot`] (the AOF set aside, so everything acknowledged since is gone)
    /// and turn the AOF back on, as the server was configured (`appendfsync always`).
    pub fn roll_back(&mut self) {
        self.kill();
        let dir = self.dir.as_ref().expect("a persistent server").path();
        let _ = std::fs::remove_dir_all(dir.join("appendonlydir"));
        std::fs::copy(dir.join("snapshot.rdb"), dir.join("dump.rdb")).unwrap();
        let snapshots = std::mem::replace(&mut self.snapshots, true);
        self.spawn();
        self.snapshots = snapshots;
        assert_eq!(
            self.cli(&["CONFIG", "SET", "appendonly", "yes"]).trim(),
            "OK"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = self.cli(&["INFO", "persistence"]);
            if info.contains("aof_enabled:1") && info.contains("aof_rewrite_in_progress:0") {
                return;
            }
            assert!(Instant::now() < deadline, "AOF back on: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
