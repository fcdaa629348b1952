//! Real-time risk control: every transaction is decided (approve, review, decline) before
//! anything reaches the core, by rules risk analysts write (CEL conditions, `rules.rs`) over the
//! transaction, black and white lists (`lists.rs`) and velocity features kept in process
//! (`features.rs`). docs/risk-rules.md is the analysts' manual.
//!
//! Owns: the active rule set (swapped whole and atomically on reload: a decision holds one
//! set from start to end), the velocity store, the per-decision time budget, and the decision
//! record (rules that fired, feature values they saw, the set's version).
//! Must never: evaluate a request against a half-loaded set, keep plaintext card, id or phone
//! numbers (subjects are SM3 digests), or block on I/O: deciding is pure computation.

pub mod features;
pub mod list_store;
pub mod lists;
pub mod reload;
pub mod rules;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Timelike, Utc};

use features::{Dimension, Event, StoreLimits, Subjects, VelocityStore};
use lists::Lists;
use rules::{Action, Mode, Outcome, RuleSet, Strategy, Variable};

/// Rules evaluated between two looks at a decision's clock (its time budget).
const BUDGET_CHECK_EVERY: usize = 8;

/// A problem in a risk file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct LoadError {
    pub file: String,
    pub line: Option<usize>,
    pub reason: String,
}

/// The 1-based line of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The key a subject is known by in lists and the velocity store: SM3 over the dimension and
/// the value, so no card, id or phone number is kept in memory or in files as plaintext.
pub fn subject_key(dimension: Dimension, value: &str) -> u64 {
    let digest = crate::crypto::sm3::digest(
        format!("kunpay-risk\u{0}{}\u{0}{value}", dimension.name()).as_bytes(),
    );
    u64::from_be_bytes(digest[..8].try_into().expect("SM3 gives 32 bytes"))
}

/// A rule set, its lists and its version: what one decision is evaluated against.
pub struct Loaded {
    pub rules: RuleSet,
    pub lists: Lists,
    /// The analysts' label and a digest of every file, e.g. `2026-11-23.1+3f9a0c12d4e1`.
    pub version: String,
    pub files: usize,
}

/// Reads and compiles the whole risk directory: `strategy.toml` (optional), `rules/*.toml`,
/// `lists/*.toml`, in name order. Either all of it is good or nothing is returned.
pub fn load_dir(dir: &Path) -> Result<Loaded, LoadError> {
    let read_dir = |sub: &str| -> Result<Vec<(String, String)>, LoadError> {
        let path = dir.join(sub);
        let mut files = Vec::new();
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
            Err(e) => {
                return Err(LoadError {
                    file: path.display().to_string(),
                    line: None,
                    reason: e.to_string(),
                });
            }
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&p).map_err(|e| LoadError {
                file: p.display().to_string(),
                line: None,
                reason: e.to_string(),
            })?;
            files.push((
                format!("{sub}/{}", entry.file_name().to_string_lossy()),
                text,
            ));
        }
        files.sort();
        Ok(files)
    };
    let strategy_text = match std::fs::read_to_string(dir.join("strategy.toml")) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(LoadError {
                file: dir.join("strategy.toml").display().to_string(),
                line: None,
                reason: e.to_string(),
            });
        }
    };
    let rule_files = read_dir("rules")?;
    let list_files = read_dir("lists")?;
    let mut sources: Vec<(String, String)> = Vec::new();
    if let Some(text) = &strategy_text {
        sources.push(("strategy.toml".into(), text.clone()));
    }
    sources.extend(rule_files.iter().cloned());
    sources.extend(list_files.iter().cloned());
    load_sources(&sources)
}

/// `load_dir` on in-memory files (name, text): `strategy.toml`, `rules/...`, `lists/...`.
pub fn load_sources(sources: &[(String, String)]) -> Result<Loaded, LoadError> {
    let strategy = match sources.iter().find(|(name, _)| name == "strategy.toml") {
        Some((name, text)) => rules::parse_strategy(name, text)?,
        None => Strategy::default(),
    };
    let env = Arc::new(cel::Env::stdlib());
    let mut compiled = Vec::new();
    let mut lists = Lists::default();
    let mut digest_input = Vec::new();
    for (name, text) in sources {
        digest_input.extend_from_slice(name.as_bytes());
        digest_input.push(0);
        digest_input.extend_from_slice(text.as_bytes());
        digest_input.push(0);
        if name.starts_with("rules/") {
            rules::add_rule_file(&mut compiled, &env, &strategy, name, text)?;
        } else if name.starts_with("lists/") {
            lists.add_file(name, text)?;
        }
    }
    let digest = hex::encode(&crate::crypto::sm3::digest(&digest_input)[..6]);
    let version = match &strategy.label {
        Some(label) => format!("{label}+{digest}"),
        None => digest,
    };
    Ok(Loaded {
        rules: RuleSet::new(env, compiled, strategy),
        lists,
        version,
        files: sources.len(),
    })
}

