//! The risk stage of the payment flows: what a debit or credit tells the risk engine, and how
//! its decision becomes an opening (approved: on to the core; review: held in IN_REVIEW with a
//! case; decline: FAILED with 3015) and a stored decision.
//!
//! Owns: the risk input of a payment (the card, id and phone of a debit come from its
//! agreement, as subject keys, cached), the decision's journal form (subjects sealed under the
//! data key), and the velocity rebuild from stored decisions at start.
//! Must never: let a transaction reach the core without a decision when the engine is
//! configured, keep a card, id or phone number in the cache (keys only), or leave a velocity
//! event recorded for a decision the journal does not hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;

use super::journal::{self, OpenAs, Opening};
use super::request::PaymentContext;
use super::{FlowError, Flows};
use crate::config::InstitutionConfig;
use crate::risk::features::{Dimension, Event};
use crate::risk::rules::Outcome;
use crate::risk::{Decision, OnTimeout, RiskEngine, RiskInput, subject_key};

/// Agreements whose subject keys are cached; past it the cache starts over (a miss costs one
/// read of the agreement).
const HOLDER_CACHE_MAX: usize = 65_536;
/// Decisions read per round trip by the rebuild.
const REBUILD_BATCH: i64 = 10_000;

/// The risk engine as the flows use it, with the node's defaults.
pub struct Screening {
    pub engine: Arc<RiskEngine>,
    pub budget: Duration,
    pub fail_open: bool,
    /// By agreement number (unique across institutions; the holder names its institution).
    holders: Mutex<HashMap<String, Holder>>,
}

impl Screening {
    pub fn new(engine: Arc<RiskEngine>, budget: Duration, fail_open: bool) -> Screening {
        Screening {
            engine,
            budget,
            fail_open,
            holders: Mutex::new(HashMap::new()),
        }
    }
}

/// An ACTIVE agreement as risk sees it: subject keys, never numbers. Immutable once ACTIVE
/// (the account and holder of an agreement never change), so caching it is safe; its state is
/// checked again by the opening statement.
#[derive(Debug, Clone)]
struct Holder {
    inst_id: Arc<str>,
    card: u64,
    id: Option<u64>,
    phone: Option<u64>,
    confirmed_at: DateTime<Utc>,
}

/// A decision with its journal form.
pub(super) struct Screened {
    pub decision: Decision,
    fired: String,
    seen: String,
    errors: String,
    subjects_enc: String,
    reason: String,
}

impl Screened {
    pub fn open_as(&self) -> OpenAs {
        match self.decision.outcome {
            Outcome::Approve => OpenAs::SentToCore,
            Outcome::Review => OpenAs::InReview,
            Outcome::Decline => OpenAs::Received,
        }
    }

    /// Why the transaction went where it went, for its history.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn row<'a>(&'a self, kind: &'a str, amount_fen: i64) -> journal::risk::DecisionRow<'a> {
        let d = &self.decision;
        journal::risk::DecisionRow {
            kind,
            outcome: d.outcome.name(),
            ruleset: &d.version,
            score: d.score,
            fired: &self.fired,
            seen: &self.seen,
            errors: &self.errors,
            budget_exceeded: d.budget_exceeded,
            elapsed_us: i64::try_from(d.elapsed.as_micros()).unwrap_or(i64::MAX),
            amount_fen,
            near_limit: d.event.near_limit,
            subjects_enc: &self.subjects_enc,
            decided_at: DateTime::from_timestamp_millis(d.event.at_ms).expect("a decision's time"),
        }
    }

    pub fn opening<'a>(&'a self, row: &'a journal::risk::DecisionRow<'a>) -> Opening<'a> {
        Opening {
            risk_reason: &self.reason,
            open_as: self.open_as(),
            decision: Some(row),
        }
    }
}

/// A debit the risk stage could not decide because its agreement cannot be debited: the
/// answer is the agreement's, not risk's.
pub(super) enum Undecidable {
    NoAgreement,
    NotActive(String),
}

fn subjects_text(subjects: &[(Dimension, u64)]) -> String {
    subjects
        .iter()
        .map(|(d, key)| format!("{}={key:016x}", d.name()))
        .collect::<Vec<_>>()
        .join(";")
}

fn parse_subjects(text: &str) -> Option<Vec<(Dimension, u64)>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(';')
        .map(|part| {
            let (name, key) = part.split_once('=')?;
            Some((Dimension::parse(name)?, u64::from_str_radix(key, 16).ok()?))
        })
        .collect()
}

