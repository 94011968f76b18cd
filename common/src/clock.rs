//! The source of "now", injectable so expiry, renewal and cache logic is tested without
//! sleeping. Daemon and agent share it.

use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Whole seconds since the epoch, as the store and the wire keep times; a time before
/// 1970 does not occur on a sane clock and counts as 0.
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch (audit records, revocations, schedules with second-level
/// cron fields); before 1970 counts as 0.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn epoch_offsets_in_seconds_and_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(unix(t), 1_700_000_000);
        assert_eq!(unix_ms(t), 1_700_000_000_123);
        assert_eq!(unix(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }
}