/// One transaction as risk sees it. Plain values are turned into subject keys at once.
#[derive(Debug, Clone)]
pub struct RiskInput<'a> {
    pub kind: &'a str,
    pub inst: &'a str,
    pub amount_fen: i64,
    pub at: DateTime<Utc>,
    pub card: Option<&'a str>,
    pub id_no: Option<&'a str>,
    pub phone: Option<&'a str>,
    pub device: Option<&'a str>,
    pub ip: Option<IpAddr>,
    pub merchant: Option<&'a str>,
    pub single_limit_fen: i64,
    pub daily_limit_fen: i64,
    /// Seconds since the agreement was confirmed (debits under an agreement), else -1.
    pub agreement_age_s: i64,
    pub holder_mismatch: bool,
}

/// When a decision overruns its time budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// Approve (availability first).
    Open,
    /// Decline (safety first).
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredRule {
    pub id: Arc<str>,
    pub version: u32,
    pub shadow: bool,
    pub action: Arc<str>,
}

/// A decision and everything that explains it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub outcome: Outcome,
    pub version: String,
    pub fired: Vec<FiredRule>,
    /// Every variable the set reads, with the value this decision saw.
    pub seen: Vec<(Arc<str>, Seen)>,
    pub score: i64,
    /// Rules whose condition failed at run time (counted as not firing), with why.
    pub errors: Vec<(String, String)>,
    pub budget_exceeded: bool,
    pub elapsed: Duration,
    /// The subjects and event recorded for velocity (stored with the decision so a restart
    /// can rebuild the store).
    pub subjects: Subjects,
    pub event: Event,
}

pub struct RiskEngine {
    active: ArcSwap<Loaded>,
    /// The operators' lists from the database (`list_store`), consulted beside the files'.
    kept_lists: ArcSwap<(Lists, i64)>,
    store: VelocityStore,
}

impl RiskEngine {
    pub fn new(loaded: Loaded, limits: StoreLimits) -> RiskEngine {
        assert!(
            loaded.rules.longest_window_ms() <= limits.horizon_ms,
            "the store keeps every window the rules read"
        );
        RiskEngine {
            active: ArcSwap::from_pointee(loaded),
            kept_lists: ArcSwap::from_pointee((Lists::default(), 0)),
            store: VelocityStore::new(limits),
        }
    }

    pub fn store(&self) -> &VelocityStore {
        &self.store
    }

    /// Takes back the velocity event of a decision whose transaction was not journaled (a
    /// repeat found after deciding, a limit the opening refused): the store counts exactly the
    /// decisions the journal holds, which is what a restart rebuilds.
    pub fn withdraw(&self, decision: &Decision) {
        self.store.forget(&decision.subjects, decision.event);
    }

    /// Replaces the operators' lists with a complete set read at `generation`.
    pub fn replace_kept_lists(&self, lists: Lists, generation: i64) {
        self.kept_lists.store(Arc::new((lists, generation)));
    }

    /// The generation of the operators' lists in use, and how many entries they hold.
    pub fn kept_lists(&self) -> (i64, usize) {
        let kept = self.kept_lists.load();
        (kept.1, kept.0.entries())
    }

    /// The active set's version.
    pub fn version(&self) -> String {
        self.active.load().version.clone()
    }

    pub fn active(&self) -> Arc<Loaded> {
        self.active.load_full()
    }

    /// Replaces the active set with a complete, checked one. Refused (the old one stays) when
    /// it reads a window longer than the store keeps.
    pub fn replace(&self, loaded: Loaded) -> Result<(), LoadError> {
        let longest = loaded.rules.longest_window_ms();
        if longest > self.store.limits().horizon_ms {
            return Err(LoadError {
                file: "rules".into(),
                line: None,
                reason: format!(
                    "a rule reads a {} s window; the velocity store keeps {} s (risk.velocity_horizon)",
                    longest / 1000,
                    self.store.limits().horizon_ms / 1000
                ),
            });
        }
        self.active.store(Arc::new(loaded));
        Ok(())
    }

