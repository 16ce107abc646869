//! Server-side figures from /proc: resident memory (`VmRSS` in /proc/PID/status) and CPU time
//! (`utime` and `stime` in /proc/PID/stat, in clock ticks), summed over every `--server-pid`.

use serde::{Deserialize, Serialize};

/// One reading of the servers' counters, summed over their pids.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// User CPU, clock ticks.
    pub utime: u64,
    /// System CPU, clock ticks.
    pub stime: u64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
}

impl Sample {
    /// Total CPU ticks.
    pub fn ticks(&self) -> u64 {
        self.utime + self.stime
    }
}

/// Reads every pid; `None` without pids or when one cannot be read (the process ended).
pub fn sample(pids: &[u32]) -> Option<Sample> {
    if pids.is_empty() {
        return None;
    }
    let mut total = Sample::default();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start at field 3, `state`.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        total.utime += fields.get(11)?.parse::<u64>().ok()?;
        total.stime += fields.get(12)?.parse::<u64>().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?;
        total.rss_kib += rss;
    }
    Some(total)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when that cannot be asked).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Server CPU spent over a measured stretch, with per-delivery costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuFigures {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub system_s: f64,
    /// Wall seconds of the stretch.
    pub wall_s: f64,
    /// Average CPU use, percent of one core.
    pub percent_of_core: f64,
    /// User CPU seconds per million deliveries.
    pub user_s_per_million: Option<f64>,
    /// System CPU seconds per million deliveries.
    pub system_s_per_million: Option<f64>,
    /// User CPU microseconds per delivery.
    pub user_us_per_delivery: Option<f64>,
    /// System CPU microseconds per delivery.
    pub system_us_per_delivery: Option<f64>,
}

impl CpuFigures {
    /// The figures between two samples, `wall_s` apart, for `deliveries` deliveries.
    pub fn between(before: Sample, after: Sample, wall_s: f64, deliveries: Option<u64>) -> Self {
        let hz = clock_ticks() as f64;
        let user_s = after.utime.saturating_sub(before.utime) as f64 / hz;
        let system_s = after.stime.saturating_sub(before.stime) as f64 / hz;
        let per = |secs: f64, scale: f64| {
            deliveries
                .filter(|&d| d > 0)
                .map(|d| round3(secs * scale / d as f64))
        };
        CpuFigures {
            user_s: round3(user_s),
            system_s: round3(system_s),
            wall_s: round3(wall_s),
            percent_of_core: round3(if wall_s > 0.0 {
                100.0 * (user_s + system_s) / wall_s
            } else {
                0.0
            }),
            user_s_per_million: per(user_s, 1e6),
            system_s_per_million: per(system_s, 1e6),
            user_us_per_delivery: per(user_s, 1e6),
            system_us_per_delivery: per(system_s, 1e6),
        }
    }
}

impl CpuFigures {
    /// The CPU of several processes over about the same stretch: seconds summed, the longest
    /// wall time, percent of a core recomputed; no per-delivery figures.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a CpuFigures>) -> Option<CpuFigures> {
        let mut total: Option<CpuFigures> = None;
        for c in all {
            let t = total.get_or_insert(CpuFigures {
                user_s: 0.0,
                system_s: 0.0,
                wall_s: 0.0,
                percent_of_core: 0.0,
                user_s_per_million: None,
                system_s_per_million: None,
                user_us_per_delivery: None,
                system_us_per_delivery: None,
            });
            t.user_s = round3(t.user_s + c.user_s);
            t.system_s = round3(t.system_s + c.system_s);
            t.wall_s = t.wall_s.max(c.wall_s);
        }
        if let Some(t) = &mut total {
            if t.wall_s > 0.0 {
                t.percent_of_core = round3(100.0 * (t.user_s + t.system_s) / t.wall_s);
            }
        }
        total
    }
}

/// Rounds to three decimals for readable JSON.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let s = super::sample(&[me]).expect("own /proc entry");
        assert!(s.rss_kib > 0);
        assert!(super::sample(&[]).is_none());
    }
}
