//! The core-banking simulator: customer accounts and balances, agreement codes, postings.
//!
//! It stands in for the bank's core in `make run`, tests and benchmarks (the core belongs to
//! the bank, so kunpay ships this as a product part). The same logic runs in process here and,
//! later, behind the MQ bridge as `kunpay-coresim`. Fault injection (`Faults`) makes it slow,
//! lossy or unavailable on purpose.
//! Must never: post the same transaction id twice, let a balance go negative, or accept a
//! posting on a frozen or unknown account.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{
    BindOutcome, BindRejection, BindRequest, CodeCheck, CoreError, CoreLink, Posting, PostingKind,
    PostingOutcome, Rejection, Reversal, ReversalOutcome, ReversalRefusal,
};

/// How long a verification code stays valid.
pub const CODE_TTL: Duration = Duration::from_secs(300);
/// Bounds so a long benchmark or a hostile test cannot grow the simulator without limit.
pub const MAX_POSTINGS: usize = 10_000_000;
pub const MAX_PENDING_CODES: usize = 1_000_000;

#[derive(Debug, Clone)]
pub struct Account {
    pub account_no: String,
    pub name: String,
    pub id_no: String,
    pub phone: String,
    pub balance_fen: i64,
    pub frozen: bool,
}

/// Deliberate misbehaviour, for tests of kunpay's handling of a bad core.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added to every call.
    pub latency: Duration,
    /// Every call fails as unavailable (the request never arrived).
    pub unavailable: bool,
    /// Postings are applied but the answer is lost (kunpay sees a timeout).
    pub lose_replies: bool,
    /// A query for an id the core never saw answers "not found" without fencing the id, so
    /// the posting is still applied if it arrives later: a core that breaks the contract in
    /// `CoreLink::query_posting`, which kunpay's reversals exist for.
    pub queries_do_not_fence: bool,
}

/// What the simulated core knows about one transaction id.
#[derive(Debug, Clone)]
enum Recorded {
    /// A query or a reversal found nothing under this id: a later posting is `TooLate`.
    Fenced,
    Applied {
        posting: Posting,
        outcome: PostingOutcome,
        /// The reversal's reference once the posting was undone.
        reversed: Option<String>,
    },
}

struct PendingCode {
    code: String,
    issued: Instant,
}

#[derive(Default)]
struct Ledger {
    accounts: HashMap<String, Account>,
    postings: HashMap<Uuid, Recorded>,
    codes: HashMap<String, PendingCode>,
    /// Codes "sent by SMS", readable by tests and by the dev console in place of a phone.
    outbox: HashMap<String, String>,
}

pub struct CoreSimulator {
    ledger: Mutex<Ledger>,
    faults: Mutex<Faults>,
    next_ref: AtomicU64,
}

impl Default for CoreSimulator {
    fn default() -> Self {
        CoreSimulator::new()
    }
}

impl CoreSimulator {
    pub fn new() -> CoreSimulator {
        CoreSimulator {
            ledger: Mutex::new(Ledger::default()),
            faults: Mutex::new(Faults::default()),
            next_ref: AtomicU64::new(1),
        }
    }

    /// A simulator with demo customers for `make run` and benchmarks.
    pub fn with_demo_accounts() -> CoreSimulator {
        let sim = CoreSimulator::new();
        for account in demo_accounts() {
            sim.open_account(account);
        }
        sim
    }

    /// Adds `count` generated customers (see [`generated_account`]), for load tests.
    pub fn with_generated_accounts(self, count: u32) -> CoreSimulator {
        for index in 0..count {
            self.open_account(generated_account(index));
        }
        self
    }

    pub fn open_account(&self, account: Account) {
        assert!(
            account.balance_fen >= 0,
            "a simulated account starts with a non-negative balance"
        );
        self.lock()
            .accounts
            .insert(account.account_no.clone(), account);
    }

    pub fn set_frozen(&self, account_no: &str, frozen: bool) {
        if let Some(account) = self.lock().accounts.get_mut(account_no) {
            account.frozen = frozen;
        }
    }

    pub fn balance(&self, account_no: &str) -> Option<i64> {
        self.lock().accounts.get(account_no).map(|a| a.balance_fen)
    }

