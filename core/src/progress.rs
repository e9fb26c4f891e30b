//! Progress of a long transfer: on a terminal, a bar redrawn on stderr with bytes, rate and ETA;
//! without one (a CronJob's log), one `tracing` line at a steady interval.
//!
//! Invariants: progress output never goes to stdout (stdout carries data), and drawing is
//! rate-limited so it costs nothing measurable per call.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Interval between log lines when stderr is not a terminal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
const DRAW_INTERVAL: Duration = Duration::from_millis(250);
const BAR: usize = 30;

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last: Instant,
    tty: bool,
    drawn: bool,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total: total.filter(|t| *t > 0),
            done: 0,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        let every = if self.tty {
            DRAW_INTERVAL
        } else {
            LOG_INTERVAL
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.report();
        }
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    fn report(&mut self) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let eta = self.total.and_then(|t| {
            (rate > 0.0).then(|| Duration::from_secs_f64(t.saturating_sub(self.done) as f64 / rate))
        });
        if self.tty {
            let line = render(self.done, self.total, rate, eta);
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r{} {line}", self.what);
            let _ = e.flush();
            self.drawn = true;
        } else {
            tracing::info!(
                bytes_done = self.done,
                bytes_total = self.total,
                rate_bytes_per_s = rate as u64,
                eta_s = eta.map(|d| d.as_secs()),
                "{} progress",
                self.what
            );
        }
    }

    /// Ends the bar's line on a terminal.
    pub fn finish(&mut self) {
        if self.tty {
            self.report();
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn human(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// One progress line: `[#####     ] 1.0 GiB / 2.0 GiB  50.0 MiB/s  ETA 0:00:21`.
pub fn render(done: u64, total: Option<u64>, rate: f64, eta: Option<Duration>) -> String {
    let mut s = String::new();
    if let Some(t) = total {
        // The server's total is an estimate: the bar stops at full, the numbers do not.
        let filled = ((done as f64 / t as f64) * BAR as f64).min(BAR as f64) as usize;
        s.push('[');
        s.push_str(&"#".repeat(filled));
        s.push_str(&" ".repeat(BAR - filled));
        s.push_str("] ");
        s.push_str(&format!("{} / {}", human(done as f64), human(t as f64)));
    } else {
        s.push_str(&human(done as f64));
    }
    s.push_str(&format!("  {}/s", human(rate)));
    if let Some(e) = eta {
        let t = e.as_secs();
        s.push_str(&format!(
            "  ETA {}:{:02}:{:02}",
            t / 3600,
            t / 60 % 60,
            t % 60
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bar_rate_and_eta() {
        let l = render(
            1 << 30,
            Some(2 << 30),
            50.0 * 1048576.0,
            Some(Duration::from_secs(3725)),
        );
        assert_eq!(
            l,
            "[###############               ] 1.0 GiB / 2.0 GiB  50.0 MiB/s  ETA 1:02:05"
        );
        let over = render(3 << 30, Some(2 << 30), 0.0, None);
        assert!(
            over.starts_with(&format!("[{}]", "#".repeat(BAR))),
            "{over}"
        );
        assert_eq!(render(512, None, 512.0, None), "512.0 B  512.0 B/s");
    }
}
