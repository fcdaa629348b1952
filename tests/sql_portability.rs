//! Everything under sql/ must also run on openGauss (../shared/notes/opengauss-sql.md), and
//! money is never a float or NUMERIC.

use std::path::Path;

/// (pattern, why) — matched case-insensitively against SQL with comments removed.
const FORBIDDEN: &[(&str, &str)] = &[
    (
        r"\bon\s+conflict\b",
        "openGauss has no INSERT ... ON CONFLICT; insert and treat SQLSTATE 23505 as 'already there'",
    ),
    (
        r"\bon\s+duplicate\s+key\b",
        "PostgreSQL rejects ON DUPLICATE KEY UPDATE",
    ),
    (
        r"\bas\s+identity\b",
        "openGauss has no identity columns; use BIGSERIAL",
    ),
    (
        r"\bgen_random_uuid\s*\(",
        "openGauss lacks gen_random_uuid(); generate ids in Rust",
    ),
    (
        r"\blisten\b",
        "LISTEN is rejected by default openGauss builds",
    ),
    (
        r"\bnotify\s+[a-z_]+",
        "NOTIFY is rejected by default openGauss builds",
    ),
    (
        r"\bpartition\s+of\b",
        "declarative PARTITION OF differs in openGauss",
    ),
    (
        r"\bto_jsonb\s*\(",
        "openGauss lacks to_jsonb; use the json_* forms",
    ),
    (
        r"\bjsonb_build_object\s*\(",
        "openGauss lacks jsonb_build_object",
    ),
    (r"\bjsonb_agg\s*\(", "openGauss lacks jsonb_agg"),
    (
        r"\bmerge\s+into\b",
        "MERGE differs between PostgreSQL and openGauss",
    ),
    (
        r"\bnumeric\b",
        "money is BIGINT fen; older openGauss logical decoding cannot decode NUMERIC",
    ),
    (r"\bdecimal\b", "money is BIGINT fen"),
    (r"\bdouble\s+precision\b", "no floats"),
    (r"\breal\b", "no floats"),
    (r"\bfloat\d*\b", "no floats"),
    (
        r"\bmoney\b",
        "the MONEY type is locale-dependent; use BIGINT fen",
    ),
];

fn strip_comments(sql: &str) -> String {
    let no_block = regex::Regex::new(r"(?s)/\*.*?\*/")
        .unwrap()
        .replace_all(sql, " ")
        .into_owned();
    no_block
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn sql_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sql_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "sql") {
            out.push(path);
        }
    }
}

fn violations(sql: &str) -> Vec<String> {
    let clean = strip_comments(sql);
    FORBIDDEN
        .iter()
        .filter(|(pattern, _)| {
            regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .build()
                .unwrap()
                .is_match(&clean)
        })
        .map(|(pattern, why)| format!("{pattern}: {why}"))
        .collect()
}

#[test]
fn sql_uses_only_constructs_opengauss_runs() {
    let mut files = Vec::new();
    sql_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("sql"),
        &mut files,
    );
    assert!(!files.is_empty(), "no SQL found under sql/");
    let mut problems = Vec::new();
    for file in &files {
        for v in violations(&std::fs::read_to_string(file).unwrap()) {
            problems.push(format!("{}: {v}", file.display()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_scanner_catches_each_forbidden_construct() {
    for bad in [
        "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING;",
        "CREATE TABLE t (id BIGINT GENERATED ALWAYS AS IDENTITY);",
        "SELECT gen_random_uuid();",
        "LISTEN payments;",
        "NOTIFY payments;",
        "CREATE TABLE p PARTITION OF t FOR VALUES FROM (1) TO (2);",
        "SELECT to_jsonb(t) FROM t;",
        "CREATE TABLE t (amount NUMERIC(18,2));",
        "CREATE TABLE t (amount double precision);",
        "CREATE TABLE t (rate REAL);",
        "CREATE TABLE t (amount FLOAT8);",
    ] {
        assert!(!violations(bad).is_empty(), "not caught: {bad}");
    }
    assert!(
        violations("-- no ON CONFLICT here\nCREATE TABLE t (amount_fen BIGINT NOT NULL);")
            .is_empty()
    );
}

/// The journal's combined statements live in Rust, not sql/, and must run on openGauss too.
#[test]
fn the_journal_statements_in_rust_use_only_constructs_opengauss_runs() {
    let problems: Vec<String> = kunpay::payment::journal::combined_statements_sql()
        .iter()
        .flat_map(|sql| {
            violations(sql)
                .into_iter()
                .map(move |v| format!("{}...: {v}", &sql[..60.min(sql.len())]))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The HA write guard's function is created from Rust (src/ha/mod.rs); its openGauss form must
/// pass the same scan.
#[test]
fn the_ha_guard_in_rust_uses_only_constructs_opengauss_runs() {
    let sql = kunpay::ha::guard_function_sql(kunpay::ha::cdc::Dialect::OpenGauss);
    let problems = violations(&sql);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
