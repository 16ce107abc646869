//! Single-node presence: connection counts per user per room, in memory.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Presence, PresenceChange, PresenceError};

/// Connections per user in one room.
type RoomUsers = HashMap<Arc<str>, u32>;

/// Presence for one process.
#[derive(Default)]
pub struct MemoryPresence {
    rooms: Mutex<HashMap<Arc<str>, RoomUsers>>,
}

impl MemoryPresence {
    /// One more connection of `user` in `room`; `transition` when it is the user's first.
    pub fn add(&self, room: &str, user: &Arc<str>) -> PresenceChange {
        let mut rooms = self.rooms.lock().expect("presence lock");
        let users = match rooms.get_mut(room) {
            Some(users) => users,
            None => rooms.entry(Arc::from(room)).or_default(),
        };
        let count = users.entry(user.clone()).or_insert(0);
        *count += 1;
        PresenceChange {
            transition: *count == 1,
            users: users.len(),
        }
    }

    /// Every room that has anyone in it, as of now.
    pub fn occupied_rooms(&self) -> HashSet<Arc<str>> {
        self.rooms
            .lock()
            .expect("presence lock")
            .keys()
            .cloned()
            .collect()
    }

    /// One connection of `user` fewer in `room`; `transition` when it was the user's last.
    pub fn remove(&self, room: &str, user: &str) -> PresenceChange {
        let mut rooms = self.rooms.lock().expect("presence lock");
        let Some(users) = rooms.get_mut(room) else {
            return PresenceChange {
                transition: false,
                users: 0,
            };
        };
        let mut transition = false;
        if let Some(count) = users.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                users.remove(user);
                transition = true;
            }
        }
        let left = users.len();
        if left == 0 {
            rooms.remove(room);
        }
        PresenceChange {
            transition,
            users: left,
        }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn users(&self, room: &str) -> Result<Vec<Arc<str>>, PresenceError> {
        let rooms = self.rooms.lock().expect("presence lock");
        let mut users: Vec<Arc<str>> = rooms
            .get(room)
            .map(|u| u.keys().cloned().collect())
            .unwrap_or_default();
        users.sort();
        Ok(users)
    }

    async fn rooms(&self) -> Result<Vec<(Arc<str>, usize)>, PresenceError> {
        let rooms = self.rooms.lock().expect("presence lock");
        let mut counts: Vec<(Arc<str>, usize)> = rooms
            .iter()
            .map(|(room, users)| (room.clone(), users.len()))
            .collect();
        drop(rooms);
        counts.sort();
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_tabs_are_one_user() {
        let p = MemoryPresence::default();
        let alice: Arc<str> = "alice".into();
        assert_eq!(
            p.add("r", &alice),
            PresenceChange {
                transition: true,
                users: 1
            }
        );
        assert_eq!(
            p.add("r", &alice),
            PresenceChange {
                transition: false,
                users: 1
            }
        );
        assert_eq!(
            p.remove("r", "alice"),
            PresenceChange {
                transition: false,
                users: 1
            }
        );
        assert_eq!(
            p.remove("r", "alice"),
            PresenceChange {
                transition: true,
                users: 0
            }
        );
        assert!(p.users("r").await.unwrap().is_empty());
        assert!(p.rooms().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn rooms_count_people() {
        let p = MemoryPresence::default();
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        p.add("b", &alice);
        p.add("b", &alice);
        p.add("b", &bob);
        p.add("a", &bob);
        assert_eq!(
            p.rooms().await.unwrap(),
            vec![("a".into(), 1), ("b".into(), 2)]
        );
    }
}
