//! Velocity features: counts, sums, distinct cards and near-limit counts per subject (card, id
//! number, phone, device, IP, merchant, institution) over sliding windows, kept in process.
//!
//! Owns: the event store, sharded by subject key. A decision reads the features of its subjects
//! and records its own event in one step under the locks of those subjects' shards (taken in
//! shard order, so no deadlock), so concurrent requests on one subject each see every earlier
//! one: N concurrent requests leave exactly N events, and the k-th sees k-1 before it.
//! A subject busier than `events_per_subject` within the horizon (an institution, a large
//! merchant) keeps its newest events one by one and folds older ones into per-minute totals:
//! counts, sums and near-limit counts stay whole (a window then counts the whole minute at its
//! far edge, erring towards more), distinct cards are counted over the individual events only.
//! Must never: grow without bound (subjects per shard, events per subject and minutes per
//! subject are capped), or leave an event of a window uncounted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a velocity feature is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Card,
    IdNo,
    Phone,
    Device,
    Ip,
    Merchant,
    Institution,
}

impl Dimension {
    pub const ALL: [Dimension; 7] = [
        Dimension::Card,
        Dimension::IdNo,
        Dimension::Phone,
        Dimension::Device,
        Dimension::Ip,
        Dimension::Merchant,
        Dimension::Institution,
    ];

    /// The prefix of this dimension's variables in rules (`card_count_1h`).
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Card => "card",
            Dimension::IdNo => "id",
            Dimension::Phone => "phone",
            Dimension::Device => "device",
            Dimension::Ip => "ip",
            Dimension::Merchant => "merchant",
            Dimension::Institution => "inst",
        }
    }

    pub fn parse(name: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// What is measured over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Measure {
    /// Earlier transactions.
    Count,
    /// Their amounts, in fen.
    Sum,
    /// Distinct cards among them (many cards on one device, IP, phone...).
    Cards,
    /// Those at or above 90% of the institution's single-transaction limit.
    NearLimit,
}

impl Measure {
    pub const ALL: [Measure; 4] = [
        Measure::Count,
        Measure::Sum,
        Measure::Cards,
        Measure::NearLimit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measure::Count => "count",
            Measure::Sum => "sum",
            Measure::Cards => "cards",
            Measure::NearLimit => "near_limit",
        }
    }

    pub fn parse(name: &str) -> Option<Measure> {
        Measure::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// One feature a rule set reads: `{dimension}_{measure}_{window}`, e.g. `device_cards_24h`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeatureSpec {
    pub dimension: Dimension,
    pub measure: Measure,
    pub window_ms: i64,
    /// The variable's name as written in rules.
    pub name: String,
}

impl FeatureSpec {
    /// Parses a rule variable; `None` when it is not a velocity feature name. A window is a
    /// number and a unit (s, m, h, d), at most 30 days.
    pub fn parse(variable: &str) -> Option<FeatureSpec> {
        let (rest, window) = variable.rsplit_once('_')?;
        let window_ms = parse_window(window)?;
        let (dimension, measure) = Dimension::ALL.into_iter().find_map(|d| {
            let measure = rest.strip_prefix(d.name())?.strip_prefix('_')?;
            Some((d, Measure::parse(measure)?))
        })?;
        Some(FeatureSpec {
            dimension,
            measure,
            window_ms,
            name: variable.to_string(),
        })
    }
}

const MAX_WINDOW_MS: i64 = 30 * 24 * 3600 * 1000;

fn parse_window(text: &str) -> Option<i64> {
    let unit_at = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(unit_at);
    let number: i64 = number.parse().ok().filter(|n| *n > 0)?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number
        .checked_mul(unit_ms)
        .filter(|ms| *ms <= MAX_WINDOW_MS)
}

/// One earlier transaction as the store remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub at_ms: i64,
    pub amount_fen: i64,
    /// The card's subject key, for distinct counts.
    pub card: u64,
    pub near_limit: bool,
}

/// The subjects of one transaction: a key per dimension it has (a debit without a device has
/// no device subject).
pub type Subjects = Vec<(Dimension, u64)>;

