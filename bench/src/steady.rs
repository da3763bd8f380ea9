//! The steady rate of a drained backlog, apart from the start-up of the
//! process that drains it.
//!
//! A backlog of 50,000 events drains in 2–4 s here, and a binary needs
//! 0.3–1 s to connect, migrate, join or claim before its first event
//! arrives: timed from its start, `SIZE=small` measured the start-up as
//! much as the pipeline. The rate is therefore taken from the first
//! sample that shows progress to the first that shows all of it, and the
//! time to the first progress is reported beside it.

/// Counts of a draining backlog sampled over time.
#[derive(Debug, Default)]
pub struct Progress {
    /// (seconds since the process started, count done), in time order.
    samples: Vec<(f64, u64)>,
}

impl Progress {
    /// Notes that `done` were done `at` seconds after the start.
    pub fn record(&mut self, at: f64, done: u64) {
        self.samples.push((at, done));
    }

    /// When the first progress was seen: the start-up of the process.
    pub fn first_seen(&self) -> Option<f64> {
        self.samples.iter().find(|(_, done)| *done > 0).map(|s| s.0)
    }

    /// Per second, from the first sample with progress to the first that
    /// reached `total`. `None` when no two samples bracket the drain (all
    /// of it fell between two samples).
    pub fn steady_rate(&self, total: u64) -> Option<f64> {
        let (t0, done0) = *self.samples.iter().find(|(_, done)| *done > 0)?;
        let (t1, _) = *self.samples.iter().find(|(_, done)| *done >= total)?;
        (t1 > t0 && total > done0).then(|| (total - done0) as f64 / (t1 - t0))
    }

    /// Rates between samples at least `every` seconds apart, for the
    /// report's timeline.
    pub fn timeline(&self, every: f64) -> Vec<(f64, f64)> {
        let mut points = Vec::new();
        let mut last = (0.0, 0u64);
        for &(at, done) in &self.samples {
            if at - last.0 >= every {
                points.push((at, done.saturating_sub(last.1) as f64 / (at - last.0)));
                last = (at, done);
            }
        }
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(samples: &[(f64, u64)]) -> Progress {
        let mut progress = Progress::default();
        for &(at, done) in samples {
            progress.record(at, done);
        }
        progress
    }

    #[test]
    fn the_start_up_is_left_out() {
        // 1 s of start-up, then 1,000 per second.
        let p = progress(&[
            (0.5, 0),
            (1.0, 0),
            (1.5, 500),
            (2.0, 1000),
            (2.5, 1500),
            (3.0, 2000),
        ]);
        assert_eq!(p.first_seen(), Some(1.5));
        assert_eq!(p.steady_rate(2000), Some(1000.0));
    }

    #[test]
    fn the_first_sample_that_reached_the_total_ends_it() {
        let p = progress(&[(1.0, 100), (2.0, 1100), (3.0, 1100), (4.0, 1100)]);
        assert_eq!(p.steady_rate(1100), Some(1000.0));
    }

    #[test]
    fn a_drain_between_two_samples_has_no_steady_rate() {
        assert_eq!(progress(&[(1.0, 0), (2.0, 50)]).steady_rate(50), None);
        assert_eq!(progress(&[(1.0, 0), (2.0, 10)]).steady_rate(50), None);
        assert_eq!(progress(&[]).steady_rate(50), None);
    }

    #[test]
    fn the_timeline_spaces_its_points() {
        let p = progress(&[(0.25, 0), (0.5, 100), (0.75, 200), (1.0, 300)]);
        assert_eq!(p.timeline(0.5), vec![(0.5, 200.0), (1.0, 400.0)]);
    }
}