    /// Decides `input`, recording it in the velocity store. `budget` bounds the time spent on
    /// rules; past it the remaining rules are skipped and `on_timeout` decides.
    pub fn decide(
        &self,
        input: &RiskInput<'_>,
        budget: Duration,
        on_timeout: OnTimeout,
    ) -> Decision {
        self.decide_with_keys(input, &[], budget, on_timeout)
    }

    /// [`RiskEngine::decide`] with subjects known only by their keys (a debit's card, id and
    /// phone come from its agreement, kept as keys): `keyed` adds to the input's own subjects.
    pub fn decide_with_keys(
        &self,
        input: &RiskInput<'_>,
        keyed: &[(Dimension, u64)],
        budget: Duration,
        on_timeout: OnTimeout,
    ) -> Decision {
        let started = Instant::now();
        // One set for the whole decision, however many reloads happen meanwhile.
        let loaded = self.active.load_full();
        let kept = self.kept_lists.load_full();
        let set = &loaded.rules;
        let mut subjects = subjects_of(input);
        for &(dimension, key) in keyed {
            assert!(
                subjects.iter().all(|(d, _)| *d != dimension),
                "a subject is given once: {}",
                dimension.name()
            );
            subjects.push((dimension, key));
        }
        let card_key = subjects
            .iter()
            .find(|(d, _)| *d == Dimension::Card)
            .map_or(0, |s| s.1);
        let event = Event {
            at_ms: input.at.timestamp_millis(),
            amount_fen: input.amount_fen,
            card: card_key,
            near_limit: input.single_limit_fen > 0
                && input.amount_fen * 10 >= input.single_limit_fen * 9,
        };
        let feature_values = self.store.observe(&subjects, &set.features, event, true);
        let mut slots = Vec::with_capacity(set.variables.len());
        let mut feature_at = 0;
        for variable in &set.variables {
            let slot = match variable {
                Variable::Plain(name) => plain_value(name, input),
                Variable::Listed(dimension, colour) => {
                    let key = subjects.iter().find(|(d, _)| d == dimension).map(|s| s.1);
                    Seen::Bool(key.is_some_and(|key| {
                        loaded.lists.contains(*colour, *dimension, key, input.ip)
                            || kept.0.contains(*colour, *dimension, key, input.ip)
                    }))
                }
                Variable::Feature(_) => {
                    feature_at += 1;
                    Seen::Int(feature_values[feature_at - 1])
                }
            };
            slots.push(slot.into_slot());
        }
        let resolver = Slots {
            index: &set.index,
            slots: &slots,
        };
        let mut context = cel::Context::with_env(set.env.clone());
        context.set_variable_resolver(&resolver);
        let mut fired = Vec::new();
        let mut errors = Vec::new();
        let mut worst = Outcome::Approve;
        let mut score = 0i64;
        let mut first_match: Option<Outcome> = None;
        let mut budget_exceeded = false;
        for (n, rule) in set
            .rules
            .iter()
            .filter(|r| r.applies_to(input.inst, input.kind))
            .enumerate()
        {
            // The clock every few rules: reading it per rule was a twentieth of a decision, and
            // a rule takes about a microsecond, so the budget is overrun by a few at most.
            if n % BUDGET_CHECK_EVERY == 0 && started.elapsed() > budget {
                budget_exceeded = true;
                break;
            }
            match rule.program.execute(&context) {
                Ok(cel::Value::Bool(true)) => {
                    fired.push(FiredRule {
                        id: rule.fired_id.clone(),
                        version: rule.version,
                        shadow: rule.shadow,
                        action: rule.fired_action.clone(),
                    });
                    if rule.shadow {
                        continue;
                    }
                    match rule.action {
                        Action::Outcome(o) => {
                            worst = worst.max(o);
                            first_match.get_or_insert(o);
                        }
                        Action::Score(points) => score = score.saturating_add(points),
                    }
                }
                Ok(_) => {}
                Err(e) => errors.push((rule.id.clone(), e.to_string())),
            }
        }
        let outcome = if budget_exceeded {
            match on_timeout {
                OnTimeout::Open => Outcome::Approve,
                OnTimeout::Closed => Outcome::Decline,
            }
        } else {
            match set.strategy.mode {
                Mode::FirstMatch => first_match.unwrap_or(Outcome::Approve),
                Mode::Worst => worst.max(score_outcome(&set.strategy, score)),
            }
        };
        drop(context);
        let seen = set
            .names
            .iter()
            .cloned()
            .zip(slots.iter().map(Slot::seen))
            .collect();
        Decision {
            outcome,
            version: loaded.version.clone(),
            fired,
            seen,
            score,
            errors,
            budget_exceeded,
            elapsed: started.elapsed(),
            subjects,
            event,
        }
    }
}

