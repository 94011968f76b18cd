//! Refusals an outsider can repeat at will (an admin call from a uid that may not make
//! it, a node call without a valid agent SVID) go on the trail, but not one record per
//! attempt, or a loop of them would flood it. The first refusal of a kind (same actor,
//! action, subject and reason) is noted at once; those like it within the window are
//! counted, and one summary record per kind and window carries the count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Audit, Event};

/// How long refusals of one kind are counted before their summary is noted.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Kinds tracked at once; past this the oldest counts are noted and forgotten, so a
/// caller varying the subject cannot grow the map without bound.
const MAX_KINDS: usize = 4096;

pub(super) struct Throttle {
    kinds: Mutex<HashMap<String, Kind>>,
}

struct Kind {
    /// The first refusal of this window, the template of its summary.
    event: Event,
    since: Instant,
    held_back: u64,
}

impl Throttle {
    pub(super) fn new() -> Self {
        Self {
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `event` is noted now; otherwise it is counted for the summary.
    pub(super) fn admit(&self, event: &Event, now: Instant) -> bool {
        let key = event.kind_key();
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(kind) = kinds.get_mut(&key) {
            kind.held_back += 1;
            return false;
        }
        kinds.insert(
            key,
            Kind {
                event: event.clone(),
                since: now,
                held_back: 0,
            },
        );
        true
    }

    /// The summaries of the windows that have ended by `now` (or of the oldest kinds, past
    /// `MAX_KINDS`), removed from the count.
    pub(super) fn due(&self, now: Instant) -> Vec<Event> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended: Vec<String> = kinds
            .iter()
            .filter(|(_, kind)| now.duration_since(kind.since) >= WINDOW)
            .map(|(key, _)| key.clone())
            .collect();
        if kinds.len() - ended.len() > MAX_KINDS {
            let mut open: Vec<_> = kinds
                .iter()
                .filter(|(_, kind)| now.duration_since(kind.since) < WINDOW)
                .map(|(key, kind)| (kind.since, key.clone()))
                .collect();
            open.sort();
            let excess = open.len() - MAX_KINDS;
            ended.extend(open.into_iter().take(excess).map(|(_, key)| key));
        }
        ended
            .into_iter()
            .filter_map(|key| kinds.remove(&key))
            .filter(|kind| kind.held_back > 0)
            .map(|kind| {
                let seconds = now.duration_since(kind.since).as_secs().max(1);
                kind.event.summary(kind.held_back, seconds)
            })
            .collect()
    }
}

impl Audit {
    /// Notes a refusal an outsider could repeat at will, throttled per kind.
    pub fn note_refusal(&self, event: Event) {
        if self.throttle.admit(&event, Instant::now()) {
            self.note(event);
        }
    }

    /// Notes the summaries of throttled refusals whose window has ended; the writer's
    /// companion task calls it once a second.
    pub(super) fn note_summaries(&self) {
        for event in self.throttle.due(Instant::now()) {
            self.note(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;

    fn refusal(uid: u32, call: &str) -> Event {
        Event::new(&Actor::Operator(uid), "admin.denied", call).denied("not an operator")
    }

    #[test]
    fn a_burst_of_one_refusal_is_one_record_and_one_summary() {
        let throttle = Throttle::new();
        let start = Instant::now();
        assert!(throttle.admit(&refusal(7, "list_entries"), start));
        for _ in 0..999 {
            assert!(!throttle.admit(&refusal(7, "list_entries"), start));
        }
        assert!(
            throttle.admit(&refusal(7, "create_entry"), start),
            "another call is another kind"
        );
        assert!(throttle.admit(&refusal(8, "list_entries"), start));
        assert!(throttle.due(start + Duration::from_secs(1)).is_empty());

        let due = throttle.due(start + WINDOW);
        assert_eq!(due.len(), 1, "only the kind with refusals held back");
        let summary = &due[0].fields;
        assert_eq!(summary.action, "admin.denied");
        assert_eq!(summary.subject, "list_entries");
        assert!(summary.reason.contains("999 more"), "{}", summary.reason);
        assert!(
            throttle.admit(&refusal(7, "list_entries"), start + WINDOW),
            "a new window notes the next one at once"
        );
    }

    #[test]
    fn varying_the_subject_cannot_grow_the_count_without_bound() {
        let throttle = Throttle::new();
        let start = Instant::now();
        for i in 0..(MAX_KINDS + 100) {
            let event = refusal(7, &format!("call_{i}"));
            throttle.admit(&event, start);
            throttle.admit(&event, start);
        }
        let due = throttle.due(start);
        assert_eq!(due.len(), 100, "the oldest kinds are summarised early");
        assert_eq!(
            throttle.kinds.lock().unwrap().len(),
            MAX_KINDS,
            "and forgotten"
        );
    }
}
