//! The room-name rule: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`.

/// Longest room name, in bytes (all allowed characters are ASCII).
pub const MAX_ROOM_NAME: usize = 64;

/// Whether `name` is a valid room name. Names are ASCII so they are safe in URLs, Redis keys
/// and log lines without escaping.
pub fn valid_room_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.len() <= MAX_ROOM_NAME
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::valid_room_name;

    #[test]
    fn room_names() {
        for ok in ["a", "general", "team-1", "a.b:c_d", &"x".repeat(64)] {
            assert!(valid_room_name(ok), "{ok} should be valid");
        }
        for bad in ["", "-a", "_a", "a b", "é", "a/b", &"x".repeat(65)] {
            assert!(!valid_room_name(bad), "{bad} should be invalid");
        }
    }
}