    /// The last code sent to a phone number (the simulator's SMS gateway).
    pub fn last_code_sent_to(&self, phone: &str) -> Option<String> {
        self.lock().outbox.get(phone).cloned()
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // A panic while holding the lock cannot leave a half-applied posting: every mutation
        // below is a single statement after its checks.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn before_call(&self) -> Result<Faults, CoreError> {
        let faults = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !faults.latency.is_zero() {
            std::thread::sleep(faults.latency);
        }
        if faults.unavailable {
            return Err(CoreError::Unavailable("simulated outage".into()));
        }
        Ok(faults)
    }
}

/// Generated customer `index`: a deterministic card number, name, valid resident id and phone,
/// and a balance large enough for any benchmark.
/// The three demo customers every simulator starts with (docs/protocol.md's examples use them).
pub fn demo_accounts() -> Vec<Account> {
    [
        (
            "6222021234567890123",
            "张三",
            "110101199003077774",
            "13812345678",
            100_000_000,
        ),
        (
            "6222021234567890131",
            "李四",
            "110101198507071232",
            "13912345678",
            50_000_000,
        ),
        (
            "6217001234567890149",
            "王五",
            "440301198001010026",
            "13512345678",
            0,
        ),
    ]
    .into_iter()
    .map(|(account_no, name, id_no, phone, balance_fen)| Account {
        account_no: account_no.into(),
        name: name.into(),
        id_no: id_no.into(),
        phone: phone.into(),
        balance_fen,
        frozen: false,
    })
    .collect()
}

pub fn generated_account(index: u32) -> Account {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let id_body = format!("1101011990{:07}", index % 10_000_000);
    let sum: u32 = id_body
        .bytes()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    Account {
        account_no: format!("62220299{:011}", index),
        name: format!("客户{index}"),
        id_no: format!("{id_body}{}", CHECK[(sum % 11) as usize] as char),
        phone: format!("137{:08}", index % 100_000_000),
        balance_fen: 1_000_000_000_000,
        frozen: false,
    }
}

/// The simulator's "SMS": the code it sends for an agreement. Deterministic so that tests and
/// demos in another process can complete a signing; a real core sends a random code by SMS.
pub fn verification_code(agreement_no: &str) -> String {
    let digest = crate::crypto::sm3::digest(
        format!("kunpay core simulator code\u{0}{agreement_no}").as_bytes(),
    );
    let number = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 1_000_000;
    format!("{number:06}")
}

/// Why the simulated core refuses to bind this account for `request`, if it does: the same
/// rule for the in-memory ledger and its database twin (`sim_store.rs`).
pub(crate) fn binding_refusal(
    name: &str,
    id_no: &str,
    phone: &str,
    frozen: bool,
    request: &BindRequest,
) -> Option<BindRejection> {
    if frozen {
        Some(BindRejection::Frozen)
    } else if name != request.account_name || id_no != request.id_no || phone != request.phone {
        Some(BindRejection::DetailsMismatch)
    } else {
        None
    }
}

/// The simulated core's customer number for an account.
pub(crate) fn core_customer(account_no: &str) -> String {
    format!(
        "C{}",
        hex::encode(&crate::crypto::sm3::digest(account_no.as_bytes())[..4])
    )
}

impl CoreLink for CoreSimulator {
    fn request_binding(&self, request: &BindRequest) -> Result<BindOutcome, CoreError> {
        self.before_call()?;
        let code = verification_code(&request.agreement_no);
        let mut ledger = self.lock();
        let Some(account) = ledger.accounts.get(&request.account_no) else {
            return Ok(BindOutcome::Rejected(BindRejection::UnknownAccount));
        };
        if let Some(refused) = binding_refusal(
            &account.name,
            &account.id_no,
            &account.phone,
            account.frozen,
            request,
        ) {
            return Ok(BindOutcome::Rejected(refused));
        }
        let phone = account.phone.clone();
        if ledger.codes.len() >= MAX_PENDING_CODES {
            let now = Instant::now();
            ledger
                .codes
                .retain(|_, c| now.duration_since(c.issued) < CODE_TTL);
        }
        ledger.codes.insert(
            request.agreement_no.clone(),
            PendingCode {
                code: code.clone(),
                issued: Instant::now(),
            },
        );
        ledger.outbox.insert(phone, code);
        Ok(BindOutcome::CodeSent {
            core_customer: core_customer(&request.account_no),
        })
    }

