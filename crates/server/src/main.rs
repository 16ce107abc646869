//! The `parley` binary: parse configuration, start tracing, bind, serve until SIGTERM/SIGINT.
//! `parley token` mints an HS256 token with the configured secret.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use parley::auth::mint_for_node;
use parley::config::{parse_set, settings_help, Config, LogConfig, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's allocator: at 25,000 chat messages a second on two cores it
/// cut the node's CPU per message by about 7% and its p99 latency about fourfold; idle
/// connections cost about 10% more memory (docs/BENCHMARKS.md, round 4). SQLite's own
/// allocations still go to glibc's (see `limit_malloc_arenas`).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`MALLOC_CONF` syntax; the environment's
/// `_RJEM_MALLOC_CONF` is read after it). One arena: with one per core, an idle connection's
/// memory, allocated on whichever thread accepted or woke it, cost about 200 bytes more.
/// Freed pages go back to the system at once (no decay): by default jemalloc keeps them for
/// about 10 s and gives them back only while it allocates, so a node that went idle after a
/// storm of connections kept what the handshakes had used, about 300 bytes per connection.
/// The chat and fan-out runs cost the same CPU either way (docs/BENCHMARKS.md, round 5).
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8; 44] = b"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0\0";

/// parley: a real-time chat server over WebSockets.
#[derive(Parser, Debug)]
#[command(version, about, after_long_help = settings_help())]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The server's options; each is also a setting (see the table in `--help`). Given before a
/// subcommand or after `serve`.
#[derive(Args, Debug)]
struct Options {
    /// Listen address [default: 127.0.0.1:3000].
    #[arg(long, env = "PARLEY_BIND")]
    bind: Option<String>,
    /// SQLite log of a single node [default: ./parley.db].
    #[arg(long, env = "PARLEY_DB")]
    db: Option<PathBuf>,
    /// HS256 secret: enables jwt mode.
    #[arg(long, env = "PARLEY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// RS256/ES256 PEM public key file: enables jwt mode.
    #[arg(long, env = "PARLEY_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// Cluster mode: Redis URL(s), comma-separated; several shard rooms across servers.
    #[arg(
        long = "redis",
        env = "PARLEY_REDIS_URL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    redis: Option<Vec<String>>,
    /// Bearer key of the HTTP API under /api; without it the API answers 404.
    #[arg(long, env = "PARLEY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow anonymous mode on a non-loopback address.
    #[arg(long, env = "PARLEY_ALLOW_ANONYMOUS", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    allow_anonymous: Option<bool>,
    /// Browser origins allowed to connect (comma-separated).
    #[arg(long, env = "PARLEY_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Option<Vec<String>>,
    /// TOML file with any of the settings.
    #[arg(long, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    /// Any setting by its dotted name, e.g. --set limits.max_content_bytes=8192 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// What `parley token` reads: the secret, and the file and settings that may hold it (and
/// `auth.issuer` / `auth.audience`).
#[derive(Args, Debug)]
struct TokenOptions {
    /// HS256 secret to sign with.
    #[arg(long, env = "PARLEY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// TOML file with any of the settings.
    #[arg(long, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    /// Any setting by its dotted name, e.g. --set auth.issuer=chat-backend (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl TokenOptions {
    fn overrides(&self) -> anyhow::Result<Overrides> {
        let mut values = Vec::new();
        if let Some(secret) = &self.jwt_secret {
            values.push(("auth.jwt_secret".to_owned(), secret.clone().into()));
        }
        for arg in &self.set {
            values.push(parse_set(arg)?);
        }
        Ok(Overrides {
            config_file: self.config.clone(),
            values,
        })
    }
}

/// `later` on top of `earlier`: its values win, and its file when it names one.
fn merge(earlier: Overrides, later: Overrides) -> Overrides {
    let mut values = earlier.values;
    values.extend(later.values);
    Overrides {
        config_file: later.config_file.or(earlier.config_file),
        values,
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default).
    Serve {
        #[command(flatten)]
        options: Box<Options>,
    },
    /// Print an HS256 token signed with the configured secret.
    Token {
        #[command(flatten)]
        options: TokenOptions,
        /// The user id.
        #[arg(long)]
        sub: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Rooms (or *-patterns) the token may join, comma-separated; default any.
        #[arg(long, value_delimiter = ',')]
        rooms: Option<Vec<String>>,
    },
}

impl Options {
    fn overrides(&self) -> anyhow::Result<Overrides> {
        let mut values = Vec::new();
        let mut put = |key: &str, value: toml::Value| values.push((key.to_owned(), value));
        if let Some(bind) = &self.bind {
            put("server.bind", bind.clone().into());
        }
        if let Some(db) = &self.db {
            put("store.db", db.display().to_string().into());
        }
        if let Some(secret) = &self.jwt_secret {
            put("auth.jwt_secret", secret.clone().into());
        }
        if let Some(key) = &self.jwt_public_key {
            put("auth.jwt_public_key", key.display().to_string().into());
        }
        if let Some(urls) = &self.redis {
            let list = urls
                .iter()
                .map(|u| toml::Value::String(u.trim().to_owned()))
                .collect();
            put("redis.urls", toml::Value::Array(list));
        }
        if let Some(key) = &self.api_key {
            put("api.key", key.clone().into());
        }
        if let Some(allow) = self.allow_anonymous {
            put("auth.allow_anonymous", allow.into());
        }
        if let Some(origins) = &self.allowed_origins {
            let list = origins
                .iter()
                .map(|o| toml::Value::String(o.trim().to_owned()))
                .collect();
            put("allowed_origins", toml::Value::Array(list));
        }
        for arg in &self.set {
            values.push(parse_set(arg)?);
        }
        Ok(Overrides {
            config_file: self.config.clone(),
            values,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let top = cli.options.overrides()?;
    let overrides = match &cli.command {
        Some(Command::Serve { options }) => merge(top, options.overrides()?),
        Some(Command::Token { options, .. }) => merge(top, options.overrides()?),
        None => top,
    };
    let config = Config::load(&overrides)?;
    match cli.command {
        Some(Command::Token {
            options: _,
            sub,
            name,
            ttl,
            rooms,
        }) => {
            let secret = config.auth.jwt_secret.as_deref().context(
                "parley token needs the HS256 secret: --jwt-secret or PARLEY_JWT_SECRET",
            )?;
            let ttl: Duration = ttl.into();
            let (token, _) = mint_for_node(&config.auth, secret, sub, name, ttl.as_secs(), rooms);
            println!("{token}");
            Ok(())
        }
        Some(Command::Serve { .. }) | None => serve(config),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    limit_malloc_arenas();
    init_logging(&config.log)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.bind))?;
        parley::run(listener, config, shutdown_signal()).await
    })
}

/// Log lines on stdout: `log.format` (text or JSON lines) filtered by `RUST_LOG` when it is set,
/// else by `log.level`. Colours only when stdout is a terminal.
fn init_logging(log: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).map_err(|_| {
            anyhow::anyhow!(
                "RUST_LOG `{spec}` is not a log filter; use error, warn, info, debug or trace, \
                 optionally per module (parley=debug,info)"
            )
        })?,
        _ => EnvFilter::try_new(&log.level)?,
    };
    let ansi = std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// At most two glibc malloc arenas (the default is eight per core). A connection's memory is
/// allocated on whichever worker thread accepted or woke it; with an arena per thread, memory
/// freed after a join burst sits in arenas other threads do not reuse. Measured with
/// parley-bench at 19,000 connections: about 250 bytes less RSS per connection (see
/// docs/BENCHMARKS.md). `MALLOC_ARENA_MAX` in the environment still wins.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
        // but this one exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
