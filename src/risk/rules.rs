//! Rules and the strategy that combines them, as risk analysts write them: `rules/*.toml` and
//! `strategy.toml` under the risk directory (docs/risk-rules.md). Conditions are CEL
//! expressions compiled by the `cel` crate.
//!
//! Owns: parsing rule files, compiling every condition, checking every variable a condition
//! names (a typo is a load error with its file and line, not a rule that never fires), and a
//! trial run of every rule against neutral values so a type error is caught before the set goes
//! live. Evaluation of one rule set against one decision's variables.
//! Must never: hand out a half-loaded set: `load` returns a complete set or an error.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Deserialize;

use super::features::FeatureSpec;
use super::{LoadError, line_of};

/// What a decision does to a transaction, in increasing severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Approve,
    Review,
    Decline,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Approve => "APPROVE",
            Outcome::Review => "REVIEW",
            Outcome::Decline => "DECLINE",
        }
    }
}

/// What a firing rule asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Outcome(Outcome),
    /// Adds points; the strategy's thresholds turn the total into an outcome.
    Score(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The most severe outcome among firing rules, and the score total against the thresholds.
    Worst,
    /// The first firing rule (files in name order, rules in file order) decides.
    FirstMatch,
}

#[derive(Debug, Clone)]
pub struct Strategy {
    pub mode: Mode,
    pub review_at: i64,
    pub decline_at: i64,
    /// The analysts' own label for the set (`strategy.toml` `version`), if any.
    pub label: Option<String>,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            mode: Mode::Worst,
            review_at: 50,
            decline_at: 100,
            label: None,
        }
    }
}

pub struct Rule {
    pub id: String,
    pub description: String,
    pub version: u32,
    pub shadow: bool,
    /// Empty: every institution.
    pub institutions: Vec<String>,
    /// Empty: every kind (DEBIT, CREDIT, REFUND).
    pub kinds: Vec<String>,
    pub action: Action,
    pub condition: String,
    pub program: cel::Program,
    pub file: String,
    pub line: usize,
    /// `id` and the action as a decision records them (shared, so a firing rule costs no
    /// allocation).
    pub fired_id: Arc<str>,
    pub fired_action: Arc<str>,
}

impl Rule {
    pub fn applies_to(&self, inst: &str, kind: &str) -> bool {
        (self.institutions.is_empty() || self.institutions.iter().any(|i| i == inst))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind))
    }
}

