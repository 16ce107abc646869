//! Runs split over several OS processes: the parent starts copies of its own executable with
//! a hidden subcommand (`publish`, `hold`), talks to each over its stdin (one word a line:
//! `go`, `stop`) and reads its figures from its stdout (one JSON object a line).
//!
//! A process may hold at most 20,000 open files here, so 39,000 client sockets need two
//! processes; and a publisher in a process of its own keeps its schedule while the receivers'
//! process is busy reading.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout, Command};

use crate::Common;

/// A child bench process.
pub struct Child {
    name: String,
    child: tokio::process::Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Child {
    /// Starts `exe args…` (stdin and stdout piped, stderr shared with the parent); the secret
    /// goes through the environment, not the command line.
    pub fn spawn(
        name: String,
        exe: &PathBuf,
        args: Vec<String>,
        secret: Option<&str>,
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(exe);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .env_remove("PARLEY_BENCH_SECRET");
        if let Some(secret) = secret {
            cmd.env("PARLEY_BENCH_SECRET", secret);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("child stdout")?;
        Ok(Child {
            name,
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Sends one word (a line) to the child.
    pub async fn tell(&mut self, word: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("child stdin closed")?;
        stdin.write_all(format!("{word}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Reads the child's next JSON line.
    pub async fn next<T: DeserializeOwned>(&mut self) -> anyhow::Result<T> {
        loop {
            let Some(line) = self.lines.next_line().await? else {
                let status = self.child.wait().await?;
                bail!("{} ended ({status}) before reporting", self.name);
            };
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line)
                .with_context(|| format!("{} printed {line:?}", self.name));
        }
    }

    /// Closes its stdin and waits for it to exit.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().await?;
        if !status.success() {
            bail!("{} exited with {status}", self.name);
        }
        Ok(())
    }
}

/// The executable to start children from: `--bench-exe`, else this one.
pub fn exe(common: &Common) -> anyhow::Result<PathBuf> {
    match &common.bench_exe {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("locating the parley-bench executable"),
    }
}

/// The shared options a child gets, with `urls` as its URLs (server pids are the parent's to
/// read; the secret goes through the environment).
pub fn common_args(common: &Common, urls: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    for url in urls {
        args.extend(["--url".to_owned(), url.clone()]);
    }
    if let Some(ips) = &common.source_ips {
        args.extend(["--source-ips".to_owned(), ips.clone()]);
    }
    args.extend([
        "--connect-concurrency".to_owned(),
        common.connect_concurrency.to_string(),
        "--prefix".to_owned(),
        common.prefix.clone(),
        "--json".to_owned(),
        "--quiet".to_owned(),
    ]);
    args
}

/// In a child: prints one JSON line on stdout for the parent.
pub fn say<T: Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// In a child: waits for the parent's next word; `None` once stdin is closed (the parent is
/// gone or done).
pub async fn hear(stdin: &mut Lines<BufReader<tokio::io::Stdin>>) -> Option<String> {
    loop {
        match stdin.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => continue,
            Ok(Some(line)) => return Some(line.trim().to_owned()),
            _ => return None,
        }
    }
}

/// In a child: the parent's words, line by line.
pub fn parent_words() -> Lines<BufReader<tokio::io::Stdin>> {
    BufReader::new(tokio::io::stdin()).lines()
}

/// Splits `n` into `parts` shares as even as possible: `(first index, count)` each.
pub fn shares(n: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let mut out = Vec::with_capacity(parts);
    let mut first = 0;
    for i in 0..parts {
        let count = n / parts + usize::from(i < n % parts);
        out.push((first, count));
        first += count;
    }
    out
}

/// The URLs child `i` of `parts` uses: with at least as many URLs as children, every
/// `parts`-th one starting at `i` (two URLs, two children: one node each); otherwise URL
/// `i mod len`.
pub fn urls_for(urls: &[String], i: usize, parts: usize) -> Vec<String> {
    if urls.len() >= parts {
        urls.iter().skip(i).step_by(parts.max(1)).cloned().collect()
    } else {
        vec![urls[i % urls.len()].clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_work() {
        assert_eq!(shares(39_000, 2), vec![(0, 19_500), (19_500, 19_500)]);
        assert_eq!(shares(5, 2), vec![(0, 3), (3, 2)]);
        let urls: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(urls_for(&urls, 1, 2), vec!["b".to_owned()]);
        assert_eq!(urls_for(&urls, 0, 2), vec!["a".to_owned(), "c".to_owned()]);
        assert_eq!(urls_for(&urls[..1], 1, 2), vec!["a".to_owned()]);
    }
}