/// Bounds, explicit (TigerBeetle style).
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Events older than this are forgotten: the longest window any rule may use.
    pub horizon_ms: i64,
    pub subjects_per_shard: usize,
    pub events_per_subject: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            horizon_ms: 7 * 24 * 3600 * 1000,
            subjects_per_shard: 65_536,
            events_per_subject: 4_096,
        }
    }
}

const SHARDS: usize = 64;

/// An event with the running totals of its subject up to and including it, so a window's
/// count, sum and near-limit count are two binary searches and a subtraction.
#[derive(Debug, Clone, Copy)]
struct Stored {
    event: Event,
    total_sum: i64,
    total_near: i64,
}

/// The totals of one minute of a busy subject's older events.
#[derive(Debug, Clone, Copy)]
struct Minute {
    start_ms: i64,
    count: i64,
    sum: i64,
    near: i64,
}

const MINUTE_MS: i64 = 60_000;

/// One subject's events, oldest first, and the totals of those already forgotten; older events
/// of a busy subject folded into `minutes` (all older than every event in `events`).
#[derive(Default)]
struct Timeline {
    events: VecDeque<Stored>,
    forgotten_sum: i64,
    forgotten_near: i64,
    minutes: VecDeque<Minute>,
}

impl Timeline {
    fn newest_ms(&self) -> Option<i64> {
        self.events.back().map(|s| s.event.at_ms)
    }

    /// Moves the oldest individual event into its minute's totals.
    fn fold_oldest(&mut self) {
        let Some(oldest) = self.events.front().map(|s| s.event) else {
            return;
        };
        self.forget_oldest();
        let start_ms = oldest.at_ms - oldest.at_ms.rem_euclid(MINUTE_MS);
        match self.minutes.back_mut() {
            Some(minute) if minute.start_ms == start_ms => {
                minute.count += 1;
                minute.sum += oldest.amount_fen;
                minute.near += i64::from(oldest.near_limit);
            }
            last => {
                debug_assert!(
                    last.is_none_or(|m| m.start_ms < start_ms),
                    "minutes in order"
                );
                self.minutes.push_back(Minute {
                    start_ms,
                    count: 1,
                    sum: oldest.amount_fen,
                    near: i64::from(oldest.near_limit),
                });
            }
        }
    }

    /// The first individual event of the window after `since`. Windows are (now - window,
    /// now]: an event exactly one window old is out. Events stamped after `now` count too:
    /// they were decided before this one (concurrent requests take their time on arrival,
    /// not in the order their decisions run), and leaving them out would let two concurrent
    /// decisions each miss the other.
    fn window_start(&self, since: i64) -> usize {
        self.events.partition_point(|s| s.event.at_ms <= since)
    }

    /// The folded minutes touching the window after `since`: (count, sum, near).
    fn folded_since(&self, since: i64) -> (i64, i64, i64) {
        let first = self
            .minutes
            .partition_point(|m| m.start_ms + MINUTE_MS <= since);
        self.minutes.range(first..).fold((0, 0, 0), |(c, s, n), m| {
            (c + m.count, s + m.sum, n + m.near)
        })
    }

    fn forget_oldest(&mut self) {
        if let Some(gone) = self.events.pop_front() {
            self.forgotten_sum = gone.total_sum;
            self.forgotten_near = gone.total_near;
        }
    }

    /// Totals before index `i`.
    fn totals_before(&self, i: usize) -> (i64, i64) {
        match i.checked_sub(1).and_then(|p| self.events.get(p)) {
            Some(s) => (s.total_sum, s.total_near),
            None => (self.forgotten_sum, self.forgotten_near),
        }
    }

    /// Removes one occurrence of `event`; false when it is not held (already forgotten).
    fn remove(&mut self, event: Event) -> bool {
        let from = self.events.partition_point(|s| s.event.at_ms < event.at_ms);
        let Some(offset) = self
            .events
            .range(from..)
            .take_while(|s| s.event.at_ms == event.at_ms)
            .position(|s| s.event == event)
        else {
            return false;
        };
        let at = from + offset;
        self.events.remove(at);
        let (mut sum, mut near) = self.totals_before(at);
        for stored in self.events.range_mut(at..) {
            sum += stored.event.amount_fen;
            near += i64::from(stored.event.near_limit);
            stored.total_sum = sum;
            stored.total_near = near;
        }
        true
    }

