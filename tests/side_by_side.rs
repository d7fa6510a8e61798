//! The side-by-side harness (`benches/side_by_side.sh`) in its short mode: every system runs
//! and produces figures. No timing is asserted: the machine is shared, and figures belong in
//! BENCHMARKS.md, measured with the full run.

use std::process::Command;

#[test]
fn the_harness_runs_every_system_and_reports_figures() {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/side_by_side.sh"
        ))
        .arg("--short")
        .env("KAMIGATE_BIN", env!("CARGO_BIN_EXE_kamigate"))
        .env("BASELINE_BIN", env!("CARGO_BIN_EXE_baseline-edge"))
        .output()
        .expect("the harness runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for system in [
        "baseline",
        "redis-engine",
        "redis-ledger",
        "embedded-ledger",
        "embedded-engine",
    ] {
        let kinds: &[&str] = if system == "baseline" {
            &["claim", "redeem"]
        } else {
            &["claim", "redeem", "batch", "soldout"]
        };
        for &kind in kinds {
            let row = stdout
                .lines()
                .find(|l| {
                    let mut f = l.split_whitespace();
                    f.next() == Some(system) && f.next() == Some(kind)
                })
                .unwrap_or_else(|| panic!("no {system} {kind} row: {stdout}"));
            // Columns: system, kind, req/s, non-2xx, …
            let column = |n: usize| -> f64 {
                row.split_whitespace()
                    .nth(n)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no figure in column {n}: {row}"))
            };
            let rps = column(2);
            assert!(rps > 0.0, "{system} {kind} answered nothing: {row}");
            if kind == "soldout" {
                // Every claim of the emptied SKU is refused: the row measured sold-out answers.
                let refused = column(3);
                assert!(refused > 0.0, "{system} sold nothing out: {row}");
            }
        }
    }
}