fn score_outcome(strategy: &Strategy, score: i64) -> Outcome {
    if score >= strategy.decline_at {
        Outcome::Decline
    } else if score >= strategy.review_at {
        Outcome::Review
    } else {
        Outcome::Approve
    }
}

fn subjects_of(input: &RiskInput<'_>) -> Subjects {
    let mut subjects = Vec::with_capacity(7);
    for (dimension, value) in [
        (Dimension::Card, input.card),
        (Dimension::IdNo, input.id_no),
        (Dimension::Phone, input.phone),
        (Dimension::Device, input.device),
        (Dimension::Merchant, input.merchant),
        (Dimension::Institution, Some(input.inst)),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            subjects.push((dimension, subject_key(dimension, value)));
        }
    }
    if let Some(ip) = input.ip {
        subjects.push((Dimension::Ip, subject_key(Dimension::Ip, &ip.to_string())));
    }
    subjects
}

/// A value a decision saw, as it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Int(i64),
    Bool(bool),
    Text(Arc<str>),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Int(i) => write!(f, "{i}"),
            Seen::Bool(b) => write!(f, "{b}"),
            Seen::Text(t) => f.write_str(t),
        }
    }
}

impl Seen {
    fn into_slot(self) -> Slot {
        match self {
            Seen::Int(i) => Slot::Int(i.into()),
            Seen::Bool(b) => Slot::Bool(b.into()),
            Seen::Text(t) => Slot::Text(cel::common::types::CelString::from(t.to_string()), t),
        }
    }
}

/// One variable's value as CEL reads it: borrowed by every rule of the decision, never
/// allocated per read (a context of named variables allocated a key and a box per variable
/// and compared names in a tree on every read).
enum Slot {
    Int(cel::common::types::CelInt),
    Bool(cel::common::types::CelBool),
    Text(cel::common::types::CelString<'static>, Arc<str>),
}

impl Slot {
    fn as_val(&self) -> &dyn cel::common::value::Val {
        match self {
            Slot::Int(i) => i,
            Slot::Bool(b) => b,
            Slot::Text(t, _) => t,
        }
    }

    fn seen(&self) -> Seen {
        match self {
            Slot::Int(i) => Seen::Int(*i.inner()),
            Slot::Bool(b) => Seen::Bool(bool::from(*b)),
            Slot::Text(_, t) => Seen::Text(t.clone()),
        }
    }
}

struct Slots<'a> {
    index: &'a foldhash::HashMap<String, usize>,
    slots: &'a [Slot],
}

impl cel::context::VariableResolver for Slots<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<cel::common::value::CowVal<'b, 'b>> {
        self.index
            .get(variable)
            .map(|&at| cel::common::value::CowVal::Borrowed(self.slots[at].as_val()))
    }
}

fn plain_value(name: &str, input: &RiskInput<'_>) -> Seen {
    let text = |s: &str| Seen::Text(Arc::from(s));
    match name {
        "kind" => text(input.kind),
        "inst" => text(input.inst),
        "amount_fen" => Seen::Int(input.amount_fen),
        "local_hour" => {
            let china = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8");
            Seen::Int(i64::from(input.at.with_timezone(&china).hour()))
        }
        "merchant" => text(input.merchant.unwrap_or("")),
        "has_device" => Seen::Bool(input.device.is_some()),
        "has_ip" => Seen::Bool(input.ip.is_some()),
        "single_limit_fen" => Seen::Int(input.single_limit_fen),
        "daily_limit_fen" => Seen::Int(input.daily_limit_fen),
        "agreement_age_s" => Seen::Int(input.agreement_age_s),
        "holder_mismatch" => Seen::Bool(input.holder_mismatch),
        other => unreachable!("variable {other} is checked at load"),
    }
}
