//! One POST to the receiver: the body signed with `Parley-Signature`, and what its answer
//! means for the deliverer (delivered, or retry, and when).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Parley-Signature";

/// Longest `Retry-After` honoured: a receiver cannot park a room for longer than this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, the Stripe-style scheme: the
/// receiver recomputes it and rejects old `t` (replays).
pub fn signature(secret: &str, unix_seconds: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_seconds},v1={hex}")
}

/// How a POST ended: the `result` label of `parley_webhook_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A 2xx answer: delivered.
    Delivered,
    /// No answer within `webhooks.timeout_ms`.
    Timeout,
    /// 429 Too Many Requests (waits for `Retry-After` when given).
    Throttled,
    /// Any other status (5xx, 4xx, 3xx).
    Refused,
    /// No connection, or it broke (refused, reset, DNS).
    Unreachable,
}

impl Outcome {
    /// Every outcome, so each series exists from the start.
    pub const ALL: [Outcome; 5] = [
        Outcome::Delivered,
        Outcome::Timeout,
        Outcome::Throttled,
        Outcome::Refused,
        Outcome::Unreachable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Timeout => "timeout",
            Outcome::Throttled => "throttled",
            Outcome::Refused => "http_error",
            Outcome::Unreachable => "unreachable",
        }
    }
}

/// A POST's outcome, and for a 429 the wait its `Retry-After` asks for.
pub struct Answer {
    /// What happened.
    pub outcome: Outcome,
    /// `Retry-After` of a 429, in seconds or as an HTTP date.
    pub retry_after: Option<Duration>,
    /// The status, or the error, for the log.
    pub detail: String,
}

/// Sends `body` to `url`, signed with `secret`.
pub async fn send(client: &reqwest::Client, url: &str, secret: &str, body: String) -> Answer {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let signed = signature(secret, now, &body);
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signed)
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            let outcome = if e.is_timeout() {
                Outcome::Timeout
            } else {
                Outcome::Unreachable
            };
            // Without the URL: it may carry a credential (a token in its query).
            return Answer {
                outcome,
                retry_after: None,
                detail: e.without_url().to_string(),
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // The body is read (and dropped) within the timeout, so the connection can be reused.
    let read = response.bytes().await;
    let outcome = if status.is_success() {
        match read {
            Ok(_) => Outcome::Delivered,
            // The answer was cut: the receiver may not have committed; send again.
            Err(e) if e.is_timeout() => Outcome::Timeout,
            Err(_) => Outcome::Unreachable,
        }
    } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Outcome::Throttled
    } else {
        Outcome::Refused
    };
    Answer {
        outcome,
        retry_after: retry_after.filter(|_| outcome == Outcome::Throttled),
        detail: status.to_string(),
    }
}

/// `Retry-After`: delay seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_rfc3339_weak(value)
            .ok()
            .or_else(|| httpdate(value))?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP dates take.
fn httpdate(value: &str) -> Option<SystemTime> {
    let mut parts = value.split_whitespace();
    let (_, day, month, year, time) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? + 1;
    let text = format!("{year}-{month:02}-{day:0>2}T{time}Z");
    humantime::parse_rfc3339(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_t_dot_body() {
        // printf '1700000000.{"events":[]}' | openssl dgst -sha256 -hmac secret
        let sig = signature("secret", 1_700_000_000, "{\"events\":[]}");
        assert_eq!(
            sig,
            "t=1700000000,v1=3947de27ec923573170fccda604ddfb25583ff98dc51e96cca2e11c59545026a"
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
