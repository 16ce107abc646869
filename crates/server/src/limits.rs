//! Limits that keep one client from hurting the rest: per-connection token buckets for `send`
//! and `typing` (governor's GCRA), the abuse counter that ends a connection which keeps being
//! refused, and the per-IP and per-node connection caps every accepted TCP connection takes a
//! place under.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, bursts of `burst`. Every connection holds two, so
/// they use the monotonic clock, which takes no space (40 bytes each instead of 72).
pub struct Bucket {
    limiter:
        RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>,
}

impl Bucket {
    /// A full bucket. `rate` must be positive; `burst` is at least 1.
    pub fn new(rate: f64, burst: u32) -> Bucket {
        let period = Duration::from_secs_f64(1.0 / rate);
        let burst = NonZeroU32::new(burst.max(1)).expect("burst >= 1");
        let quota = Quota::with_period(period)
            .expect("positive period")
            .allow_burst(burst);
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota, MonotonicClock),
        }
    }

    /// Takes a token, or says how long until one is available. A refusal takes nothing.
    pub fn take(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// Counts refusals in a sliding window; the `max`-th within `window` means abuse. Every
/// connection holds one, so the limits are the caller's (the node's settings) and the times are
/// allocated only for a connection that has been refused: 8 bytes inline.
#[derive(Default)]
pub struct AbuseCounter {
    /// Boxed: 8 bytes in every connection instead of a `VecDeque`'s 32.
    #[allow(clippy::box_collection)]
    recent: Option<Box<VecDeque<Instant>>>,
}

impl AbuseCounter {
    /// Records a refusal; true when it is the `max`-th within `window`.
    pub fn refuse(&mut self, max: u32, window: Duration) -> bool {
        let now = Instant::now();
        let recent = self.recent.get_or_insert_with(Box::default);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        recent.len() >= max.max(1) as usize
    }
}

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CapRefusal {
    /// `limits.max_connections_per_ip` reached (HTTP 429).
    PerIp,
    /// `limits.max_connections` reached (HTTP 503).
    Node,
}

/// Open TCP connections (plain HTTP and WebSocket alike), per client IP and for the whole node.
pub struct ConnectionCaps {
    per_ip: usize,
    total: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Holds one connection's place; dropping it frees the place. A connection from a trusted
/// proxy holds a node place only until a request names its client ([`ConnectionSlot::claim_ip`]).
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    ip: Option<IpAddr>,
}

impl ConnectionCaps {
    /// Caps of `per_ip` connections per address and `total` per node.
    pub fn new(per_ip: usize, total: usize) -> Arc<ConnectionCaps> {
        Arc::new(ConnectionCaps {
            per_ip,
            total,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a place for a connection from `ip` (counted per node, and per IP when given), or
    /// refuses.
    pub fn acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnectionSlot, CapRefusal> {
        let mut open = self.open.lock().expect("caps lock");
        if open.0 >= self.total {
            return Err(CapRefusal::Node);
        }
        if let Some(ip) = ip {
            let count = open.1.entry(ip).or_insert(0);
            if *count >= self.per_ip {
                return Err(CapRefusal::PerIp);
            }
            *count += 1;
        }
        open.0 += 1;
        Ok(ConnectionSlot {
            caps: self.clone(),
            ip,
        })
    }

    /// Open connections of the whole node.
    pub fn open(&self) -> usize {
        self.open.lock().expect("caps lock").0
    }

    fn release_ip(open: &mut (usize, HashMap<IpAddr, usize>), ip: IpAddr) {
        if let Some(count) = open.1.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                open.1.remove(&ip);
            }
        }
    }
}

impl ConnectionSlot {
    /// Counts this place toward `ip` as well, when it is not counted toward an IP yet (a
    /// connection from a trusted proxy, once a request names the client); true when it did.
    pub fn claim_ip(&mut self, ip: IpAddr) -> Result<bool, CapRefusal> {
        if self.ip.is_some() {
            return Ok(false);
        }
        let mut open = self.caps.open.lock().expect("caps lock");
        let count = open.1.entry(ip).or_insert(0);
        if *count >= self.caps.per_ip {
            if *count == 0 {
                open.1.remove(&ip);
            }
            return Err(CapRefusal::PerIp);
        }
        *count += 1;
        self.ip = Some(ip);
        Ok(true)
    }

    /// Undoes a [`ConnectionSlot::claim_ip`]: the place counts toward the node only again.
    pub fn unclaim_ip(&mut self) {
        if let Some(ip) = self.ip.take() {
            let mut open = self.caps.open.lock().expect("caps lock");
            ConnectionCaps::release_ip(&mut open, ip);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().expect("caps lock");
        open.0 -= 1;
        if let Some(ip) = self.ip {
            ConnectionCaps::release_ip(&mut open, ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_past_the_burst_with_a_wait() {
        let bucket = Bucket::new(1.0, 3);
        for _ in 0..3 {
            assert!(bucket.take().is_ok());
        }
        let wait = bucket.take().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn caps_count_per_ip_and_per_node() {
        let caps = ConnectionCaps::new(2, 3);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = caps.acquire(Some(a)).unwrap();
        let _s2 = caps.acquire(Some(a)).unwrap();
        assert_eq!(caps.acquire(Some(a)).err(), Some(CapRefusal::PerIp));
        let _s3 = caps.acquire(Some(b)).unwrap();
        assert_eq!(caps.acquire(Some(b)).err(), Some(CapRefusal::Node));
        drop(s1);
        assert!(caps.acquire(Some(a)).is_ok());
    }

    #[test]
    fn a_proxied_place_claims_its_client_ip_and_gives_it_back() {
        let caps = ConnectionCaps::new(1, 10);
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        let mut proxied = caps.acquire(None).unwrap();
        let mut other = caps.acquire(None).unwrap();
        assert_eq!(proxied.claim_ip(client), Ok(true));
        assert_eq!(proxied.claim_ip(client), Ok(false), "already counted");
        assert_eq!(other.claim_ip(client), Err(CapRefusal::PerIp));
        proxied.unclaim_ip();
        assert_eq!(other.claim_ip(client), Ok(true));
        drop(other);
        assert_eq!(caps.acquire(Some(client)).map(|_| ()), Ok(()));
        assert_eq!(caps.open(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn abuse_trips_within_the_window_only() {
        let mut counter = AbuseCounter::default();
        let window = Duration::from_secs(10);
        assert!(!counter.refuse(3, window));
        assert!(!counter.refuse(3, window));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!counter.refuse(3, window));
        assert!(!counter.refuse(3, window));
        assert!(counter.refuse(3, window));
    }
}
