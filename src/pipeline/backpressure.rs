//! When scoring backpressure pauses the input partitions, and when it resumes them.

/// Whether the input stays (or becomes) paused with `waiting` users not yet queued for
/// scoring: it pauses above `max_waiting` and resumes at half of it. The gap matters:
/// librdkafka drops a paused partition's prefetched records and takes up to a fetch round
/// trip or more to fetch again after a resume, so pausing at every short burst would stall
/// the input about once a second under a load the workers keep up with.
pub(super) fn keep_paused(paused: bool, waiting: usize, max_waiting: usize) -> bool {
    if paused {
        waiting > max_waiting / 2
    } else {
        waiting > max_waiting
    }
}

#[cfg(test)]
mod tests {
    use super::keep_paused;

    #[test]
    fn input_pauses_above_the_limit_and_resumes_at_half() {
        // Running: a burst up to the limit is absorbed.
        assert!(!keep_paused(false, 0, 100));
        assert!(!keep_paused(false, 100, 100));
        assert!(keep_paused(false, 101, 100));
        // Paused: stays so until the backlog is down to half.
        assert!(keep_paused(true, 100, 100));
        assert!(keep_paused(true, 51, 100));
        assert!(!keep_paused(true, 50, 100));
        // A limit of one pauses at two waiting and resumes when none is left.
        assert!(keep_paused(false, 2, 1));
        assert!(keep_paused(true, 1, 1));
        assert!(!keep_paused(true, 0, 1));
    }
}
