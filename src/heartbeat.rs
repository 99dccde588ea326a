//! Reads the serial logs of Godwit's test guests (see `godwit-guests`) and says what an
//! observer outside the VM can tell: whether the guest rebooted, whether its heartbeat
//! counter ever skipped or restarted, whether it reported a lost page or a lost register, and
//! the longest silence between two heartbeats, which is the pause a migration caused (plus one
//! heartbeat period). Logs from several hosts merge into one timeline by their host timestamps.

use serde::Serialize;

/// One serial line: host time (seconds since the Unix epoch) and text.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// When the VMM received the line's newline.
    pub time: f64,
    /// The guest's text.
    pub text: String,
}

/// Parses `[secs.micros] text` lines; other lines (the VMM's own messages) are skipped.
pub fn parse(log: &str) -> Vec<Line> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (ts, text) = rest.split_once("] ")?;
            Some(Line {
                time: ts.parse().ok()?,
                text: text.to_string(),
            })
        })
        .collect()
}

/// What the logs show.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Boot lines seen: 1 for a guest that was never rebooted.
    pub boots: usize,
    /// Heartbeat lines seen.
    pub heartbeats: usize,
    /// The last heartbeat counter.
    pub last_seq: u64,
    /// Places where the counter did not go up by exactly one.
    pub seq_breaks: Vec<String>,
    /// Lines in which the guest reported an error (lost page, lost register, exception).
    pub errors: Vec<String>,
    /// The longest time between two consecutive heartbeats, in ms.
    pub longest_gap_ms: f64,
    /// When that gap ended (host time).
    pub longest_gap_at: f64,
    /// The median time between heartbeats: the guest's heartbeat period as observed.
    pub median_gap_ms: f64,
    /// The largest stall the guest itself measured (its `stall_us`), in µs.
    pub max_stall_us: u64,
}

impl Summary {
    /// The pause an observer saw: the longest gap less one heartbeat period.
    pub fn pause_seen_ms(&self) -> f64 {
        (self.longest_gap_ms - self.median_gap_ms).max(0.0)
    }

    /// Whether the guest ran as one uninterrupted, healthy life.
    pub fn healthy(&self) -> bool {
        self.boots == 1
            && self.seq_breaks.is_empty()
            && self.errors.is_empty()
            && self.heartbeats > 0
    }
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Merges the logs of all hosts the guest ran on and summarises them.
pub fn analyse(logs: &[&str]) -> Summary {
    let mut lines: Vec<Line> = logs.iter().flat_map(|l| parse(l)).collect();
    lines.sort_by(|a, b| a.time.total_cmp(&b.time));
    let mut s = Summary::default();
    let mut prev: Option<(u64, f64)> = None;
    let mut gaps = Vec::new();
    for l in &lines {
        if l.text.starts_with("godwit-guest boot") {
            s.boots += 1;
        } else if l.text.starts_with("ERR") || l.text.starts_with("EXC") {
            s.errors.push(l.text.clone());
        } else if l.text.starts_with("hb ") {
            let Some(seq) = field(&l.text, "seq").and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            s.heartbeats += 1;
            if let Some(stall) = field(&l.text, "stall_us").and_then(|v| v.parse::<u64>().ok()) {
                s.max_stall_us = s.max_stall_us.max(stall);
            }
            if let Some(e) = field(&l.text, "err") {
                s.errors.push(format!("heartbeat {seq} reports err={e}"));
            }
            match prev {
                Some((p, t)) => {
                    if seq != p + 1 {
                        s.seq_breaks.push(format!("seq {p} followed by {seq}"));
                    }
                    let gap = (l.time - t) * 1e3;
                    gaps.push(gap);
                    if gap > s.longest_gap_ms {
                        s.longest_gap_ms = gap;
                        s.longest_gap_at = l.time;
                    }
                }
                None if seq != 1 => s
                    .seq_breaks
                    .push(format!("first heartbeat is seq {seq}, not 1")),
                None => {}
            }
            prev = Some((seq, l.time));
            s.last_seq = seq;
        }
    }
    gaps.sort_by(f64::total_cmp);
    s.median_gap_ms = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_hosts_and_finds_the_pause() {
        let a = "[100.000000] godwit-guest boot mode=check\n[100.050000] hb seq=1 pass=1 stall_us=3 ok\n\
                 [100.100000] hb seq=2 pass=1 stall_us=2 ok\nsome vmm message\n";
        let b = "[100.180000] hb seq=3 pass=2 stall_us=30000 ok\n[100.230000] hb seq=4 pass=2 stall_us=1 ok\n";
        let s = analyse(&[b, a]);
        assert!(s.healthy(), "{s:?}");
        assert_eq!(s.heartbeats, 4);
        assert!((s.longest_gap_ms - 80.0).abs() < 1e-6);
        assert!((s.pause_seen_ms() - 30.0).abs() < 1e-6);
        assert_eq!(s.max_stall_us, 30000);
    }

    #[test]
    fn a_reboot_a_restart_and_a_lost_page_are_caught() {
        let log = "[1.0] godwit-guest boot\n[1.1] hb seq=1 ok\n[1.2] hb seq=2 ok\n\
                   [1.3] godwit-guest boot\n[1.4] hb seq=1 ok\n[1.5] ERR lost page gpa=0x1000 got=1 want=3 pass=3\n";
        let s = analyse(&[log]);
        assert!(!s.healthy());
        assert_eq!(s.boots, 2);
        assert_eq!(s.seq_breaks, vec!["seq 2 followed by 1"]);
        assert_eq!(s.errors.len(), 1);
    }
}
