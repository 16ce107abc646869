//! Configuration: one struct per section, layered defaults < TOML file < `PARLEY_*` environment
//! < flags. Every setting has a dotted name (`limits.send_rate`) that works in all three places:
//! `[limits] send_rate = 5` in the file, `PARLEY_LIMITS__SEND_RATE=5` in the environment and
//! `--set limits.send_rate=5` on the command line. [`SETTINGS`] documents each one for `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The whole configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to listen.
    pub server: ServerConfig,
    /// The durable log of a single node.
    pub store: StoreConfig,
    /// Who may connect.
    pub auth: AuthConfig,
    /// Sizes and rates that keep one client from hurting the rest.
    pub limits: LimitsConfig,
    /// Finding dead peers.
    pub heartbeat: HeartbeatConfig,
    /// What is kept and replayed.
    pub history: HistoryConfig,
    /// Join/leave announcements.
    pub presence: PresenceConfig,
    /// The server-side HTTP API under `/api`.
    pub api: ApiConfig,
    /// Cluster mode: the Redis servers shared by every node.
    pub redis: RedisConfig,
    /// The server's own log.
    pub log: LogConfig,
    /// Browser origins allowed to open sockets; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Signed HTTP callbacks to the app's backend, from the durable log.
    pub webhooks: WebhooksConfig,
    /// Per-room policies (`[[rooms]]`), matched in order by a glob on the room name; the
    /// first match wins and a room no section matches follows the top-level settings. Resolved
    /// per room by [`crate::policy::Policies`].
    pub rooms: Vec<RoomSection>,
}

/// One `[[rooms]]` section: a glob and the settings it overrides for the rooms it matches.
/// A field left out keeps the top-level value.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoomSection {
    /// The glob on the room name (`news.*`, `team-?`, `{a,b}-*`); `*` also matches `.` and `:`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Who may post: `members` (default) or `api` (only the HTTP API; a client `send` gets
    /// `error forbidden`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Publish>,
    /// `history.max_len` for these rooms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_max_len: Option<u64>,
    /// `history.ttl_s` for these rooms (0: no age limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_ttl_s: Option<u64>,
    /// Whether joins and leaves are sequenced and broadcast as `system` events (default true,
    /// and false wherever `presence` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<bool>,
    /// Whether members see who is in the room (`joined.users`); default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
    /// Whether members may send `typing` notices; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typing: Option<bool>,
}

/// Who may post in a room.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Publish {
    /// Its members, over the WebSocket, and the HTTP API.
    #[default]
    Members,
    /// The HTTP API only: members join and read.
    Api,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address. Loopback by default so a development node is never exposed by accident.
    /// A host name (`localhost:3000`) is resolved when the configuration is read.
    #[serde(deserialize_with = "bind_address")]
    pub bind: SocketAddr,
    /// How long shutdown waits for sockets to close before it stops waiting.
    pub shutdown_grace_ms: u64,
    /// Time a connection gets to send a complete request head, from its accept or from its
    /// previous response; past it the connection is closed.
    pub header_read_timeout_ms: u64,
    /// An HTTP connection (not upgraded) on which nothing was read or written this long is
    /// closed.
    pub http_idle_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 3000)),
            shutdown_grace_ms: 5000,
            header_read_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
        }
    }
}

/// What `server.bind` accepts, for error messages.
const BIND_FORMS: &str =
    "HOST:PORT, e.g. 127.0.0.1:3000, 0.0.0.0:3000, [::1]:3000 or localhost:3000";

/// `server.bind`: an IP address and port, or a host name and port resolved now (the first
/// address it resolves to).
fn bind_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    use std::net::ToSocketAddrs;
    let text = String::deserialize(d)?;
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = |why: &str| {
        serde::de::Error::custom(format!(
            "`{text}` is not a listen address ({why}); expected {BIND_FORMS}"
        ))
    };
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            let port: u16 = port.parse().expect("checked");
            match (host, port).to_socket_addrs() {
                Ok(mut addrs) => addrs
                    .next()
                    .ok_or_else(|| bad("the host name resolves to no address")),
                Err(_) => Err(bad("the host name does not resolve")),
            }
        }
        _ => Err(bad("no port, or an invalid one")),
    }
}

/// How hard SQLite works to keep a commit across a power cut.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit (group commit shares one fsync between every message of a batch):
    /// an ack survives a killed process and a power cut.
    Full,
    /// No fsync on commit in WAL mode: an ack survives a killed process, but a power cut may
    /// lose the last commits.
    Normal,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file; created when missing.
    pub db: PathBuf,
    /// SQLite's `synchronous` pragma in WAL mode.
    pub synchronous: Synchronous,
    /// Most events one group commit writes.
    pub max_batch: usize,
    /// How long the SQLite indexer gathers journaled group commits before it commits (settles)
    /// them in one transaction; each group commit is durable in the journal before its ack.
    pub settle_ms: u64,
    /// Most journaled records that may wait for SQLite; past it, writes are refused until
    /// SQLite takes them (a locked or failing database).
    pub max_unsettled: u64,
}

