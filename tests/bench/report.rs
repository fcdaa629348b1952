//! What the benchmarks share: writing a section of BENCHMARKS.md between its markers, and
//! naming the machine.

use std::path::{Path, PathBuf};

/// Replaces the text between `<!-- bench:NAME:begin -->` and `<!-- bench:NAME:end -->` in
/// BENCHMARKS.md with `section` (appends the block when the markers are missing).
pub fn write_section(name: &str, section: &str) -> std::io::Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let begin = format!("<!-- bench:{name}:begin -->");
    let end = format!("<!-- bench:{name}:end -->");
    let mut text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nMeasured figures; each section is rewritten by its benchmark.\n"
                .to_string()
        }
        Err(e) => return Err(e),
    };
    let block = format!("{begin}\n{section}{end}");
    match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if b > a => text.replace_range(a..b + end.len(), &block),
        _ => {
            text = format!("{}\n\n{block}\n", text.trim_end());
        }
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The CPU model from /proc/cpuinfo ("" when unknown).
#[allow(dead_code)] // not every benchmark names the CPU this way
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}