/// The plain variables a rule may read besides velocity features; `Text` ones are strings.
pub const VARIABLES: [(&str, VarType); 11] = [
    ("kind", VarType::Text),
    ("inst", VarType::Text),
    ("amount_fen", VarType::Int),
    ("local_hour", VarType::Int),
    ("merchant", VarType::Text),
    ("has_device", VarType::Bool),
    ("has_ip", VarType::Bool),
    ("single_limit_fen", VarType::Int),
    ("daily_limit_fen", VarType::Int),
    ("agreement_age_s", VarType::Int),
    ("holder_mismatch", VarType::Bool),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarType {
    Int,
    Text,
    Bool,
}

/// A variable one rule set reads, and how it is computed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variable {
    Plain(&'static str),
    /// `{dimension}_{blacklisted|whitelisted}`.
    Listed(super::features::Dimension, super::lists::Colour),
    Feature(FeatureSpec),
}

impl Variable {
    pub fn name(&self) -> String {
        match self {
            Variable::Plain(name) => name.to_string(),
            Variable::Listed(d, c) => format!("{}_{}", d.name(), c.name()),
            Variable::Feature(spec) => spec.name.clone(),
        }
    }

    fn parse(name: &str) -> Option<Variable> {
        if let Some((plain, _)) = VARIABLES.iter().find(|(n, _)| *n == name) {
            return Some(Variable::Plain(plain));
        }
        for colour in [super::lists::Colour::Black, super::lists::Colour::White] {
            if let Some(dim) = name.strip_suffix(&format!("_{}", colour.name()))
                && let Some(d) = super::features::Dimension::parse(dim)
                && super::lists::LISTED.contains(&d)
            {
                return Some(Variable::Listed(d, colour));
            }
        }
        FeatureSpec::parse(name).map(Variable::Feature)
    }

    /// A neutral value of the right type, for the trial run at load.
    fn neutral(&self) -> cel::Value {
        match self {
            Variable::Plain(name) => match VARIABLES.iter().find(|(n, _)| n == name).map(|v| v.1) {
                Some(VarType::Text) => cel::Value::String(Arc::new(String::new())),
                Some(VarType::Bool) => cel::Value::Bool(false),
                _ => cel::Value::Int(0),
            },
            Variable::Listed(..) => cel::Value::Bool(false),
            Variable::Feature(_) => cel::Value::Int(0),
        }
    }
}

/// A compiled, checked rule set.
pub struct RuleSet {
    /// The environment the rules were compiled in; each decision's context shares it (building
    /// the standard library's function table per decision was most of a decision's cost).
    pub env: Arc<cel::Env>,
    pub rules: Vec<Rule>,
    pub strategy: Strategy,
    /// Every variable some rule reads, computed once per decision.
    pub variables: Vec<Variable>,
    /// Their names, in the same order (shared by every decision's record of what it saw).
    pub names: Vec<Arc<str>>,
    /// Name -> position in `variables`: how a rule's variable reaches its value.
    pub index: foldhash::HashMap<String, usize>,
    /// The velocity features among `variables`, in the same order (what the store computes).
    pub features: Vec<crate::risk::features::FeatureSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    id: toml::Spanned<String>,
    description: String,
    version: u32,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    institutions: Vec<String>,
    #[serde(default)]
    kinds: Vec<String>,
    when: toml::Spanned<String>,
    action: toml::Spanned<String>,
    score: Option<i64>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyFile {
    version: Option<String>,
    #[serde(default)]
    strategy: StrategySection,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StrategySection {
    mode: Option<String>,
    review_at: Option<i64>,
    decline_at: Option<i64>,
}

/// Bounds on what analysts may load.
pub const MAX_RULES: usize = 5_000;
const MAX_CONDITION: usize = 4_096;

pub fn parse_strategy(file: &str, text: &str) -> Result<Strategy, LoadError> {
    let error = |line: Option<usize>, reason: String| LoadError {
        file: file.to_string(),
        line,
        reason,
    };
    let parsed: StrategyFile = toml::from_str(text).map_err(|e| {
        error(
            e.span().map(|s| line_of(text, s.start)),
            e.message().to_string(),
        )
    })?;
    let s = parsed.strategy;
    let mode = match s.mode.as_deref() {
        None | Some("worst") => Mode::Worst,
        Some("first_match") => Mode::FirstMatch,
        Some(other) => {
            return Err(error(
                None,
                format!("strategy.mode = \"{other}\"; use \"worst\" or \"first_match\""),
            ));
        }
    };
    let defaults = Strategy::default();
    let strategy = Strategy {
        mode,
        review_at: s.review_at.unwrap_or(defaults.review_at),
        decline_at: s.decline_at.unwrap_or(defaults.decline_at),
        label: parsed.version,
    };
    if strategy.review_at <= 0 || strategy.decline_at < strategy.review_at {
        return Err(error(
            None,
            "strategy: 0 < review_at <= decline_at is required".into(),
        ));
    }
    Ok(strategy)
}

/// Compiles the rules of one file and appends them to `rules`.
pub fn add_rule_file(
    rules: &mut Vec<Rule>,
    env: &Arc<cel::Env>,
    strategy: &Strategy,
    file: &str,
    text: &str,
) -> Result<(), LoadError> {
    let error = |line: Option<usize>, reason: String| LoadError {
        file: file.to_string(),
        line,
        reason,
    };
    let parsed: RuleFile = toml::from_str(text).map_err(|e| {
        error(
            e.span().map(|s| line_of(text, s.start)),
            e.message().to_string(),
        )
    })?;
    for entry in parsed.rule {
        let line = line_of(text, entry.id.span().start);
        let id = entry.id.get_ref().trim().to_string();
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(error(
                Some(line),
                format!("rule id \"{id}\" must be 1-64 letters, digits, - or _"),
            ));
        }
        if rules.iter().any(|r| r.id == id) {
            return Err(error(Some(line), format!("rule id \"{id}\" is used twice")));
        }
        if rules.len() >= MAX_RULES {
            return Err(error(Some(line), format!("more than {MAX_RULES} rules")));
        }
        for kind in &entry.kinds {
            if !matches!(kind.as_str(), "DEBIT" | "CREDIT" | "REFUND") {
                return Err(error(
                    Some(line),
                    format!("rule {id}: kind \"{kind}\"; use DEBIT, CREDIT or REFUND"),
                ));
            }
        }
        let action_line = line_of(text, entry.action.span().start);
        let action = match (entry.action.get_ref().as_str(), entry.score) {
            ("approve", None) => Action::Outcome(Outcome::Approve),
            ("review", None) => Action::Outcome(Outcome::Review),
            ("decline", None) => Action::Outcome(Outcome::Decline),
            ("score", Some(points)) if points != 0 && strategy.mode == Mode::Worst => {
                Action::Score(points)
            }
            ("score", Some(_)) if strategy.mode == Mode::FirstMatch => {
                return Err(error(
                    Some(action_line),
                    format!("rule {id}: scores need strategy.mode = \"worst\""),
                ));
            }
            ("score", _) => {
                return Err(error(
                    Some(action_line),
                    format!("rule {id}: action \"score\" needs a non-zero score"),
                ));
            }
            (other, Some(_)) if other != "score" => {
                return Err(error(
                    Some(action_line),
                    format!("rule {id}: score is only for action \"score\""),
                ));
            }
            (other, _) => {
                return Err(error(
                    Some(action_line),
                    format!("rule {id}: action \"{other}\"; use approve, review, decline or score"),
                ));
            }
        };
        let condition = entry.when.get_ref().clone();
        let when_line = line_of(text, entry.when.span().start);
        if condition.len() > MAX_CONDITION {
            return Err(error(
                Some(when_line),
                format!("rule {id}: condition longer than {MAX_CONDITION} bytes"),
            ));
        }
        let program = env.compile(&condition).map_err(|e| {
            error(
                Some(when_line),
                format!("rule {id}: the condition does not compile: {e}"),
            )
        })?;
        let mut variables = Vec::new();
        for name in program.references().variables() {
            let Some(variable) = Variable::parse(name) else {
                return Err(error(
                    Some(when_line),
                    format!(
                        "rule {id}: unknown variable `{name}` (docs/risk-rules.md lists the variables; velocity features are DIMENSION_MEASURE_WINDOW such as card_count_1h)"
                    ),
                ));
            };
            variables.push(variable);
        }
        // A trial run with neutral values catches type errors (a string compared with a
        // number, a condition that is not true or false) before the set goes live.
        let mut context = cel::Context::with_env(env.clone());
        for variable in &variables {
            context.add_variable_from_value(variable.name(), variable.neutral());
        }
        match program.execute(&context) {
            Ok(cel::Value::Bool(_)) => {}
            Ok(other) => {
                return Err(error(
                    Some(when_line),
                    format!("rule {id}: the condition must be true or false, it gives {other:?}"),
                ));
            }
            Err(e) => {
                return Err(error(
                    Some(when_line),
                    format!("rule {id}: the condition fails on a trial run: {e}"),
                ));
            }
        }
        if !entry.enabled {
            continue;
        }
        rules.push(Rule {
            fired_id: Arc::from(id.as_str()),
            fired_action: Arc::from(match action {
                Action::Outcome(o) => o.name().to_string(),
                Action::Score(points) => format!("SCORE {points}"),
            }),
            id,
            description: entry.description,
            version: entry.version,
            shadow: entry.shadow,
            institutions: entry.institutions,
            kinds: entry.kinds,
            action,
            condition,
            program,
            file: file.to_string(),
            line,
        });
    }
    Ok(())
}

impl RuleSet {
    pub fn new(env: Arc<cel::Env>, rules: Vec<Rule>, strategy: Strategy) -> RuleSet {
        let mut variables = BTreeSet::new();
        for rule in &rules {
            for name in rule.program.references().variables() {
                variables.insert(Variable::parse(name).expect("checked at load"));
            }
        }
        let variables: Vec<Variable> = variables.into_iter().collect();
        let names: Vec<Arc<str>> = variables.iter().map(|v| Arc::from(v.name())).collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(at, name)| (name.to_string(), at))
            .collect();
        let features = variables
            .iter()
            .filter_map(|v| match v {
                Variable::Feature(spec) => Some(spec.clone()),
                _ => None,
            })
            .collect();
        RuleSet {
            env,
            rules,
            strategy,
            variables,
            names,
            index,
            features,
        }
    }

    /// The longest velocity window any rule reads (the store must keep at least this much).
    pub fn longest_window_ms(&self) -> i64 {
        self.variables
            .iter()
            .filter_map(|v| match v {
                Variable::Feature(spec) => Some(spec.window_ms),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}