/// `store.settle_ms` by default.
pub const DEFAULT_SETTLE_MS: u64 = 1000;
/// `store.max_unsettled` by default.
pub const DEFAULT_MAX_UNSETTLED: u64 = 500_000;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            db: PathBuf::from("./parley.db"),
            synchronous: Synchronous::Full,
            max_batch: 1024,
            settle_ms: DEFAULT_SETTLE_MS,
            max_unsettled: DEFAULT_MAX_UNSETTLED,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret: jwt mode.
    pub jwt_secret: Option<String>,
    /// PEM public key file (RSA for RS256, EC P-256 for ES256): jwt mode.
    pub jwt_public_key: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway_s: u64,
    /// How long a connection may stay unauthenticated.
    pub timeout_ms: u64,
    /// Anonymous mode on a non-loopback address (development only).
    pub allow_anonymous: bool,
    /// Longest lifetime a token may have left: one whose `exp` lies further ahead is refused.
    pub max_token_ttl_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            jwt_public_key: None,
            issuer: None,
            audience: None,
            leeway_s: 0,
            timeout_ms: 5000,
            allow_anonymous: false,
            max_token_ttl_s: 31_536_000,
        }
    }
}

/// Slowest and fastest rate a `limits.*_rate` setting takes, per second.
pub const MIN_RATE: f64 = 0.001;
/// See [`MIN_RATE`].
pub const MAX_RATE: f64 = 1_000_000.0;

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest WebSocket frame or message accepted; bigger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// Largest message `content`; bigger gets `error too_large`.
    pub max_content_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Frames an outbound queue may hold before the connection is closed with 4009.
    pub outbound_queue_frames: usize,
    /// Bytes an outbound queue may hold before the connection is closed with 4009.
    pub outbound_queue_bytes: usize,
    /// How long a closing slow consumer gets to read its close frame.
    pub close_grace_ms: u64,
    /// Sends per second per connection (token bucket refill rate).
    pub send_rate: f64,
    /// Sends a connection may make at once (token bucket size).
    pub send_burst: u32,
    /// Joins and leaves per second per connection (one bucket for both).
    pub join_rate: f64,
    /// Joins and leaves a connection may make at once.
    pub join_burst: u32,
    /// Typing notices per second per connection; past it they are dropped silently.
    pub typing_rate: f64,
    /// Typing notices a connection may make at once.
    pub typing_burst: u32,
    /// Refusals within `abuse_window_ms` that close a connection with 4008.
    pub abuse_refusals: u32,
    /// The window for `abuse_refusals`.
    pub abuse_window_ms: u64,
    /// Open TCP connections per node; past it a new one gets HTTP 503 and is closed.
    pub max_connections: usize,
    /// Open TCP connections per client IP; past it a new one gets HTTP 429 and is closed.
    pub max_connections_per_ip: usize,
    /// Proxies whose last `X-Forwarded-For` entry is taken as the client IP.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: 64 * 1024,
            max_content_bytes: 4096,
            max_rooms_per_connection: 100,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 1024 * 1024,
            close_grace_ms: 2000,
            send_rate: 10.0,
            send_burst: 20,
            join_rate: 5.0,
            join_burst: 20,
            typing_rate: 20.0,
            typing_burst: 40,
            abuse_refusals: 50,
            abuse_window_ms: 10_000,
            max_connections: 100_000,
            max_connections_per_ip: 100,
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[heartbeat]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// How often the server sends a WebSocket ping.
    pub interval_ms: u64,
    /// A peer silent (no frame, no pong) this long is dropped.
    pub timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_ms: 25_000,
            timeout_ms: 60_000,
        }
    }
}

/// `[history]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Events sent in `joined` when the client gives no `since`.
    pub on_join: usize,
    /// Most events replayed in `joined` after `since`; past it `truncated` is true.
    pub max_replay: usize,
    /// Most bytes of events replayed in `joined` after `since` (at least one event); past it
    /// `truncated` is true. Bounds what one rejoin costs the log and the joiner's socket.
    pub max_replay_bytes: usize,
    /// Events kept per room; older ones are dropped.
    pub max_len: u64,
    /// Age in seconds after which events are dropped; 0 keeps them regardless of age.
    pub ttl_s: u64,
    /// Most bytes of one encoded `history` answer (WebSocket frame or HTTP body); past it the
    /// page holds fewer events (at least one) and `more` is true.
    pub max_page_bytes: usize,
    /// Seconds after which a room with no message and no member is forgotten (its head, its
    /// epoch, its join/leave events); joining it later starts a new epoch.
    pub empty_room_ttl_s: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            on_join: 50,
            max_replay: 1000,
            max_replay_bytes: 256 * 1024,
            max_len: 10_000,
            ttl_s: 0,
            max_page_bytes: 1024 * 1024,
            empty_room_ttl_s: 86_400,
        }
    }
}

/// `[presence]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Rooms with more people than this do not announce joins and leaves.
    pub announce_max: usize,
    /// Cluster mode: a node that stops refreshing its heartbeat this long is dead, and its
    /// users' presence is removed (their leaves announced by a surviving node).
    pub ttl_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            announce_max: 1000,
            ttl_ms: 30_000,
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URLs; empty: single-node mode (SQLite). Several shard rooms by a stable hash of
    /// the room name, so every node must list the same URLs in the same order. A single string
    /// is read as a comma-separated list (`PARLEY_REDIS__URLS=redis://a,redis://b`).
    #[serde(deserialize_with = "url_list")]
    pub urls: Vec<String>,
}

