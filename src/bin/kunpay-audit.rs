//! kunpay-audit: the auditors' offline tool for the SM-signed message log (docs/audit.md).
//! Exit codes: 0 everything holds, 1 something does not hold, 2 usage, configuration or I/O
//! error (no verdict).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kunpay::audit::export::{export_openssl, openssl_command};
use kunpay::audit::proof::{InclusionProof, check_proof, prove};
use kunpay::audit::{Pubkeys, verify_with_anchors};

const EXIT_OK: u8 = 0;
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "kunpay-audit",
    version,
    about = "Verify kunpay's SM-signed message log offline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every chain link, checkpoint signature, sequence number and inbound institution
    /// signature; exit 0 only when everything holds.
    Verify {
        /// The log directory (a copy of /var/lib/kunpay/audit).
        dir: PathBuf,
        /// The auditor's public-key file (TOML; see docs/audit.md).
        #[arg(long, value_name = "FILE")]
        pubkeys: PathBuf,
        /// A checkpoint kept from an earlier export (CP-n.bin) that the log must still
        /// contain; detects a log cut back together with its last checkpoints. Repeatable.
        #[arg(long, value_name = "CP.bin")]
        expect_checkpoint: Vec<PathBuf>,
    },
    /// Write an inclusion proof (JSON) for one record, checkable without the log.
    Prove {
        dir: PathBuf,
        seq: u64,
        /// Write the proof here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify an inclusion proof with the public-key file only.
    CheckProof {
        proof: PathBuf,
        #[arg(long, value_name = "FILE")]
        pubkeys: PathBuf,
    },
    /// Export each checkpoint's signed bytes and signature, and the audit public keys, for
    /// verification with the OpenSSL command line.
    ExportOpenssl {
        dir: PathBuf,
        /// A new or empty directory.
        out: PathBuf,
        #[arg(long, value_name = "FILE")]
        pubkeys: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify {
            dir,
            pubkeys,
            expect_checkpoint,
        } => run_verify(&dir, &pubkeys, &expect_checkpoint),
        Command::Prove { dir, seq, out } => run_prove(&dir, seq, out.as_deref()),
        Command::CheckProof { proof, pubkeys } => run_check_proof(&proof, &pubkeys),
        Command::ExportOpenssl { dir, out, pubkeys } => run_export(&dir, &out, &pubkeys),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kunpay-audit: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn load_keys(path: &Path) -> anyhow::Result<Pubkeys> {
    Ok(Pubkeys::load(path)?)
}

fn run_verify(dir: &Path, pubkeys: &Path, kept: &[PathBuf]) -> anyhow::Result<u8> {
    let keys = load_keys(pubkeys)?;
    let anchors = kept
        .iter()
        .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = verify_with_anchors(dir, &keys, &anchors)?;
    println!("{report}");
    Ok(if report.holds() {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

fn run_prove(dir: &Path, seq: u64, out: Option<&Path>) -> anyhow::Result<u8> {
    let proof = match prove(dir, seq) {
        Ok(proof) => proof,
        Err(reason) => {
            eprintln!("kunpay-audit prove: {reason}");
            return Ok(EXIT_FAILURE);
        }
    };
    let json = serde_json::to_string_pretty(&proof)? + "\n";
    match out {
        Some(path) => {
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote the inclusion proof of record {seq} to {}",
                path.display()
            );
        }
        None => print!("{json}"),
    }
    Ok(EXIT_OK)
}

fn run_check_proof(proof_path: &Path, pubkeys: &Path) -> anyhow::Result<u8> {
    let keys = load_keys(pubkeys)?;
    let text = std::fs::read_to_string(proof_path)
        .with_context(|| format!("reading {}", proof_path.display()))?;
    let proof: InclusionProof = match serde_json::from_str(&text) {
        Ok(proof) => proof,
        Err(e) => {
            println!(
                "FAILED: {} is not a readable proof: {e}",
                proof_path.display()
            );
            return Ok(EXIT_FAILURE);
        }
    };
    match check_proof(&proof, &keys) {
        Ok(proven) => {
            println!("{proven}");
            if matches!(proven.inbound_signature, Some(Err(_))) {
                println!("RESULT: FAILED, the institution's signature does not verify");
                return Ok(EXIT_FAILURE);
            }
            println!("RESULT: OK, the proof holds");
            Ok(EXIT_OK)
        }
        Err(reason) => {
            println!("FAILED: {reason}");
            println!("RESULT: FAILED, the proof does not hold");
            Ok(EXIT_FAILURE)
        }
    }
}

fn run_export(dir: &Path, out: &Path, pubkeys: &Path) -> anyhow::Result<u8> {
    let keys = load_keys(pubkeys)?;
    let summary = export_openssl(dir, out, &keys).map_err(anyhow::Error::msg)?;
    println!(
        "exported {} checkpoint(s) and {} audit key(s) to {}",
        summary.checkpoints,
        summary.keys.len(),
        out.display()
    );
    println!("verify them all with: sh {}/verify.sh", out.display());
    println!("or one by one, inside {}:", out.display());
    println!("  {}", openssl_command(1, "<key id from checkpoints.tsv>"));
    if !summary.unknown_keys.is_empty() {
        println!(
            "WARNING: no public key for key id(s) {}: add them under [audit_keys]",
            summary.unknown_keys.join(", ")
        );
        return Ok(EXIT_FAILURE);
    }
    Ok(EXIT_OK)
}