    fn check_code(&self, agreement_no: &str, code: &str) -> Result<CodeCheck, CoreError> {
        self.before_call()?;
        let mut ledger = self.lock();
        let Some(pending) = ledger.codes.get(agreement_no) else {
            return Ok(CodeCheck::Wrong);
        };
        if pending.issued.elapsed() > CODE_TTL {
            ledger.codes.remove(agreement_no);
            return Ok(CodeCheck::Expired);
        }
        if pending.code != code {
            return Ok(CodeCheck::Wrong);
        }
        ledger.codes.remove(agreement_no);
        Ok(CodeCheck::Valid)
    }

    fn post(&self, posting: &Posting) -> Result<PostingOutcome, CoreError> {
        let faults = self.before_call()?;
        assert!(
            posting.amount_fen > 0,
            "kunpay never posts a non-positive amount"
        );
        let core_ref = format!("CORE{:012}", self.next_ref.fetch_add(1, Ordering::Relaxed));
        let mut ledger = self.lock();
        if let Some(recorded) = ledger.postings.get(&posting.txn_id) {
            let first = match recorded {
                Recorded::Fenced => PostingOutcome::Rejected(Rejection::TooLate),
                Recorded::Applied { outcome, .. } => outcome.clone(),
            };
            drop(ledger);
            return if faults.lose_replies {
                Err(CoreError::Timeout)
            } else {
                Ok(first)
            };
        }
        if ledger.postings.len() >= MAX_POSTINGS {
            return Err(CoreError::Unavailable(
                "simulator posting table full".into(),
            ));
        }
        let outcome = match ledger.accounts.get_mut(&posting.account_no) {
            None => PostingOutcome::Rejected(Rejection::UnknownAccount),
            Some(account) if account.frozen => PostingOutcome::Rejected(Rejection::Frozen),
            Some(account) => match posting.kind {
                PostingKind::Debit if account.balance_fen < posting.amount_fen => {
                    PostingOutcome::Rejected(Rejection::InsufficientFunds)
                }
                PostingKind::Debit => {
                    account.balance_fen -= posting.amount_fen;
                    PostingOutcome::Posted { core_ref }
                }
                PostingKind::Credit => {
                    // i64 fen holds 92 quadrillion yuan: overflow means a bug, not a customer.
                    account.balance_fen = account
                        .balance_fen
                        .checked_add(posting.amount_fen)
                        .expect("simulated balance overflow");
                    PostingOutcome::Posted { core_ref }
                }
            },
        };
        debug_assert!(
            ledger.accounts.values().all(|a| a.balance_fen >= 0),
            "balances never go negative"
        );
        ledger.postings.insert(
            posting.txn_id,
            Recorded::Applied {
                posting: posting.clone(),
                outcome: outcome.clone(),
                reversed: None,
            },
        );
        drop(ledger);
        if faults.lose_replies {
            return Err(CoreError::Timeout);
        }
        Ok(outcome)
    }

    fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError> {
        let faults = self.before_call()?;
        let mut ledger = self.lock();
        match ledger.postings.get(&txn_id) {
            Some(Recorded::Fenced) => Ok(None),
            Some(Recorded::Applied { outcome, .. }) => Ok(Some(outcome.clone())),
            None => {
                if !faults.queries_do_not_fence {
                    ledger.fence(txn_id)?;
                }
                Ok(None)
            }
        }
    }

    fn reverse(&self, reversal: &Reversal) -> Result<ReversalOutcome, CoreError> {
        self.before_call()?;
        let mut ledger = self.lock();
        let Ledger {
            postings, accounts, ..
        } = &mut *ledger;
        let (posting, reversed) = match postings.get_mut(&reversal.txn_id) {
            None => {
                ledger.fence(reversal.txn_id)?;
                return Ok(ReversalOutcome::NothingPosted);
            }
            Some(Recorded::Fenced)
            | Some(Recorded::Applied {
                outcome: PostingOutcome::Rejected(_),
                ..
            }) => return Ok(ReversalOutcome::NothingPosted),
            Some(Recorded::Applied {
                reversed: Some(core_ref),
                ..
            }) => {
                return Ok(ReversalOutcome::Reversed {
                    core_ref: core_ref.clone(),
                });
            }
            Some(Recorded::Applied {
                posting, reversed, ..
            }) => (posting, reversed),
        };
        if posting.kind != reversal.kind
            || posting.account_no != reversal.account_no
            || posting.amount_fen != reversal.amount_fen
        {
            return Ok(ReversalOutcome::Refused(ReversalRefusal::DoesNotMatch));
        }
        let Some(account) = accounts.get_mut(&posting.account_no) else {
            // The posting was applied to this account, and accounts are never removed.
            unreachable!("a posted account disappeared from the simulator");
        };
        if account.frozen {
            return Ok(ReversalOutcome::Refused(ReversalRefusal::Frozen));
        }
        match posting.kind {
            PostingKind::Debit => {
                account.balance_fen = account
                    .balance_fen
                    .checked_add(posting.amount_fen)
                    .expect("simulated balance overflow");
            }
            PostingKind::Credit if account.balance_fen < posting.amount_fen => {
                return Ok(ReversalOutcome::Refused(ReversalRefusal::InsufficientFunds));
            }
            PostingKind::Credit => account.balance_fen -= posting.amount_fen,
        }
        let core_ref = format!("REV{:012}", self.next_ref.fetch_add(1, Ordering::Relaxed));
        *reversed = Some(core_ref.clone());
        Ok(ReversalOutcome::Reversed { core_ref })
    }
}