/// A list of URLs, or one string of comma-separated URLs (what an environment variable
/// holds). An empty string is an empty list.
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        One(String),
        Many(Vec<String>),
    }
    Ok(match List::deserialize(d)? {
        List::One(s) if s.trim().is_empty() => Vec::new(),
        List::One(s) => s.split(',').map(|u| u.trim().to_owned()).collect(),
        List::Many(urls) => urls,
    })
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `debug`, `parley=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The bearer key of `/api`. Without one the API is off (every `/api` route answers 404),
    /// so a node never exposes posting as any user by accident.
    pub key: Option<String>,
}

/// A room event a webhook can carry: the `webhooks.events` names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HookEvent {
    /// A chat message (`type: message`).
    Message,
    /// A `system` event with `event: join`.
    Join,
    /// A `system` event with `event: leave`.
    Leave,
}

/// `[webhooks]`: see docs/webhooks.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where events are POSTed; none turns webhooks off.
    pub url: Option<String>,
    /// The HMAC-SHA256 key of `Parley-Signature`; required with a URL, so a receiver can
    /// always tell parley from anyone else who knows the URL.
    pub secret: Option<String>,
    /// Which events are sent; the others still advance the cursor. A single string is read as
    /// a comma-separated list (`PARLEY_WEBHOOKS__EVENTS=message,join`).
    #[serde(deserialize_with = "event_list")]
    pub events: Vec<HookEvent>,
    /// Most log events in one POST (gap notices come on top).
    pub batch_max: usize,
    /// How long the receiver gets to answer a POST before it counts as failed and is retried.
    pub timeout_ms: u64,
    /// Glob patterns of the rooms whose events are sent; empty: every room. A single string
    /// is read as a comma-separated list.
    #[serde(deserialize_with = "url_list")]
    pub rooms: Vec<String>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: None,
            secret: None,
            events: vec![HookEvent::Message, HookEvent::Join, HookEvent::Leave],
            batch_max: 100,
            timeout_ms: 5000,
            rooms: Vec::new(),
        }
    }
}

/// `webhooks.events`: a list of names, or one string of comma-separated names.
fn event_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<HookEvent>, D::Error> {
    url_list(d)?
        .iter()
        .map(|name| match name.as_str() {
            "message" => Ok(HookEvent::Message),
            "join" => Ok(HookEvent::Join),
            "leave" => Ok(HookEvent::Leave),
            other => Err(serde::de::Error::custom(format!(
                "`{other}` is not a webhook event; expected message, join or leave"
            ))),
        })
        .collect()
}

/// Every setting: dotted name, default, meaning. `parley --help` prints it; a test checks that
/// it names every field of [`Config`].
pub const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "server.bind",
        "127.0.0.1:3000",
        "listen address (--bind, PARLEY_BIND)",
    ),
    (
        "server.shutdown_grace_ms",
        "5000",
        "how long shutdown waits for sockets to close",
    ),
    (
        "server.header_read_timeout_ms",
        "10000",
        "time to send a request head, from accept or the previous response; then closed",
    ),
    (
        "server.http_idle_timeout_ms",
        "60000",
        "an HTTP connection with nothing read or written this long is closed",
    ),
    (
        "log.format",
        "text",
        "text or json (text is coloured only on a terminal)",
    ),
    (
        "log.level",
        "info",
        "log filter, e.g. debug or parley=debug,info; RUST_LOG wins when set",
    ),
    (
        "store.db",
        "./parley.db",
        "SQLite log of a single node (--db, PARLEY_DB)",
    ),
    (
        "store.synchronous",
        "full",
        "full: an ack survives a power cut; normal: a killed process only",
    ),
    (
        "store.max_batch",
        "1024",
        "most events written by one group commit",
    ),
    (
        "store.settle_ms",
        "1000",
        "how long the SQLite indexer gathers journaled group commits before committing them",
    ),
    (
        "store.max_unsettled",
        "500000",
        "most journaled records waiting for SQLite before writes are refused",
    ),
    (
        "auth.jwt_secret",
        "none",
        "HS256 secret: jwt mode (--jwt-secret, PARLEY_JWT_SECRET)",
    ),
    (
        "auth.jwt_public_key",
        "none",
        "RS256/ES256 PEM public key file: jwt mode (--jwt-public-key)",
    ),
    ("auth.issuer", "none", "required `iss` claim"),
    ("auth.audience", "none", "required `aud` claim"),
    ("auth.leeway_s", "0", "clock skew tolerated on exp/nbf/iat"),
    (
        "auth.timeout_ms",
        "5000",
        "time allowed for the first-message `auth` frame",
    ),
    (
        "auth.allow_anonymous",
        "false",
        "anonymous mode on a non-loopback address (--allow-anonymous)",
    ),
    (
        "auth.max_token_ttl_s",
        "31536000",
        "tokens whose exp lies further ahead are refused",
    ),
    (
        "limits.max_frame_bytes",
        "65536",
        "largest frame; bigger closes with 1009",
    ),
    (
        "limits.max_content_bytes",
        "4096",
        "largest message content; bigger gets error too_large",
    ),
    (
        "limits.max_rooms_per_connection",
        "100",
        "rooms per connection; more gets error too_many_rooms",
    ),
    (
        "limits.outbound_queue_frames",
        "1024",
        "queued frames per connection before close 4009",
    ),
    (
        "limits.outbound_queue_bytes",
        "1048576",
        "queued bytes per connection before close 4009",
    ),
    (
        "limits.close_grace_ms",
        "2000",
        "time a closed slow consumer gets to read its close frame",
    ),
    (
        "limits.send_rate",
        "10",
        "sends per second per connection; past it error rate_limited",
    ),
    (
        "limits.send_burst",
        "20",
        "sends a connection may make at once",
    ),
    (
        "limits.join_rate",
        "5",
        "joins and leaves per second per connection; past it error rate_limited",
    ),
    (
        "limits.join_burst",
        "20",
        "joins and leaves a connection may make at once",
    ),
    (
        "limits.typing_rate",
        "20",
        "typing notices per second per connection; past it dropped",
    ),
    (
        "limits.typing_burst",
        "40",
        "typing notices a connection may make at once",
    ),
    (
        "limits.abuse_refusals",
        "50",
        "refusals within abuse_window_ms that close with 4008",
    ),
    (
        "limits.abuse_window_ms",
        "10000",
        "the window for abuse_refusals",
    ),
    (
        "limits.max_connections",
        "100000",
        "TCP connections per node (HTTP and WebSocket); past it HTTP 503 and closed",
    ),
    (
        "limits.max_connections_per_ip",
        "100",
        "TCP connections per client IP (HTTP and WebSocket); past it HTTP 429 and closed",
    ),
    (
        "limits.trusted_proxies",
        "[]",
        "proxy IPs whose last X-Forwarded-For entry is the client IP",
    ),
    ("heartbeat.interval_ms", "25000", "WebSocket ping interval"),
    (
        "heartbeat.timeout_ms",
        "60000",
        "silence after which a peer is dropped",
    ),
    (
        "history.on_join",
        "50",
        "events in `joined` without `since`",
    ),
    (
        "history.max_replay",
        "1000",
        "most events replayed after `since`",
    ),
    (
        "history.max_replay_bytes",
        "262144",
        "most bytes of events replayed after `since`",
    ),
    ("history.max_len", "10000", "events kept per room"),
    (
        "history.ttl_s",
        "0",
        "age limit of kept events in seconds (0: none)",
    ),
    (
        "history.max_page_bytes",
        "1048576",
        "most bytes of one `history` answer (at least one event)",
    ),
    (
        "history.empty_room_ttl_s",
        "86400",
        "a room with no message and no member is forgotten after this",
    ),
    (
        "presence.announce_max",
        "1000",
        "rooms with more people do not announce join/leave",
    ),
    (
        "presence.ttl_ms",
        "30000",
        "cluster: a node silent this long is dead; its users leave",
    ),
    (
        "redis.urls",
        "[]",
        "cluster mode: Redis URLs, sharded by room (--redis, PARLEY_REDIS_URL=a,b or PARLEY_REDIS__URLS=a,b)",
    ),
    (
        "api.key",
        "none",
        "bearer key of the HTTP API; none: /api answers 404 (--api-key, PARLEY_API_KEY)",
    ),
    (
        "allowed_origins",
        "[]",
        "browser Origins allowed to connect (PARLEY_ALLOWED_ORIGINS=a,b); empty: any",
    ),
    (
        "webhooks.url",
        "none",
        "POST every room event here (docs/webhooks.md); none: webhooks off",
    ),
    (
        "webhooks.secret",
        "none",
        "HMAC-SHA256 key of the Parley-Signature header; required with a url",
    ),
    (
        "webhooks.events",
        "[\"message\",\"join\",\"leave\"]",
        "which events are sent (message, join, leave)",
    ),
    ("webhooks.batch_max", "100", "most log events in one POST"),
    (
        "webhooks.timeout_ms",
        "5000",
        "time the receiver gets to answer; then retried",
    ),
    (
        "webhooks.rooms",
        "[]",
        "glob patterns of the rooms sent (e.g. news.*); empty: every room",
    ),
    (
        "rooms",
        "[]",
        "per-room policies: [[rooms]] match = \"news.*\", publish, history_max_len, history_ttl_s, announce, presence, typing (PARLEY_ROOMS)",
    ),
];

/// The settings table as text, for `--help`.
pub fn settings_help() -> String {
    let mut out = String::from(
        "Settings (TOML `[section] key = value`, env PARLEY_SECTION__KEY, or --set section.key=value):\n",
    );
    for (name, default, meaning) in SETTINGS {
        out.push_str(&format!("  {name:<34} {default:<16} {meaning}\n"));
    }
    out
}

/// Values given on the command line or through the flat `PARLEY_*` variables of the
/// "Running" table; each `Some` beats the environment and the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config` / `PARLEY_CONFIG`.
    pub config_file: Option<PathBuf>,
    /// Dotted name and value pairs, already typed as TOML values.
    pub values: Vec<(String, toml::Value)>,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer failed to parse or has an unknown or mistyped key.
    #[error("{}", describe_layer_error(.0))]
    Layer(Box<figment::Error>),
    /// `--set` without `=`.
    #[error("--set expects key=value, got `{0}`")]
    BadSet(String),
    /// The values parse but do not make sense together.
    #[error("{0}")]
    Invalid(String),
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(err: Box<figment::Error>) -> ConfigError {
        ConfigError::Layer(err)
    }
}

