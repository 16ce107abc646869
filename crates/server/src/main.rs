//! The `parley` binary: parse configuration, start tracing, bind, serve until SIGTERM/SIGINT.
//! `parley token` mints an HS256 token with the configured secret.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use parley::auth::mint_for_node;
use parley::config::{parse_set, settings_help, Config, Overrides};
use tracing_subscriber::EnvFilter;

/// parley: a real-time chat server over WebSockets.
#[derive(Parser, Debug)]
#[command(version, about, after_long_help = settings_help())]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Options shared by every command; each is also a setting (see the table in `--help`).
#[derive(Args, Debug)]
struct Options {
    /// Listen address [default: 127.0.0.1:3000].
    #[arg(long, env = "PARLEY_BIND", global = true)]
    bind: Option<String>,
    /// SQLite log of a single node [default: ./parley.db].
    #[arg(long, env = "PARLEY_DB", global = true)]
    db: Option<PathBuf>,
    /// HS256 secret: enables jwt mode.
    #[arg(long, env = "PARLEY_JWT_SECRET", global = true, hide_env_values = true)]
    jwt_secret: Option<String>,
    /// RS256/ES256 PEM public key file: enables jwt mode.
    #[arg(long, env = "PARLEY_JWT_PUBLIC_KEY", global = true)]
    jwt_public_key: Option<PathBuf>,
    /// Cluster mode: Redis URL(s), comma-separated; several shard rooms across servers.
    #[arg(
        long = "redis",
        env = "PARLEY_REDIS_URL",
        global = true,
        value_delimiter = ',',
        hide_env_values = true
    )]
    redis: Option<Vec<String>>,
    /// Bearer key of the HTTP API under /api; without it the API answers 404.
    #[arg(long, env = "PARLEY_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    /// Allow anonymous mode on a non-loopback address.
    #[arg(long, env = "PARLEY_ALLOW_ANONYMOUS", global = true, value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    allow_anonymous: Option<bool>,
    /// Browser origins allowed to connect (comma-separated).
    #[arg(
        long,
        env = "PARLEY_ALLOWED_ORIGINS",
        global = true,
        value_delimiter = ','
    )]
    allowed_origins: Option<Vec<String>>,
    /// TOML file with any of the settings.
    #[arg(long, env = "PARLEY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Any setting by its dotted name, e.g. --set limits.max_content_bytes=8192 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print an HS256 token signed with the configured secret.
    Token {
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
    let config = Config::load(&cli.options.overrides()?)?;
    match cli.command {
        Some(Command::Token {
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
        Some(Command::Serve) | None => serve(config),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.bind))?;
        parley::run(listener, config, shutdown_signal()).await
    })
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