impl Ledger {
    fn fence(&mut self, txn_id: Uuid) -> Result<(), CoreError> {
        if self.postings.len() >= MAX_POSTINGS {
            return Err(CoreError::Unavailable(
                "simulator posting table full".into(),
            ));
        }
        self.postings.insert(txn_id, Recorded::Fenced);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debit(account_no: &str, amount_fen: i64) -> Posting {
        Posting {
            txn_id: Uuid::new_v4(),
            kind: PostingKind::Debit,
            account_no: account_no.into(),
            amount_fen,
        }
    }

    #[test]
    fn postings_are_idempotent_by_transaction_id() {
        let sim = CoreSimulator::with_demo_accounts();
        let posting = debit("6222021234567890123", 1_000);
        let first = sim.post(&posting).unwrap();
        assert!(matches!(first, PostingOutcome::Posted { .. }));
        assert_eq!(
            sim.post(&posting).unwrap(),
            first,
            "a repeat returns the first outcome"
        );
        assert_eq!(
            sim.balance("6222021234567890123"),
            Some(100_000_000 - 1_000),
            "and moves no money"
        );
    }

    #[test]
    fn overdrafts_unknown_and_frozen_accounts_are_rejected() {
        let sim = CoreSimulator::with_demo_accounts();
        assert_eq!(
            sim.post(&debit("6217001234567890149", 1)).unwrap(),
            PostingOutcome::Rejected(Rejection::InsufficientFunds)
        );
        assert_eq!(
            sim.post(&debit("0000", 1)).unwrap(),
            PostingOutcome::Rejected(Rejection::UnknownAccount)
        );
        sim.set_frozen("6222021234567890131", true);
        assert_eq!(
            sim.post(&debit("6222021234567890131", 1)).unwrap(),
            PostingOutcome::Rejected(Rejection::Frozen)
        );
        assert_eq!(sim.balance("6222021234567890131"), Some(50_000_000));
    }

    #[test]
    fn lost_replies_still_post_once_and_query_tells_the_truth() {
        let sim = CoreSimulator::with_demo_accounts();
        sim.set_faults(Faults {
            lose_replies: true,
            ..Faults::default()
        });
        let posting = debit("6222021234567890123", 500);
        assert_eq!(sim.post(&posting), Err(CoreError::Timeout));
        assert_eq!(sim.post(&posting), Err(CoreError::Timeout));
        sim.set_faults(Faults::default());
        assert!(matches!(
            sim.query_posting(posting.txn_id).unwrap(),
            Some(PostingOutcome::Posted { .. })
        ));
        assert_eq!(sim.balance("6222021234567890123"), Some(100_000_000 - 500));
        assert_eq!(sim.query_posting(Uuid::new_v4()).unwrap(), None);
    }

    fn reversal_of(posting: &Posting) -> Reversal {
        Reversal {
            reversal_id: Uuid::new_v4(),
            txn_id: posting.txn_id,
            kind: posting.kind,
            account_no: posting.account_no.clone(),
            amount_fen: posting.amount_fen,
        }
    }

    #[test]
    fn a_not_found_answer_fences_the_id_so_a_late_posting_is_refused() {
        let sim = CoreSimulator::with_demo_accounts();
        let posting = debit("6222021234567890123", 300);
        assert_eq!(sim.query_posting(posting.txn_id).unwrap(), None);
        assert_eq!(
            sim.post(&posting).unwrap(),
            PostingOutcome::Rejected(Rejection::TooLate)
        );
        assert_eq!(
            sim.query_posting(posting.txn_id).unwrap(),
            None,
            "the answer kunpay acted on stands"
        );
        assert_eq!(sim.balance("6222021234567890123"), Some(100_000_000));
        // A core that does not fence posts it: what reversals exist for.
        sim.set_faults(Faults {
            queries_do_not_fence: true,
            ..Faults::default()
        });
        let unfenced = debit("6222021234567890123", 300);
        assert_eq!(sim.query_posting(unfenced.txn_id).unwrap(), None);
        assert!(matches!(
            sim.post(&unfenced).unwrap(),
            PostingOutcome::Posted { .. }
        ));
    }

    #[test]
    fn a_reversal_undoes_a_posting_once_and_fences_an_unknown_id() {
        let sim = CoreSimulator::with_demo_accounts();
        let posting = debit("6222021234567890123", 2_500);
        sim.post(&posting).unwrap();
        let reversal = reversal_of(&posting);
        let first = sim.reverse(&reversal).unwrap();
        let ReversalOutcome::Reversed { core_ref } = &first else {
            panic!("expected a reversal, got {first:?}");
        };
        assert!(core_ref.starts_with("REV"));
        assert_eq!(sim.balance("6222021234567890123"), Some(100_000_000));
        assert_eq!(sim.reverse(&reversal).unwrap(), first, "idempotent");
        assert_eq!(sim.balance("6222021234567890123"), Some(100_000_000));
        // Another amount than the posting's is not undone.
        let other = debit("6222021234567890131", 100);
        sim.post(&other).unwrap();
        let mut wrong = reversal_of(&other);
        wrong.amount_fen = 99;
        assert_eq!(
            sim.reverse(&wrong).unwrap(),
            ReversalOutcome::Refused(ReversalRefusal::DoesNotMatch)
        );
        // Never received: nothing to undo, and the posting cannot arrive afterwards.
        let never = debit("6222021234567890123", 700);
        assert_eq!(
            sim.reverse(&reversal_of(&never)).unwrap(),
            ReversalOutcome::NothingPosted
        );
        assert_eq!(
            sim.post(&never).unwrap(),
            PostingOutcome::Rejected(Rejection::TooLate)
        );
        // A rejected posting has nothing to undo either.
        let overdraft = debit("6217001234567890149", 1);
        sim.post(&overdraft).unwrap();
        assert_eq!(
            sim.reverse(&reversal_of(&overdraft)).unwrap(),
            ReversalOutcome::NothingPosted
        );
    }

    #[test]
    fn a_credit_already_spent_cannot_be_reversed_automatically() {
        let sim = CoreSimulator::with_demo_accounts();
        let credit = Posting {
            kind: PostingKind::Credit,
            ..debit("6217001234567890149", 500)
        };
        sim.post(&credit).unwrap();
        sim.post(&debit("6217001234567890149", 400)).unwrap();
        assert_eq!(
            sim.reverse(&reversal_of(&credit)).unwrap(),
            ReversalOutcome::Refused(ReversalRefusal::InsufficientFunds)
        );
        assert_eq!(sim.balance("6217001234567890149"), Some(100));
    }

    #[test]
    fn binding_checks_details_and_codes_are_single_use() {
        let sim = CoreSimulator::with_demo_accounts();
        let mut request = BindRequest {
            agreement_no: "A1".into(),
            account_no: "6222021234567890123".into(),
            account_name: "张三".into(),
            id_no: "110101199003077774".into(),
            phone: "13812345678".into(),
        };
        assert!(matches!(
            sim.request_binding(&request).unwrap(),
            BindOutcome::CodeSent { .. }
        ));
        let code = sim.last_code_sent_to("13812345678").unwrap();
        assert_eq!(sim.check_code("A1", "999999x").unwrap(), CodeCheck::Wrong);
        assert_eq!(sim.check_code("A1", &code).unwrap(), CodeCheck::Valid);
        assert_eq!(
            sim.check_code("A1", &code).unwrap(),
            CodeCheck::Wrong,
            "single use"
        );
        request.phone = "13000000000".into();
        assert_eq!(
            sim.request_binding(&request).unwrap(),
            BindOutcome::Rejected(BindRejection::DetailsMismatch)
        );
    }
}