/// A figment error as an operator reads it: each problem names its setting by the dotted name
/// (`server.bind`, not `global.server.bind`) and where the value came from.
fn describe_layer_error(err: &figment::Error) -> String {
    let mut lines = Vec::new();
    for e in err.clone() {
        let name = e.path.join(".");
        // The overrides are anonymous (key, value) providers, named by their Rust type.
        let from = match e.metadata.as_ref().map(|m| m.name.as_ref()) {
            Some(name) if name.starts_with('(') => " (from the command line)".to_owned(),
            Some(name) => format!(" (from {name})"),
            None => String::new(),
        };
        lines.push(if name.is_empty() {
            format!("configuration: {}{from}", e.kind)
        } else {
            format!("setting {name}: {}{from}", e.kind)
        });
    }
    lines.join("\n")
}

/// Shortest HS256 secret accepted on a non-loopback address (RFC 7518 3.2: a key at least as
/// long as the hash output).
pub const MIN_SECRET_BYTES: usize = 32;

/// Longest duration a `*_ms` setting may take: a day. Far beyond any sensible timeout, and far
/// below what overflows a clock reading when added to it.
pub const MAX_MS: u64 = 86_400_000;
/// Largest `limits.max_frame_bytes`: 64 MiB.
pub const MAX_FRAME_BYTES: usize = 64 << 20;
/// Largest count a history setting may take (they become SQL `LIMIT`s and Redis ranges).
pub const MAX_HISTORY_COUNT: u64 = 1_000_000;
/// Longest `auth.max_token_ttl_s`: ten years.
pub const MAX_TOKEN_TTL_S: u64 = 10 * 366 * 86_400;

