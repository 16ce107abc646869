//! Per-room policies: what the `[[rooms]]` sections of the configuration make of one room.
//! The sections are globs on the room name, tried in order; the first that matches gives the
//! room its settings, each field it leaves out falling back to the top-level ones, and a room
//! no section matches follows the top-level settings alone. [`Policies`] is built once from the
//! configuration (and refuses a bad one at start); [`Policies::for_room`] resolves a room to a
//! small `Copy` [`RoomPolicy`] that the session, the HTTP API and both brokers read.
//!
//! The derived rules live here and nowhere else: a room without presence announces nothing
//! (`announce = true` with `presence = false` is refused), and a room only the API posts to
//! takes no typing notices.

use globset::{GlobBuilder, GlobMatcher};
use parley_protocol::server::RoomRules;

use crate::config::{in_range, Config, ConfigError, Publish, MAX_HISTORY_COUNT, MAX_TOKEN_TTL_S};

/// What applies in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomPolicy {
    /// Who may post: with [`Publish::Api`] a client `send` is `error forbidden`.
    pub publish: Publish,
    /// Events kept (`history.max_len` for this room).
    pub history_max_len: u64,
    /// Age limit of kept events in seconds, 0 for none (`history.ttl_s` for this room).
    pub history_ttl_s: u64,
    /// Joins and leaves are sequenced and broadcast as `system` events (while the room has at
    /// most `presence.announce_max` people).
    pub announce: bool,
    /// Members are told who is in the room (`joined.users`).
    pub presence: bool,
    /// Members may send `typing` notices.
    pub typing: bool,
}

impl RoomPolicy {
    /// `presence.announce_max` as it applies to this room's join/leave events: 0 (announce
    /// nothing) when the room does not announce.
    pub fn announce_max(&self, configured: usize) -> usize {
        if self.announce {
            configured
        } else {
            0
        }
    }

    /// Most people for whom `joined` lists `users`: `presence.announce_max`, or 0 (never)
    /// when the room has no presence.
    pub fn users_max(&self, configured: usize) -> usize {
        if self.presence {
            configured
        } else {
            0
        }
    }

    /// What `joined` tells the client: the fields that depart from the defaults.
    pub fn rules(&self) -> RoomRules {
        RoomRules {
            publish: (self.publish == Publish::Api).then_some("api"),
            announce: (!self.announce).then_some(false),
            presence: (!self.presence).then_some(false),
            typing: (!self.typing).then_some(false),
        }
    }
}

/// Every room's policy, from the configuration.
#[derive(Debug, Clone)]
pub struct Policies {
    /// The top-level settings: rooms no section matches.
    default: RoomPolicy,
    /// The `[[rooms]]` sections in order, each resolved against the default.
    sections: Vec<(GlobMatcher, RoomPolicy)>,
}