impl Flows {
    pub fn with_screening(mut self, screening: Screening) -> Flows {
        self.screening = Some(screening);
        self
    }

    pub fn screening(&self) -> Option<&Screening> {
        self.screening.as_ref()
    }

    pub(super) fn seal_holder(&self, id_no: &str, phone: &str) -> Result<String, FlowError> {
        let plain = zeroize::Zeroizing::new(format!("{id_no}\u{0}{phone}"));
        self.data_key
            .encrypt_field("holder", &plain)
            .map_err(|e| FlowError::DataKey(e.to_string()))
    }

    fn holder(
        &self,
        conn: &mut PgConnection,
        screening: &Screening,
        inst_id: &str,
        agreement_no: &str,
    ) -> Result<Result<Holder, Undecidable>, FlowError> {
        // Looked up by &str: a hit allocates nothing.
        if let Some(holder) = screening
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agreement_no)
            .filter(|h| &*h.inst_id == inst_id)
        {
            return Ok(Ok(holder.clone()));
        }
        let Some(found) = journal::risk::agreement_for_risk(conn, inst_id, agreement_no)? else {
            return Ok(Err(Undecidable::NoAgreement));
        };
        if found.state != "ACTIVE" {
            return Ok(Err(Undecidable::NotActive(found.state)));
        }
        let account = self.open_account(&found.account_enc)?;
        let (mut id, mut phone) = (None, None);
        if let Some(sealed) = &found.holder_enc {
            let plain = self
                .data_key
                .decrypt_field("holder", sealed)
                .map_err(|e| FlowError::DataKey(e.to_string()))?;
            let (id_no, phone_no) = plain.split_once('\u{0}').ok_or_else(|| {
                FlowError::DataKey(format!("agreement {agreement_no}: holder data malformed"))
            })?;
            id = Some(subject_key(Dimension::IdNo, id_no));
            phone = Some(subject_key(Dimension::Phone, phone_no));
        }
        let holder = Holder {
            inst_id: Arc::from(inst_id),
            card: subject_key(Dimension::Card, &account),
            id,
            phone,
            confirmed_at: found.updated_at,
        };
        let mut cache = screening.holders.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= HOLDER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(agreement_no.to_string(), holder.clone());
        Ok(Ok(holder))
    }

    /// Decides a debit under `agreement_no`; records its velocity event.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn screen_debit(
        &self,
        conn: &mut PgConnection,
        screening: &Screening,
        inst: &InstitutionConfig,
        agreement_no: &str,
        amount_fen: i64,
        context: &PaymentContext,
        now: DateTime<Utc>,
    ) -> Result<Result<Screened, Undecidable>, FlowError> {
        let holder = match self.holder(conn, screening, &inst.id, agreement_no)? {
            Ok(holder) => holder,
            Err(undecidable) => return Ok(Err(undecidable)),
        };
        let mut keyed = vec![(Dimension::Card, holder.card)];
        keyed.extend(holder.id.map(|k| (Dimension::IdNo, k)));
        keyed.extend(holder.phone.map(|k| (Dimension::Phone, k)));
        let mut input = risk_input(
            "DEBIT",
            inst,
            amount_fen,
            None,
            context,
            (now - holder.confirmed_at).num_seconds().max(0),
            now,
        );
        // The payer the institution names is not the holder the bank verified at signing.
        input.holder_mismatch = match (&context.payer_id_no, holder.id) {
            (Some(payer), Some(holder_id)) => subject_key(Dimension::IdNo, payer) != holder_id,
            _ => false,
        };
        self.decided(screening, inst, &input, &keyed).map(Ok)
    }

    /// Decides a credit to `account_no`; records its velocity event.
    pub(super) fn screen_credit(
        &self,
        screening: &Screening,
        inst: &InstitutionConfig,
        account_no: &str,
        amount_fen: i64,
        context: &PaymentContext,
        now: DateTime<Utc>,
    ) -> Result<Screened, FlowError> {
        let input = risk_input(
            "CREDIT",
            inst,
            amount_fen,
            Some(account_no),
            context,
            -1,
            now,
        );
        self.decided(screening, inst, &input, &[])
    }

    fn decided(
        &self,
        screening: &Screening,
        inst: &InstitutionConfig,
        input: &RiskInput<'_>,
        keyed: &[(Dimension, u64)],
    ) -> Result<Screened, FlowError> {
        let fail_open = inst.risk_fail_open.unwrap_or(screening.fail_open);
        let decision = screening.engine.decide_with_keys(
            input,
            keyed,
            inst.risk_budget.unwrap_or(screening.budget),
            if fail_open {
                OnTimeout::Open
            } else {
                OnTimeout::Closed
            },
        );
        let fired = decision
            .fired
            .iter()
            .map(|f| {
                format!(
                    "{}@{}:{}{}",
                    f.id,
                    f.version,
                    f.action,
                    if f.shadow { "(shadow)" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let seen = decision
            .seen
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(";");
        let errors = decision
            .errors
            .iter()
            .map(|(rule, error)| format!("{rule}: {error}"))
            .collect::<Vec<_>>()
            .join("; ");
        let subjects_enc = match self
            .data_key
            .encrypt_field("risk-subjects", &subjects_text(&decision.subjects))
        {
            Ok(sealed) => sealed,
            Err(e) => {
                screening.engine.withdraw(&decision);
                return Err(FlowError::DataKey(e.to_string()));
            }
        };
        let verb = match decision.outcome {
            Outcome::Approve => "approved",
            Outcome::Review => "held for review",
            Outcome::Decline => "declined",
        };
        let mut reason = format!("{verb} by risk {}", decision.version);
        if decision.budget_exceeded {
            reason.push_str(&format!(
                " (time budget exceeded: fail-{})",
                if fail_open { "open" } else { "closed" }
            ));
        }
        if !fired.is_empty() {
            reason.push_str(": ");
            reason.push_str(&fired);
        }
        Ok(Screened {
            decision,
            fired,
            seen,
            errors,
            subjects_enc,
            reason,
        })
    }

    /// Takes a decision's velocity event back: its transaction was not journaled.
    pub(super) fn withdraw(&self, screened: &Screened) {
        if let Some(screening) = &self.screening {
            screening.engine.withdraw(&screened.decision);
        }
    }

    /// Loads the velocity store from the decisions of the last `horizon`, oldest first, so a
    /// restart keeps everybody's counts. Returns how many decisions were loaded.
    pub fn rebuild_velocity(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<u64, FlowError> {
        let Some(screening) = &self.screening else {
            return Ok(0);
        };
        let store = screening.engine.store();
        let since = now - chrono::Duration::milliseconds(store.limits().horizon_ms);
        let mut after = None;
        let mut loaded = 0u64;
        loop {
            let rows = journal::risk::decisions_for_rebuild(conn, since, after, REBUILD_BATCH)?;
            let Some(last) = rows.last() else {
                break;
            };
            after = Some((last.0, last.1));
            for (at, txn_id, amount_fen, near_limit, sealed) in &rows {
                let text = self
                    .data_key
                    .decrypt_field("risk-subjects", sealed)
                    .map_err(|e| FlowError::DataKey(format!("decision of {txn_id}: {e}")))?;
                let subjects = parse_subjects(&text).ok_or_else(|| {
                    FlowError::DataKey(format!("decision of {txn_id}: subjects malformed"))
                })?;
                let card = subjects
                    .iter()
                    .find(|(d, _)| *d == Dimension::Card)
                    .map_or(0, |s| s.1);
                store.preload(
                    &subjects,
                    Event {
                        at_ms: at.timestamp_millis(),
                        amount_fen: *amount_fen,
                        card,
                        near_limit: *near_limit,
                    },
                );
                loaded += 1;
            }
            if (rows.len() as i64) < REBUILD_BATCH {
                break;
            }
        }
        Ok(loaded)
    }
}

fn risk_input<'a>(
    kind: &'a str,
    inst: &'a InstitutionConfig,
    amount_fen: i64,
    card: Option<&'a str>,
    context: &'a PaymentContext,
    agreement_age_s: i64,
    now: DateTime<Utc>,
) -> RiskInput<'a> {
    RiskInput {
        kind,
        inst: &inst.id,
        amount_fen,
        at: now,
        card,
        id_no: None,
        phone: None,
        device: context.device.as_deref(),
        ip: context.ip,
        merchant: context.merchant.as_deref(),
        single_limit_fen: inst.single_limit_fen,
        daily_limit_fen: inst.daily_limit_fen,
        agreement_age_s,
        holder_mismatch: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_through_their_text() {
        let subjects = vec![
            (Dimension::Card, 0x0123_4567_89ab_cdef),
            (Dimension::Ip, u64::MAX),
            (Dimension::Institution, 0),
        ];
        let text = subjects_text(&subjects);
        assert_eq!(parse_subjects(&text), Some(subjects));
        assert_eq!(parse_subjects(""), Some(vec![]));
        assert_eq!(parse_subjects("card=xyz"), None);
        assert_eq!(parse_subjects("planet=01"), None);
    }
}