    fn insert(&mut self, event: Event) {
        // Events arrive in time order per subject except across a clock step or a rebuild;
        // keep them sorted so a window is a contiguous range.
        let at = self
            .events
            .partition_point(|s| s.event.at_ms <= event.at_ms);
        self.events.insert(
            at,
            Stored {
                event,
                total_sum: 0,
                total_near: 0,
            },
        );
        let (mut sum, mut near) = self.totals_before(at);
        for stored in self.events.range_mut(at..) {
            sum += stored.event.amount_fen;
            near += i64::from(stored.event.near_limit);
            stored.total_sum = sum;
            stored.total_near = near;
        }
    }
}

#[derive(Default)]
struct Shard {
    /// foldhash, randomly seeded per process: the keys are unkeyed digests of what
    /// institutions send, so a fixed hash would let a sender aim for one bucket.
    subjects: foldhash::HashMap<(Dimension, u64), Timeline>,
}

pub struct VelocityStore {
    shards: Vec<Mutex<Shard>>,
    limits: StoreLimits,
    /// Events folded into per-minute totals (a subject busier than `events_per_subject`).
    pub dropped: AtomicU64,
}

fn shard_of(subject: &(Dimension, u64)) -> usize {
    // The key is already a hash; mix the dimension in so one value in two dimensions spreads.
    ((subject.1 ^ (subject.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % SHARDS as u64) as usize
}

impl VelocityStore {
    pub fn new(limits: StoreLimits) -> VelocityStore {
        assert!(
            limits.horizon_ms > 0 && limits.subjects_per_shard > 0 && limits.events_per_subject > 0
        );
        VelocityStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            limits,
            dropped: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// The values of `features` for `subjects` as of `event.at_ms` (every event recorded before
    /// this call inside the window, including ones stamped a little later), then
    /// records `event` for every subject when `record` is true: one atomic step per subject set.
    pub fn observe(
        &self,
        subjects: &Subjects,
        features: &[FeatureSpec],
        event: Event,
        record: bool,
    ) -> Vec<i64> {
        let mut shard_ids: Vec<usize> = subjects.iter().map(shard_of).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: Vec<std::sync::MutexGuard<'_, Shard>> = shard_ids
            .iter()
            .map(|&i| self.shards[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        // guards[k] holds shard shard_ids[k].
        let shard_for = |subject: &(Dimension, u64)| -> usize {
            shard_ids
                .binary_search(&shard_of(subject))
                .expect("every subject's shard is locked")
        };
        // Each subject's timeline looked up once, not once per feature.
        let timelines: Vec<Option<&Timeline>> = subjects
            .iter()
            .map(|subject| guards[shard_for(subject)].subjects.get(subject))
            .collect();
        let timeline_of = |dimension: Dimension| -> Option<&Timeline> {
            subjects
                .iter()
                .position(|(d, _)| *d == dimension)
                .and_then(|at| timelines[at])
        };
        // Where each (subject, window) starts, found once for its count, sum and near-limit.
        let mut starts: Vec<(Dimension, i64, usize)> = Vec::with_capacity(features.len());
        let mut values: Vec<i64> = features
            .iter()
            .map(|spec| {
                if spec.measure == Measure::Cards {
                    return 0; // below, all windows of a subject in one pass
                }
                let Some(timeline) = timeline_of(spec.dimension) else {
                    return 0;
                };
                let start = match starts
                    .iter()
                    .find(|(d, w, _)| *d == spec.dimension && *w == spec.window_ms)
                {
                    Some(&(_, _, start)) => start,
                    None => {
                        let start = timeline.window_start(event.at_ms - spec.window_ms);
                        starts.push((spec.dimension, spec.window_ms, start));
                        start
                    }
                };
                measure(timeline, start, spec, event.at_ms)
            })
            .collect();
        for (subject, timeline) in subjects.iter().zip(&timelines) {
            let Some(timeline) = timeline else {
                continue;
            };
            let windows: Vec<(usize, i64)> = features
                .iter()
                .enumerate()
                .filter(|(_, spec)| spec.measure == Measure::Cards && spec.dimension == subject.0)
                .map(|(at, spec)| (at, spec.window_ms))
                .collect();
            if !windows.is_empty() {
                distinct_cards(timeline, event.at_ms, windows, &mut values);
            }
        }
        drop(timelines);
        if record {
            for subject in subjects {
                let slot = shard_for(subject);
                self.record(&mut guards[slot], *subject, event);
            }
        }
        values
    }

    fn record(&self, shard: &mut Shard, subject: (Dimension, u64), event: Event) {
        let horizon = event.at_ms - self.limits.horizon_ms;
        if !shard.subjects.contains_key(&subject)
            && shard.subjects.len() >= self.limits.subjects_per_shard
        {
            // Forget the subjects whose newest event is out of the horizon first; if none,
            // the least recently active one.
            shard
                .subjects
                .retain(|_, timeline| timeline.newest_ms().is_some_and(|at| at > horizon));
            if shard.subjects.len() >= self.limits.subjects_per_shard {
                let oldest = shard
                    .subjects
                    .iter()
                    .min_by_key(|(_, timeline)| timeline.newest_ms().unwrap_or(i64::MIN))
                    .map(|(key, _)| *key);
                if let Some(key) = oldest
                    && let Some(gone) = shard.subjects.remove(&key)
                {
                    self.dropped
                        .fetch_add(gone.events.len() as u64, Ordering::Relaxed);
                }
            }
        }
        let timeline = shard.subjects.entry(subject).or_default();
        while timeline
            .events
            .front()
            .is_some_and(|s| s.event.at_ms <= horizon)
        {
            timeline.forget_oldest();
        }
        while timeline
            .minutes
            .front()
            .is_some_and(|m| m.start_ms + MINUTE_MS <= horizon)
        {
            timeline.minutes.pop_front();
        }
        if timeline.events.len() >= self.limits.events_per_subject {
            timeline.fold_oldest();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        timeline.insert(event);
        debug_assert!(timeline.events.len() <= self.limits.events_per_subject);
    }

    /// Removes one recorded `event` from every subject in `subjects` (the exact event: same
    /// time, amount, card and near-limit flag). Returns how many subjects held it.
    pub fn forget(&self, subjects: &Subjects, event: Event) -> usize {
        let mut removed = 0;
        for subject in subjects {
            let mut shard = self.shards[shard_of(subject)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(timeline) = shard.subjects.get_mut(subject)
                && timeline.remove(event)
            {
                removed += 1;
            }
        }
        removed
    }

    /// Loads earlier events (a rebuild from the journal at start), oldest first.
    pub fn preload(&self, subjects: &Subjects, event: Event) {
        self.observe(subjects, &[], event, true);
    }

    /// Subjects held, for /metrics.
    pub fn subjects(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).subjects.len())
            .sum()
    }
}

/// A count, sum or near-limit count of `timeline` over the window `spec` names, whose first
/// individual event is at `start` (`Timeline::window_start`).
fn measure(timeline: &Timeline, start: usize, spec: &FeatureSpec, now_ms: i64) -> i64 {
    let events = &timeline.events;
    let since = now_ms - spec.window_ms;
    let end = events.len();
    let (folded_count, folded_sum, folded_near) = timeline.folded_since(since);
    if start >= end {
        return match spec.measure {
            Measure::Count => folded_count,
            Measure::Sum => folded_sum,
            Measure::NearLimit => folded_near,
            Measure::Cards => 0,
        };
    }
    let (sum_before, near_before) = timeline.totals_before(start);
    let last = &events[end - 1];
    match spec.measure {
        Measure::Count => (end - start) as i64 + folded_count,
        Measure::Sum => last.total_sum - sum_before + folded_sum,
        Measure::NearLimit => last.total_near - near_before + folded_near,
        Measure::Cards => unreachable!("distinct cards are counted by distinct_cards"),
    }
}

/// Distinct cards of `timeline` in each window (`(index into values, window_ms)`), written to
/// `values`: one pass from the newest event back to the longest window's edge, through a
/// reusable open-addressing set (the keys are SM3 digests already; sorting and allocating per
/// feature was a third of a decision).
fn distinct_cards(
    timeline: &Timeline,
    now_ms: i64,
    mut windows: Vec<(usize, i64)>,
    values: &mut [i64],
) {
    thread_local! {
        static SEEN: std::cell::RefCell<CardSet> = std::cell::RefCell::new(CardSet::default());
    }
    windows.sort_unstable_by_key(|w| w.1);
    let events = &timeline.events;
    let longest_since = now_ms - windows.last().expect("at least one window").1;
    let oldest = events.partition_point(|s| s.event.at_ms <= longest_since);
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        seen.reset(events.len() - oldest);
        let mut pending = windows.iter().peekable();
        for stored in events.range(oldest..).rev() {
            // Windows are (now - window, now]: this event is outside every window whose edge
            // it is at or before, so those are complete.
            while let Some((at, window)) = pending.peek() {
                if stored.event.at_ms <= now_ms - window {
                    values[*at] = seen.len() as i64;
                    pending.next();
                } else {
                    break;
                }
            }
            seen.insert(stored.event.card);
        }
        for (at, _) in pending {
            values[*at] = seen.len() as i64;
        }
    });
}

/// A set of card keys for one count: linear probing in a table at most half full, reused
/// between decisions of a thread. Key 0 (an event without a card) is not a card. The table
/// keeps the largest size asked for (bounded by `events_per_subject`) and uses a power-of-two
/// prefix of it, so subjects of different sizes in one decision neither reallocate nor clear
/// more than they use.
#[derive(Default)]
struct CardSet {
    slots: Vec<u64>,
    mask: usize,
    len: usize,
}

impl CardSet {
    fn reset(&mut self, at_most: usize) {
        let size = (at_most * 2).next_power_of_two().max(16);
        if self.slots.len() < size {
            self.slots = vec![0; size];
        } else {
            self.slots[..size].fill(0);
        }
        self.mask = size - 1;
        self.len = 0;
    }

    fn insert(&mut self, card: u64) {
        if card == 0 {
            return;
        }
        let mut at = (card as usize) & self.mask;
        loop {
            match self.slots[at] {
                0 => {
                    self.slots[at] = card;
                    self.len += 1;
                    debug_assert!(self.len * 2 <= self.mask + 1, "sized for every event");
                    return;
                }
                same if same == card => return,
                _ => at = (at + 1) & self.mask,
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn spec(name: &str) -> FeatureSpec {
        FeatureSpec::parse(name).unwrap_or_else(|| panic!("{name} parses"))
    }

    fn event(at_ms: i64, amount_fen: i64, card: u64) -> Event {
        Event {
            at_ms,
            amount_fen,
            card,
            near_limit: false,
        }
    }

    #[test]
    fn feature_names_parse_and_typos_do_not() {
        let f = spec("device_cards_24h");
        assert_eq!(
            (f.dimension, f.measure, f.window_ms),
            (Dimension::Device, Measure::Cards, 86_400_000)
        );
        assert_eq!(spec("card_near_limit_10m").measure, Measure::NearLimit);
        assert_eq!(spec("inst_sum_30s").window_ms, 30_000);
        for bad in [
            "card_count",
            "card_cnt_1h",
            "cards_count_1h",
            "card_count_1y",
            "card_count_0h",
            "card_count_31d",
            "card_count_h",
        ] {
            assert!(FeatureSpec::parse(bad).is_none(), "{bad} accepted");
        }
    }

    #[test]
    fn distinct_cards_in_every_window_match_a_plain_count() {
        let store = VelocityStore::new(StoreLimits::default());
        let device = vec![(Dimension::Device, 1)];
        let features = [
            spec("device_cards_10s"),
            spec("device_cards_1m"),
            spec("device_cards_10m"),
            spec("device_count_1m"),
            spec("device_cards_1h"),
        ];
        let mut history: Vec<(i64, u64)> = Vec::new();
        let mut x: u64 = 0x9E37_79B9;
        for n in 0..2_000i64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Every 1.5 s on average, one of 40 cards, some events without a card (key 0).
            let at = n * 1_500 + (x >> 60) as i64;
            let card = (x >> 33) % 41;
            let seen = store.observe(&device, &features, event(at, 1, card), true);
            let plain = |window: i64| {
                let mut cards: Vec<u64> = history
                    .iter()
                    .filter(|(t, c)| *t > at - window && *c != 0)
                    .map(|(_, c)| *c)
                    .collect();
                cards.sort_unstable();
                cards.dedup();
                cards.len() as i64
            };
            let count = history.iter().filter(|(t, _)| *t > at - 60_000).count() as i64;
            assert_eq!(
                seen,
                vec![
                    plain(10_000),
                    plain(60_000),
                    plain(600_000),
                    count,
                    plain(3_600_000)
                ],
                "event {n}"
            );
            history.push((at, card));
        }
    }

    #[test]
    fn a_withdrawn_event_leaves_the_totals_as_if_it_never_came() {
        let store = VelocityStore::new(StoreLimits::default());
        let subjects = vec![(Dimension::Card, 7), (Dimension::Device, 9)];
        let features = [
            spec("card_count_1h"),
            spec("card_sum_1h"),
            spec("device_cards_1h"),
        ];
        store.observe(&subjects, &[], event(1_000, 100, 7), true);
        store.observe(&subjects, &[], event(2_000, 250, 7), true);
        store.observe(&subjects, &[], event(3_000, 40, 7), true);
        assert_eq!(store.forget(&subjects, event(2_000, 250, 7)), 2);
        assert_eq!(
            store.forget(&subjects, event(2_000, 250, 7)),
            0,
            "removed once"
        );
        assert_eq!(
            store.forget(&subjects, event(3_000, 41, 7)),
            0,
            "only the exact event"
        );
        let seen = store.observe(&subjects, &features, event(4_000, 1, 7), false);
        assert_eq!(seen, vec![2, 140, 1]);
    }

    #[test]
    fn windows_count_only_what_is_inside_them() {
        let store = VelocityStore::new(StoreLimits::default());
        let card = vec![(Dimension::Card, 7)];
        let features = [
            spec("card_count_1m"),
            spec("card_sum_1h"),
            spec("card_count_24h"),
        ];
        let minute = 60_000;
        for (at, amount) in [(0, 100), (30 * minute, 200), (60 * minute - 1, 300)] {
            store.observe(&card, &[], event(at, amount, 7), true);
        }
        // At exactly one hour, the first event is one hour old: out of the 1 h window.
        let seen = store.observe(&card, &features, event(60 * minute, 1, 7), false);
        assert_eq!(seen, vec![1, 500, 3]);
        let seen = store.observe(&card, &features, event(61 * minute, 1, 7), false);
        assert_eq!(seen, vec![0, 500, 3]);
        // Another card's events are not this one's.
        let other = vec![(Dimension::Card, 8)];
        assert_eq!(
            store.observe(&other, &features, event(61 * minute, 1, 8), false),
            vec![0, 0, 0]
        );
    }

    #[test]
    fn distinct_cards_of_a_busy_and_a_quiet_subject_in_one_decision() {
        // The reusable card table sized for the busy subject must count the quiet one exactly
        // (only the prefix it uses is cleared), and the other way round.
        let store = VelocityStore::new(StoreLimits::default());
        for n in 0..600u64 {
            store.observe(
                &vec![(Dimension::Device, 1)],
                &[],
                event(n as i64, 1, 1 + n % 300),
                true,
            );
        }
        for card in [7u64, 8, 7] {
            store.observe(&vec![(Dimension::Ip, 2)], &[], event(700, 1, card), true);
        }
        for subjects in [
            vec![(Dimension::Device, 1), (Dimension::Ip, 2)],
            vec![(Dimension::Ip, 2), (Dimension::Device, 1)],
        ] {
            for _ in 0..2 {
                let seen = store.observe(
                    &subjects,
                    &[
                        spec("ip_cards_1h"),
                        spec("device_cards_1h"),
                        spec("ip_count_1h"),
                    ],
                    event(800, 1, 0),
                    false,
                );
                assert_eq!(seen, vec![2, 300, 3]);
            }
        }
    }

    #[test]
    fn distinct_cards_per_device() {
        let store = VelocityStore::new(StoreLimits::default());
        for (i, card) in [1u64, 2, 2, 3].into_iter().enumerate() {
            let subjects = vec![(Dimension::Card, card), (Dimension::Device, 99)];
            store.observe(&subjects, &[], event(i as i64, 10, card), true);
        }
        let subjects = vec![(Dimension::Card, 4), (Dimension::Device, 99)];
        let seen = store.observe(
            &subjects,
            &[
                spec("device_cards_1h"),
                spec("device_count_1h"),
                spec("card_count_1h"),
            ],
            event(10, 10, 4),
            false,
        );
        assert_eq!(seen, vec![3, 4, 0]);
    }

    #[test]
    fn concurrent_requests_on_one_card_each_see_every_earlier_one() {
        // All at one instant, so "earlier" is decided by the store's order alone.
        let store = Arc::new(VelocityStore::new(StoreLimits::default()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..250)
                        .map(|_| {
                            let subjects = vec![
                                (Dimension::Card, 1),
                                (Dimension::Device, 100 + t),
                                (Dimension::Institution, 5),
                            ];
                            store.observe(
                                &subjects,
                                &[spec("card_count_24h")],
                                event(1_000, 1, 1),
                                true,
                            )[0]
                        })
                        .collect::<Vec<i64>>()
                })
            })
            .collect();
        let mut seen: Vec<i64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seen.sort_unstable();
        // Every request saw a different number of earlier ones: 0, 1, ..., 1999.
        assert_eq!(seen, (0..2_000).collect::<Vec<i64>>());
        let after = store.observe(
            &vec![(Dimension::Institution, 5)],
            &[spec("inst_count_24h")],
            event(5_000, 1, 1),
            false,
        );
        assert_eq!(after, vec![2_000]);
    }

    #[test]
    fn a_busy_subject_folds_its_oldest_events_into_minutes_and_still_counts_them() {
        let store = VelocityStore::new(StoreLimits {
            horizon_ms: 1_000_000,
            subjects_per_shard: 2,
            events_per_subject: 3,
        });
        let card = vec![(Dimension::Card, 1)];
        for at in 0..5 {
            store.observe(&card, &[], event(at, 10, 1), true);
        }
        assert_eq!(
            store.observe(
                &card,
                &[
                    spec("card_count_1h"),
                    spec("card_sum_1h"),
                    spec("card_cards_1h")
                ],
                event(10, 1, 1),
                false
            ),
            vec![5, 50, 1]
        );
        assert_eq!(store.dropped.load(Ordering::Relaxed), 2);
        // A window reaching into a folded minute counts that whole minute (towards more).
        let inst = vec![(Dimension::Institution, 9)];
        for n in 0..10 {
            store.observe(&inst, &[], event(60_000 + n * 5_000, 1, 0), true);
        }
        // Events at 60, 65, ..., 105 s: the three newest kept alone, the seven before folded
        // into the minute starting at 60 s. (80 s, 110 s] holds five events; the folded minute
        // reaches into it, so it counts whole: 3 alone + 7 folded.
        assert_eq!(
            store.observe(
                &inst,
                &[spec("inst_count_30s")],
                event(110_000, 1, 0),
                false
            ),
            vec![10]
        );
        // A window that starts after the folded minute ends does not count it.
        assert_eq!(
            store.observe(&inst, &[spec("inst_count_1m")], event(179_000, 1, 0), false),
            vec![7],
            "(119 s, 179 s] touches the minute [60 s, 120 s)"
        );
        assert_eq!(
            store.observe(&inst, &[spec("inst_count_1m")], event(180_000, 1, 0), false),
            vec![0]
        );
        // Past the horizon, events are forgotten when the subject is next written.
        store.observe(&card, &[], event(2_000_000, 1, 1), true);
        assert_eq!(
            store.observe(
                &card,
                &[spec("card_count_30d")],
                event(2_000_001, 1, 1),
                false
            ),
            vec![1]
        );
    }
}
