//! A test hook: `GODWIT_HOLD=POINT:MS` makes the process wait MS milliseconds when a migration
//! reaches POINT, so the fault tests (`tests/faults.rs`) can kill a process, cut the link or
//! stall it inside a chosen phase rather than hoping to hit it. Unset (always, outside
//! tests), a point costs one comparison. The points:
//!
//! | point                | side        | where                                              |
//! |----------------------|-------------|----------------------------------------------------|
//! | `source-handshake`   | source      | connected, before authenticating                   |
//! | `source-round-1`     | source      | pre-copy round 1 sent, before its acknowledgement  |
//! | `source-round-2`     | source      | pre-copy round 2 sent, before its acknowledgement  |
//! | `source-paused`      | source      | guest paused, before the last pages go             |
//! | `source-committed`   | source      | `Commit` sent, before waiting for `Resumed`        |
//! | `destination-commit` | destination | `Commit` received, before resuming the guest       |
//! | `source-postcopy`    | source      | the VM runs on the destination, before post-copy   |

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that names the hold.
pub const HOLD_VAR: &str = "GODWIT_HOLD";

fn configured() -> Option<&'static (String, Duration)> {
    static HOLD: OnceLock<Option<(String, Duration)>> = OnceLock::new();
    HOLD.get_or_init(|| {
        let v = std::env::var(HOLD_VAR).ok()?;
        let (point, ms) = v.rsplit_once(':')?;
        Some((point.to_string(), Duration::from_millis(ms.parse().ok()?)))
    })
    .as_ref()
}

/// Waits here if `GODWIT_HOLD` names `point`.
pub(crate) fn hold(point: &str) {
    if let Some((p, d)) = configured() {
        if p == point {
            eprintln!(
                "godwit: holding at {point} for {} ms ({HOLD_VAR})",
                d.as_millis()
            );
            std::thread::sleep(*d);
        }
    }
}