impl Policies {
    /// Resolves `config.rooms` against the top-level settings; refuses a bad glob, a value out
    /// of range or a contradiction, naming the section (`rooms[1].history_max_len`).
    pub fn from_config(config: &Config) -> Result<Policies, ConfigError> {
        let default = RoomPolicy {
            publish: Publish::Members,
            history_max_len: config.history.max_len,
            history_ttl_s: config.history.ttl_s,
            announce: true,
            presence: true,
            typing: true,
        };
        let mut sections = Vec::with_capacity(config.rooms.len());
        for (i, section) in config.rooms.iter().enumerate() {
            let name = |field: &str| format!("rooms[{i}].{field}");
            if section.pattern.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{} is empty; give a glob on the room name, e.g. \"news.*\"",
                    name("match")
                )));
            }
            let matcher = GlobBuilder::new(&section.pattern)
                .literal_separator(false)
                .build()
                .map_err(|e| ConfigError::Invalid(format!("{} is not a glob: {e}", name("match"))))?
                .compile_matcher();
            let presence = section.presence.unwrap_or(default.presence);
            if !presence && section.announce == Some(true) {
                return Err(ConfigError::Invalid(format!(
                    "{} is true but {} is false: join/leave events would show who is in the \
                     room; leave announce out",
                    name("announce"),
                    name("presence")
                )));
            }
            let publish = section.publish.unwrap_or(default.publish);
            let policy = RoomPolicy {
                publish,
                history_max_len: section.history_max_len.unwrap_or(default.history_max_len),
                history_ttl_s: section.history_ttl_s.unwrap_or(default.history_ttl_s),
                announce: presence && section.announce.unwrap_or(default.announce),
                presence,
                typing: publish == Publish::Members && section.typing.unwrap_or(default.typing),
            };
            in_range(
                &name("history_max_len"),
                policy.history_max_len,
                1,
                MAX_HISTORY_COUNT,
                "",
            )?;
            in_range(
                &name("history_ttl_s"),
                policy.history_ttl_s,
                0,
                MAX_TOKEN_TTL_S * 10,
                "seconds (0: no age limit)",
            )?;
            sections.push((matcher, policy));
        }
        Ok(Policies { default, sections })
    }

    /// The policy of `room`: the first section whose glob matches it, else the default.
    pub fn for_room(&self, room: &str) -> RoomPolicy {
        self.sections
            .iter()
            .find(|(glob, _)| glob.is_match(room))
            .map_or(self.default, |(_, policy)| *policy)
    }

    /// Every age limit some room has (the distinct positive `history_ttl_s`), for a store that
    /// sweeps expired events one age limit at a time.
    pub fn ttls(&self) -> Vec<u64> {
        let mut ttls: Vec<u64> = std::iter::once(&self.default)
            .chain(self.sections.iter().map(|(_, p)| p))
            .map(|p| p.history_ttl_s)
            .filter(|&t| t > 0)
            .collect();
        ttls.sort_unstable();
        ttls.dedup();
        ttls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomSection;

    fn section(pattern: &str) -> RoomSection {
        RoomSection {
            pattern: pattern.to_owned(),
            ..RoomSection::default()
        }
    }

    #[test]
    fn the_first_matching_section_wins_and_the_rest_is_the_default() {
        let mut config = Config::default();
        config.history.max_len = 500;
        config.rooms = vec![
            RoomSection {
                publish: Some(Publish::Api),
                ..section("news.*")
            },
            RoomSection {
                history_max_len: Some(10),
                presence: Some(false),
                ..section("news.*")
            },
            RoomSection {
                history_ttl_s: Some(60),
                typing: Some(false),
                ..section("{quiet,calm}-?")
            },
        ];
        let policies = Policies::from_config(&config).unwrap();
        let news = policies.for_room("news.today");
        assert_eq!(news.publish, Publish::Api);
        assert_eq!(news.history_max_len, 500, "only the first match applies");
        assert!(news.presence && news.announce && !news.typing);
        let quiet = policies.for_room("quiet-1");
        assert_eq!((quiet.history_ttl_s, quiet.typing), (60, false));
        assert_eq!(quiet.publish, Publish::Members);
        assert_eq!(policies.for_room("quiet-10"), policies.for_room("general"));
        assert_eq!(policies.for_room("newsroom").publish, Publish::Members);
        assert_eq!(policies.ttls(), [60]);
        assert_eq!(
            serde_json::to_string(&news.rules()).unwrap(),
            r#"{"publish":"api","typing":false}"#
        );
        assert_eq!(
            serde_json::to_string(&policies.for_room("general").rules()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn no_presence_means_no_announcements() {
        let mut config = Config {
            rooms: vec![RoomSection {
                presence: Some(false),
                ..section("*")
            }],
            ..Config::default()
        };
        let policy = Policies::from_config(&config).unwrap().for_room("r");
        assert!(!policy.announce && !policy.presence);
        assert_eq!((policy.announce_max(1000), policy.users_max(1000)), (0, 0));
        config.rooms[0].announce = Some(true);
        let err = Policies::from_config(&config).unwrap_err().to_string();
        assert!(err.contains("rooms[0].announce"), "{err}");
    }

    #[test]
    fn bad_sections_are_refused_naming_them() {
        for (bad, names) in [
            (section(""), "rooms[0].match"),
            (section("a[b"), "rooms[0].match"),
            (
                RoomSection {
                    history_max_len: Some(0),
                    ..section("x")
                },
                "rooms[0].history_max_len",
            ),
            (
                RoomSection {
                    history_ttl_s: Some(u64::MAX),
                    ..section("x")
                },
                "rooms[0].history_ttl_s",
            ),
        ] {
            let config = Config {
                rooms: vec![bad],
                ..Config::default()
            };
            let err = Policies::from_config(&config).unwrap_err().to_string();
            assert!(err.contains(names), "{err}");
        }
    }
}
