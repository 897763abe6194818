//! Hedged reads (DESIGN invariant 5): when the holder being read has not answered within its
//! usual latency, the next holder is asked too, and the first answer wins; the other read is
//! cancelled (its future dropped, which closes its connection).
//!
//! "Usual" is the holder's observed p95 over its recent answers, bounded by a floor (so a very
//! fast shard does not hedge on noise) and a ceiling (so a shard that has grown slow still
//! hedges soon). Only answers count: a read cancelled because another holder won records
//! nothing, so a shard that turned slow keeps the p95 of its healthy days, and reads of blobs
//! with a copy elsewhere keep their usual latency.
//!
//! A read cancelled after its hedge delay because another holder won is a *lost hedge*,
//! reported to the shard's circuit breaker: not a failure on its own (a healthy shard loses a
//! few), but a shard that keeps losing them with nothing succeeding in between opens its circuit
//! like a dead one (see `CircuitBreaker::record_lost_hedge`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

/// When reads hedge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgeSettings {
    /// Off: holders are tried one after the other, each to its end.
    pub enabled: bool,
    /// The hedge delay is the holder's p95, at least this…
    pub min_delay: Duration,
    /// …and at most this (also the delay while too few answers are known).
    pub max_delay: Duration,
}

impl Default for HedgeSettings {
    fn default() -> Self {
        Self { enabled: true, min_delay: Duration::from_millis(20), max_delay: Duration::from_millis(500) }
    }
}

impl HedgeSettings {
    /// How long a read of a holder with these latencies runs before the next holder is asked.
    pub fn delay(&self, latency: &LatencyWindow) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        let usual = latency.p95().unwrap_or(self.max_delay);
        Some(usual.clamp(self.min_delay, self.max_delay.max(self.min_delay)))
    }
}

/// The latencies of a shard's most recent answered reads.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    samples: Mutex<VecDeque<Duration>>,
}

/// Answers kept per shard.
const WINDOW: usize = 128;
/// Answers needed before the p95 is trusted.
const MIN_SAMPLES: usize = 16;

impl LatencyWindow {
    pub fn observe(&self, latency: Duration) {
        let mut samples = self.samples.lock().expect("latency lock");
        if samples.len() == WINDOW {
            samples.pop_front();
        }
        samples.push_back(latency);
    }

    /// The 95th percentile of the window, once it holds enough answers.
    pub fn p95(&self) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.samples.lock().expect("latency lock").iter().copied().collect();
        if sorted.len() < MIN_SAMPLES {
            return None;
        }
        sorted.sort_unstable();
        Some(sorted[(sorted.len() * 95).div_ceil(100) - 1])
    }
}

type Attempt<'a, T, E> = BoxFuture<'a, (&'a str, Duration, Result<T, E>)>;
/// A holder's hedge delay (`None`: never hedge it).
type DelayOf<'a> = Box<dyn Fn(&str) -> Option<Duration> + Send + Sync + 'a>;
/// Learns how long a holder took to answer.
type OnAnswer<'a> = Box<dyn Fn(&str, Duration) + Send + Sync + 'a>;
/// Learns that a holder's read, slower than its hedge delay, was cancelled for another's answer.
type OnLost<'a> = Box<dyn Fn(&str) + Send + Sync + 'a>;

/// A read still running: its holder, when it started, and its hedge delay.
struct Running<'a> {
    shard: &'a str,
    started: Instant,
    delay: Option<Duration>,
}

/// Reads of one blob from its holders, in read order, hedged. [`HedgedReads::next`] gives the
/// outcome of each attempt as it finishes: the caller serves the first success and drops this
/// (cancelling any read still running), or handles the failure and asks for the next outcome.
/// At most two reads run at once: the one being waited on, and its hedge.
pub struct HedgedReads<'a, T, E, F> {
    order: std::vec::IntoIter<&'a str>,
    attempt: F,
    in_flight: FuturesUnordered<Attempt<'a, T, E>>,
    hedge_at: Option<Instant>,
    delay_of: DelayOf<'a>,
    on_answer: OnAnswer<'a>,
    on_lost: OnLost<'a>,
    running: Vec<Running<'a>>,
    /// A read succeeded: the reads still running when this is dropped lost to it.
    answered: bool,
}