/// Checks that setting `name` lies in `min..=max` (in `unit`).
pub(crate) fn in_range(
    name: &str,
    value: u64,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let message = format!("{name} is {value}; it must be {min} to {max} {unit}");
    Err(ConfigError::Invalid(message.trim_end().to_owned()))
}

/// Parses `key=value` from `--set`: the value is read as TOML (numbers, booleans, arrays) and
/// falls back to a plain string.
pub fn parse_set(arg: &str) -> Result<(String, toml::Value), ConfigError> {
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadSet(arg.to_owned()))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    Ok((key.trim().to_owned(), value))
}

impl Config {
    /// Layers defaults, the TOML file, `PARLEY_SECTION__KEY` variables and the overrides, then
    /// checks the result.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(overrides, Env::prefixed("PARLEY_"))
    }

    /// [`Config::load`] with the environment layer read through `env` (tests use their own
    /// prefix).
    fn load_from(overrides: &Overrides, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &overrides.config_file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            // Filter before splitting: figment applies each step to the key the previous one
            // produced, and after `split` no key contains `__` any more. `PARLEY_ROOMS` is the
            // one top-level list of tables: `[{match="news.*",publish="api"}]`.
            env.filter(|key| {
                key.as_str().contains("__") || key.as_str().eq_ignore_ascii_case("rooms")
            })
            .split("__"),
        );
        for (key, value) in &overrides.values {
            figment = figment.merge((key.as_str(), value.clone()));
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work, or could make the server fail later: every
    /// duration, size and count has a range, named in the message with its unit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.auth.jwt_secret.is_some() && self.auth.jwt_public_key.is_some() {
            return invalid("set either auth.jwt_secret or auth.jwt_public_key, not both");
        }
        if self.auth.jwt_secret.as_deref() == Some("") {
            return invalid("auth.jwt_secret is empty");
        }
        for (name, value, min) in [
            ("server.shutdown_grace_ms", self.server.shutdown_grace_ms, 0),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
                1,
            ),
            (
                "server.http_idle_timeout_ms",
                self.server.http_idle_timeout_ms,
                1,
            ),
            ("auth.timeout_ms", self.auth.timeout_ms, 1),
            ("limits.close_grace_ms", self.limits.close_grace_ms, 0),
            ("limits.abuse_window_ms", self.limits.abuse_window_ms, 1),
            ("heartbeat.interval_ms", self.heartbeat.interval_ms, 1),
            ("heartbeat.timeout_ms", self.heartbeat.timeout_ms, 1),
            ("presence.ttl_ms", self.presence.ttl_ms, 1000),
        ] {
            in_range(name, value, min, MAX_MS, "milliseconds")?;
        }
        in_range("auth.leeway_s", self.auth.leeway_s, 0, 86_400, "seconds")?;
        in_range(
            "auth.max_token_ttl_s",
            self.auth.max_token_ttl_s,
            1,
            MAX_TOKEN_TTL_S,
            "seconds",
        )?;
        in_range(
            "history.ttl_s",
            self.history.ttl_s,
            0,
            MAX_TOKEN_TTL_S * 10,
            "seconds (0: no age limit)",
        )?;
        in_range(
            "limits.max_frame_bytes",
            self.limits.max_frame_bytes as u64,
            1024,
            MAX_FRAME_BYTES as u64,
            "bytes",
        )?;
        in_range(
            "limits.max_content_bytes",
            self.limits.max_content_bytes as u64,
            1,
            MAX_FRAME_BYTES as u64,
            "bytes",
        )?;
        for (name, value) in [
            (
                "limits.outbound_queue_frames",
                self.limits.outbound_queue_frames,
            ),
            (
                "limits.outbound_queue_bytes",
                self.limits.outbound_queue_bytes,
            ),
            (
                "limits.max_rooms_per_connection",
                self.limits.max_rooms_per_connection,
            ),
            ("limits.max_connections", self.limits.max_connections),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip,
            ),
            ("store.max_batch", self.store.max_batch),
        ] {
            in_range(name, value as u64, 1, u32::MAX as u64, "")?;
        }
        in_range("store.settle_ms", self.store.settle_ms, 1, 600_000, "ms")?;
        in_range(
            "store.max_unsettled",
            self.store.max_unsettled,
            1,
            u32::MAX as u64,
            "",
        )?;
        for (name, value, min) in [
            ("history.on_join", self.history.on_join as u64, 0),
            ("history.max_replay", self.history.max_replay as u64, 1),
            (
                "history.max_replay_bytes",
                self.history.max_replay_bytes as u64,
                1,
            ),
            ("history.max_len", self.history.max_len, 1),
        ] {
            let max = if name == "history.max_replay_bytes" {
                u32::MAX as u64
            } else {
                MAX_HISTORY_COUNT
            };
            in_range(name, value, min, max, "")?;
        }
        for (name, rate) in [
            ("limits.send_rate", self.limits.send_rate),
            ("limits.join_rate", self.limits.join_rate),
            ("limits.typing_rate", self.limits.typing_rate),
        ] {
            // A token bucket's period is 1/rate: past a million a second it rounds to nothing.
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(ConfigError::Invalid(format!(
                    "{name} is {rate}; it must be {MIN_RATE} to {MAX_RATE} per second"
                )));
            }
        }
        if self.history.max_page_bytes < 1024 {
            return invalid("history.max_page_bytes must be at least 1024");
        }
        if self.history.empty_room_ttl_s == 0 {
            return invalid("history.empty_room_ttl_s must be positive");
        }
        if self.api.key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return invalid("api.key is empty; leave it unset to turn the HTTP API off");
        }
        if self.redis.urls.iter().any(|u| u.trim().is_empty()) {
            return invalid("redis.urls has an empty URL");
        }
        self.validate_webhooks()?;
        crate::policy::Policies::from_config(self)?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::Invalid(format!(
                "log.level `{}` is not a log filter; use error, warn, info, debug or trace, \
                 optionally per module (parley=debug,info)",
                self.log.level
            )));
        }
        Ok(())
    }

    /// `[webhooks]`: a URL that a client can POST to, a secret with it, sane sizes, patterns
    /// that compile.
    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let hooks = &self.webhooks;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        in_range(
            "webhooks.batch_max",
            hooks.batch_max as u64,
            1,
            10_000,
            "events",
        )?;
        in_range(
            "webhooks.timeout_ms",
            hooks.timeout_ms,
            1,
            MAX_MS,
            "milliseconds",
        )?;
        for pattern in &hooks.rooms {
            if let Err(e) = globset::Glob::new(pattern) {
                return invalid(format!(
                    "webhooks.rooms: `{pattern}` is not a glob pattern: {e}"
                ));
            }
        }
        let Some(url) = &hooks.url else {
            return Ok(());
        };
        if hooks.events.is_empty() {
            return invalid(
                "webhooks.events is empty; name at least one of message, join, leave".to_owned(),
            );
        }
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => {
                return invalid(format!(
                    "webhooks.url `{url}` is not an http:// or https:// URL"
                ))
            }
        }
        if hooks.secret.as_deref().is_none_or(str::is_empty) {
            return invalid(
                "webhooks.secret is required when webhooks.url is set (it signs every POST)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// Whether the node authenticates with JWTs (otherwise it is in anonymous mode).
    pub fn jwt_mode(&self) -> bool {
        self.auth.jwt_secret.is_some() || self.auth.jwt_public_key.is_some()
    }

    /// Refuses an HS256 secret shorter than [`MIN_SECRET_BYTES`] on a non-loopback address
    /// (anyone who can try tokens offline could guess it); on loopback it is only warned about,
    /// which `Ok(Some(warning))` carries.
    pub fn check_secret_bind(&self, bound: SocketAddr) -> Result<Option<String>, ConfigError> {
        let Some(secret) = &self.auth.jwt_secret else {
            return Ok(None);
        };
        if secret.len() >= MIN_SECRET_BYTES {
            return Ok(None);
        }
        let problem = format!(
            "auth.jwt_secret is {} bytes; an HS256 secret needs at least {MIN_SECRET_BYTES} \
             random bytes (e.g. `openssl rand -base64 48`)",
            secret.len()
        );
        if bound.ip().is_loopback() {
            Ok(Some(format!(
                "{problem}; accepted only because {bound} is a loopback address"
            )))
        } else {
            Err(ConfigError::Invalid(format!(
                "refusing to start: {problem}, and {bound} is not a loopback address."
            )))
        }
    }

    /// Refuses anonymous mode on a non-loopback address unless the operator asked for it.
    pub fn check_anonymous_bind(&self, bound: SocketAddr) -> Result<(), ConfigError> {
        if self.jwt_mode() || bound.ip().is_loopback() || self.auth.allow_anonymous {
            return Ok(());
        }
        Err(ConfigError::Invalid(format!(
            "refusing to start: no JWT key is configured, so parley would run in anonymous mode \
             (anyone may connect as any user), and {bound} is not a loopback address. Configure \
             --jwt-secret or --jwt-public-key, bind to 127.0.0.1, or pass --allow-anonymous if \
             you really mean it."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn settings_table_names_every_field() {
        let value = toml::Value::try_from(Config::default()).unwrap();
        let mut names = Vec::new();
        for (section, v) in value.as_table().unwrap() {
            match v.as_table() {
                Some(table) => names.extend(table.keys().map(|k| format!("{section}.{k}"))),
                None => names.push(section.clone()),
            }
        }
        // Optional settings are absent from the serialized defaults; add them by hand.
        for name in [
            "auth.jwt_secret",
            "auth.jwt_public_key",
            "auth.issuer",
            "auth.audience",
            "api.key",
            "webhooks.url",
            "webhooks.secret",
        ] {
            names.push(name.to_owned());
        }
        for name in &names {
            assert!(
                SETTINGS.iter().any(|(n, _, _)| n == name),
                "{name} is not in SETTINGS"
            );
        }
        assert_eq!(
            names.len(),
            SETTINGS.len(),
            "SETTINGS names something that is not a field"
        );
    }

    /// `PARLEY_REDIS__URLS="redis://a,redis://b"` is the list of shards, like `--redis a,b`.
    /// The variables carry a prefix of this test's own, so no other test sees them.
    #[test]
    fn redis_urls_from_the_environment_are_a_comma_list() {
        let load = |value: &str| {
            let prefix = "PARLEYTEST_REDIS_URLS_";
            std::env::set_var(format!("{prefix}REDIS__URLS"), value);
            let config = Config::load_from(&Overrides::default(), Env::prefixed(prefix));
            std::env::remove_var(format!("{prefix}REDIS__URLS"));
            config
        };
        assert_eq!(
            load("redis://a:6379,redis://b:6380/2").unwrap().redis.urls,
            ["redis://a:6379", "redis://b:6380/2"]
        );
        assert_eq!(
            load("redis://127.0.0.1:6379").unwrap().redis.urls,
            ["redis://127.0.0.1:6379"]
        );
        assert_eq!(
            load(" redis://a , redis://b ").unwrap().redis.urls,
            ["redis://a", "redis://b"]
        );
        assert_eq!(
            load(r#"["redis://a", "redis://b"]"#).unwrap().redis.urls,
            ["redis://a", "redis://b"]
        );
        assert!(load("").unwrap().redis.urls.is_empty(), "empty: one node");
        assert!(
            matches!(load("redis://a,,redis://b"), Err(ConfigError::Invalid(_))),
            "an empty entry is refused"
        );
        // The TOML file and --set take a list, or the same comma string.
        let set = |value: toml::Value| {
            Config::load_from(
                &Overrides {
                    config_file: None,
                    values: vec![("redis.urls".to_owned(), value)],
                },
                Env::prefixed("PARLEYTEST_NOTHING_"),
            )
            .unwrap()
            .redis
            .urls
        };
        assert_eq!(
            set(toml::Value::Array(vec!["redis://a".into()])),
            ["redis://a"]
        );
        assert_eq!(
            set("redis://a,redis://b".into()),
            ["redis://a", "redis://b"]
        );
    }

    /// `[[rooms]]` from the TOML file, `PARLEY_ROOMS` and `--set rooms=[...]`; an unknown field
    /// in a section is refused naming it.
    #[test]
    fn rooms_sections_come_from_every_layer() {
        let dir = tempfile_dir("rooms");
        let file = dir.join("parley.toml");
        std::fs::write(
            &file,
            "[history]\nmax_len = 50\n\n[[rooms]]\nmatch = \"news.*\"\npublish = \"api\"\n\n\
             [[rooms]]\nmatch = \"quiet-*\"\nannounce = false\nhistory_ttl_s = 60\n",
        )
        .unwrap();
        let config = Config::load_from(
            &Overrides {
                config_file: Some(file.clone()),
                values: Vec::new(),
            },
            Env::prefixed("PARLEYTEST_NOTHING_"),
        )
        .unwrap();
        assert_eq!(config.rooms.len(), 2);
        assert_eq!(config.rooms[0].publish, Some(Publish::Api));
        assert_eq!(config.rooms[1].announce, Some(false));
        let policies = crate::policy::Policies::from_config(&config).unwrap();
        let quiet = policies.for_room("quiet-1");
        assert_eq!((quiet.history_max_len, quiet.history_ttl_s), (50, 60));

        let prefix = "PARLEYTEST_ROOMS_ENV_";
        std::env::set_var(
            format!("{prefix}ROOMS"),
            r#"[{match="calm-*",typing=false}]"#,
        );
        let from_env = Config::load_from(&Overrides::default(), Env::prefixed(prefix));
        std::env::remove_var(format!("{prefix}ROOMS"));
        let from_env = from_env.unwrap();
        assert_eq!(from_env.rooms[0].pattern, "calm-*");
        assert_eq!(from_env.rooms[0].typing, Some(false));

        let set = parse_set(r#"rooms=[{match="a*", history_max_len=5}]"#).unwrap();
        let config = Config::load_from(
            &Overrides {
                config_file: None,
                values: vec![set],
            },
            Env::prefixed("PARLEYTEST_NOTHING_"),
        )
        .unwrap();
        assert_eq!(config.rooms[0].history_max_len, Some(5));

        std::fs::write(&file, "[[rooms]]\nmatch = \"x\"\npublsh = \"api\"\n").unwrap();
        let err = Config::load_from(
            &Overrides {
                config_file: Some(file),
                values: Vec::new(),
            },
            Env::prefixed("PARLEYTEST_NOTHING_"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("publsh"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("parley-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn absurd_rates_are_refused_at_start_naming_the_setting() {
        for (key, value) in [
            ("limits.send_rate", "1000000000000"),
            ("limits.join_rate", "0"),
            ("limits.typing_rate", "-1"),
        ] {
            let err = Config::load(&Overrides {
                config_file: None,
                values: vec![parse_set(&format!("{key}={value}")).unwrap()],
            })
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(key) && err.contains("per second"),
                "{key}: {err}"
            );
        }
        // The fastest accepted rate builds its bucket without panicking.
        crate::limits::Bucket::new(MAX_RATE, 1).take().unwrap();
        crate::limits::Bucket::new(MIN_RATE, 1).take().unwrap();
    }

    fn load_with(values: &[(&str, toml::Value)]) -> Result<Config, ConfigError> {
        Config::load_from(
            &Overrides {
                config_file: None,
                values: values
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            },
            Env::prefixed("PARLEYTEST_NOTHING_"),
        )
    }

    #[test]
    fn bind_takes_host_names_and_says_what_it_takes() {
        let config = load_with(&[("server.bind", "localhost:3456".into())]).unwrap();
        assert_eq!(config.server.bind.port(), 3456);
        assert!(config.server.bind.ip().is_loopback());
        for bad in [
            "localhost",
            "3000",
            "x:y",
            ":3000",
            "no-such-host.invalid:3000",
        ] {
            let err = load_with(&[("server.bind", bad.into())])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("setting server.bind: ") && err.contains("HOST:PORT"),
                "{bad}: {err}"
            );
            assert!(!err.contains("global."), "{err}");
        }
    }

    /// Nothing accepted at start can panic later: every duration, size and count has a range,
    /// and a value outside it is refused naming the setting and its unit.
    #[test]
    fn every_setting_is_bounded_at_start() {
        let huge = toml::Value::Integer(i64::MAX);
        for key in [
            "server.shutdown_grace_ms",
            "server.header_read_timeout_ms",
            "server.http_idle_timeout_ms",
            "auth.timeout_ms",
            "limits.close_grace_ms",
            "limits.abuse_window_ms",
            "heartbeat.interval_ms",
            "heartbeat.timeout_ms",
            "presence.ttl_ms",
        ] {
            let err = load_with(&[(key, huge.clone())]).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("milliseconds"),
                "{key}: {err}"
            );
        }
        for key in [
            "server.header_read_timeout_ms",
            "server.http_idle_timeout_ms",
            "auth.timeout_ms",
            "heartbeat.interval_ms",
            "heartbeat.timeout_ms",
            "limits.max_connections",
            "limits.max_connections_per_ip",
            "limits.outbound_queue_frames",
            "limits.max_content_bytes",
            "history.max_len",
            "history.max_replay",
            "store.max_batch",
            "store.settle_ms",
            "store.max_unsettled",
            "auth.max_token_ttl_s",
        ] {
            let err = load_with(&[(key, 0.into())]).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        for (key, value, unit) in [
            ("limits.max_frame_bytes", 1i64 << 40, "bytes"),
            ("limits.max_content_bytes", 1i64 << 40, "bytes"),
            ("auth.leeway_s", i64::MAX, "seconds"),
            ("auth.max_token_ttl_s", i64::MAX, "seconds"),
            ("history.ttl_s", i64::MAX, "seconds"),
            ("history.on_join", i64::MAX, "to"),
        ] {
            let err = load_with(&[(key, value.into())]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(unit), "{key}: {err}");
        }
        let err = load_with(&[("log.level", "very-loud=[".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level"), "{err}");
        let err = load_with(&[("log.format", "xml".into())])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("setting log.format"), "{err}");
        // The largest accepted durations still make deadlines.
        let max = Duration::from_millis(MAX_MS);
        let _ = tokio::time::Instant::now() + max + max;
        let _ = std::time::Instant::now() + max + max;
    }

    #[test]
    fn short_secrets_are_refused_off_loopback_only() {
        let short = load_with(&[("auth.jwt_secret", "change-me".into())]).unwrap();
        let public: SocketAddr = "0.0.0.0:3000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let err = short.check_secret_bind(public).unwrap_err().to_string();
        assert!(err.contains("auth.jwt_secret is 9 bytes"), "{err}");
        let warning = short.check_secret_bind(local).unwrap().expect("a warning");
        assert!(warning.contains("at least 32"), "{warning}");
        let long = load_with(&[("auth.jwt_secret", "x".repeat(32).into())]).unwrap();
        assert!(long.check_secret_bind(public).unwrap().is_none());
    }

    #[test]
    fn set_values_are_typed() {
        assert_eq!(
            parse_set("limits.send_rate=5").unwrap().1,
            toml::Value::Integer(5)
        );
        assert_eq!(
            parse_set("auth.issuer=me").unwrap().1,
            toml::Value::String("me".into())
        );
        assert!(parse_set("nokey").is_err());
    }
}
