//! The log side of rejected records. Every rejection is counted in
//! `mindstream_records_rejected_total`; the log gets one line per burst rather than one per
//! record, so a producer sending garbage cannot flood it: the first rejection after a quiet
//! period is logged at once, and the ones that follow within [`BURST_PERIOD`] are summed
//! into one line, written by the next rejection after the period or by the periodic flush.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Shortest time between two "records rejected" lines.
pub(super) const BURST_PERIOD: Duration = Duration::from_secs(10);

/// Rejections not yet logged, by topic and reason.
#[derive(Default)]
pub(super) struct RejectionLog {
    pending: BTreeMap<(String, &'static str), u64>,
    last_line: Option<Instant>,
}

impl RejectionLog {
    /// Notes one rejection; logs a line when the last one is at least a period old.
    pub(super) fn note(&mut self, topic: &str, reason: &'static str, now: Instant) {
        *self.pending.entry((topic.to_owned(), reason)).or_default() += 1;
        let quiet = self.last_line.is_none_or(|last| now.duration_since(last) >= BURST_PERIOD);
        if quiet {
            self.flush(now);
        }
    }

    /// Logs what is pending, if anything.
    pub(super) fn flush(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let records: u64 = self.pending.values().sum();
        let by_reason = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((topic, reason), count)| format!("{topic}/{reason}={count}"))
            .collect::<Vec<_>>()
            .join(",");
        tracing::warn!(records, by_reason, "records rejected to the dead-letter topic");
        self.last_line = Some(now);
    }

    #[cfg(test)]
    fn pending(&self) -> u64 {
        self.pending.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_one_line_then_one_summary() {
        let mut log = RejectionLog::default();
        let start = Instant::now();
        log.note("clicks", "bad_json", start);
        assert_eq!(log.pending(), 0, "the first rejection after a quiet period is logged");

        for i in 1..=500 {
            log.note("clicks", "bad_json", start + Duration::from_millis(i));
        }
        assert_eq!(log.pending(), 500, "rejections within the period wait for the summary");

        log.flush(start + Duration::from_secs(1));
        assert_eq!(log.pending(), 0);
        log.note("clicks", "late", start + Duration::from_secs(2));
        assert_eq!(log.pending(), 1, "a flush starts a new period");
        log.note("clicks", "late", start + Duration::from_secs(12));
        assert_eq!(log.pending(), 0);
    }
}