impl<'a, T, E, F, Fut> HedgedReads<'a, T, E, F>
where
    F: FnMut(&'a str) -> Fut + Send,
    Fut: Future<Output = Result<T, E>> + Send + 'a,
    T: Send + 'a,
    E: Send + 'a,
{
    /// `delay_of` gives a holder's hedge delay (`None`: never hedge it); `on_answer` learns how
    /// long each successful read took; `on_lost` learns of each lost hedge.
    pub fn new(
        order: Vec<&'a str>,
        attempt: F,
        delay_of: impl Fn(&str) -> Option<Duration> + Send + Sync + 'a,
        on_answer: impl Fn(&str, Duration) + Send + Sync + 'a,
        on_lost: impl Fn(&str) + Send + Sync + 'a,
    ) -> Self {
        Self {
            order: order.into_iter(),
            attempt,
            in_flight: FuturesUnordered::new(),
            hedge_at: None,
            delay_of: Box::new(delay_of),
            on_answer: Box::new(on_answer),
            on_lost: Box::new(on_lost),
            running: Vec::new(),
            answered: false,
        }
    }

    /// The next attempt to finish, with its holder; `None` once every holder has been tried.
    pub async fn next(&mut self) -> Option<(&'a str, Result<T, E>)> {
        if self.in_flight.is_empty() && !self.start_next() {
            return None;
        }
        loop {
            let hedge_at = self.hedge_at.filter(|_| self.in_flight.len() == 1 && self.order.len() > 0);
            tokio::select! {
                biased;
                Some((shard, elapsed, result)) = self.in_flight.next() => {
                    self.running.retain(|running| running.shard != shard);
                    if result.is_ok() {
                        self.answered = true;
                        (self.on_answer)(shard, elapsed);
                    }
                    return Some((shard, result));
                }
                () = sleep_until(hedge_at) => {
                    self.start_next();
                    tracing::debug!(in_flight = self.in_flight.len(), "a holder is slower than usual; hedged the read");
                }
                else => return None,
            }
        }
    }

    fn start_next(&mut self) -> bool {
        let Some(shard) = self.order.next() else { return false };
        let read = (self.attempt)(shard);
        let started = Instant::now();
        self.in_flight.push(Box::pin(async move {
            let result = read.await;
            (shard, started.elapsed(), result)
        }));
        let delay = (self.delay_of)(shard);
        self.hedge_at = delay.map(|delay| started + delay);
        self.running.push(Running { shard, started, delay });
        true
    }
}

impl<T, E, F> Drop for HedgedReads<'_, T, E, F> {
    fn drop(&mut self) {
        if !self.answered {
            return;
        }
        for running in &self.running {
            if running.delay.is_some_and(|delay| running.started.elapsed() >= delay) {
                (self.on_lost)(running.shard);
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A holder that answers `answer` after `after`.
    struct Holder {
        after: Duration,
        answer: Result<&'static str, &'static str>,
    }

    async fn read(holders: &[(&'static str, Holder)], delay: Option<Duration>) -> (Vec<String>, usize) {
        read_counting_losses(holders, delay).await.0
    }

    async fn read_counting_losses(
        holders: &[(&'static str, Holder)],
        delay: Option<Duration>,
    ) -> ((Vec<String>, usize), Vec<String>) {
        let lost = std::sync::Mutex::new(Vec::new());
        // Reads started and reads that ran to their end: the difference was cancelled.
        let (started, finished) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let order: Vec<&str> = holders.iter().map(|(name, _)| *name).collect();
        let mut outcomes = Vec::new();
        {
            let attempt = |shard: &str| {
                let holder = &holders.iter().find(|(name, _)| *name == shard).unwrap().1;
                let (started, finished) = (&started, &finished);
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(holder.after).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    holder.answer
                }
            };
            let on_lost = |shard: &str| lost.lock().unwrap().push(shard.to_owned());
            let mut reads = HedgedReads::new(order, attempt, move |_| delay, |_, _| {}, on_lost);
            while let Some((shard, result)) = reads.next().await {
                outcomes.push(format!("{shard}:{}", result.unwrap_or_else(|e| e)));
                if result.is_ok() {
                    break;
                }
            }
        }
        let cancelled = started.load(Ordering::SeqCst) - finished.load(Ordering::SeqCst);
        ((outcomes, cancelled), lost.into_inner().unwrap())
    }

    fn holder(ms: u64, answer: Result<&'static str, &'static str>) -> Holder {
        Holder { after: Duration::from_millis(ms), answer }
    }

    #[tokio::test]
    async fn a_slow_first_holder_is_overtaken_and_cancelled() {
        let started = Instant::now();
        let (outcomes, cancelled) = read(
            &[("slow", holder(20_000, Ok("late"))), ("fast", holder(5, Ok("bytes")))],
            Some(Duration::from_millis(50)),
        )
        .await;
        assert_eq!(outcomes, ["fast:bytes"]);
        assert_eq!(cancelled, 1, "the slow read was dropped");
        assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn the_overtaken_holder_is_reported_as_a_lost_hedge() {
        let holders = [("slow", holder(20_000, Ok("late"))), ("fast", holder(5, Ok("bytes")))];
        let (_, lost) = read_counting_losses(&holders, Some(Duration::from_millis(30))).await;
        assert_eq!(lost, ["slow"]);
        let prompt = [("a", holder(5, Ok("bytes"))), ("b", holder(5, Ok("other")))];
        let (_, lost) = read_counting_losses(&prompt, Some(Duration::from_millis(50))).await;
        assert!(lost.is_empty(), "{lost:?}");
    }

    #[tokio::test]
    async fn a_prompt_holder_is_read_alone() {
        let (outcomes, cancelled) =
            read(&[("a", holder(10, Ok("bytes"))), ("b", holder(10, Ok("other")))], Some(Duration::from_millis(50)))
                .await;
        assert_eq!(outcomes, ["a:bytes"]);
        assert_eq!(cancelled, 0, "no hedge was sent");
    }

    #[tokio::test]
    async fn failures_move_on_at_once_and_hedging_can_be_off() {
        let holders = [("a", holder(1, Err("absent"))), ("b", holder(30, Ok("bytes")))];
        let (outcomes, _) = read(&holders, None).await;
        assert_eq!(outcomes, ["a:absent", "b:bytes"]);
        let started = Instant::now();
        let (outcomes, _) = read(&[("slow", holder(200, Ok("late"))), ("fast", holder(1, Ok("bytes")))], None).await;
        assert_eq!(outcomes, ["slow:late"], "without hedging the first holder is waited for");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_bad_hedge_leaves_the_slow_read_running() {
        let holders = [("slow", holder(300, Ok("late"))), ("bad", holder(1, Err("corrupt")))];
        let (outcomes, _) = read(&holders, Some(Duration::from_millis(50))).await;
        assert_eq!(outcomes, ["bad:corrupt", "slow:late"]);
    }

    #[test]
    fn the_delay_is_the_p95_within_its_bounds() {
        let settings = HedgeSettings::default();
        let window = LatencyWindow::default();
        assert_eq!(settings.delay(&window), Some(settings.max_delay), "unknown latency: the ceiling");
        for ms in 1..=100 {
            window.observe(Duration::from_millis(ms));
        }
        assert_eq!(settings.delay(&window), Some(Duration::from_millis(95)));
        let fast = LatencyWindow::default();
        (0..50).for_each(|_| fast.observe(Duration::from_micros(300)));
        assert_eq!(settings.delay(&fast), Some(settings.min_delay));
        assert_eq!(HedgeSettings { enabled: false, ..settings }.delay(&fast), None);
    }
}
