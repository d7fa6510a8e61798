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

/// `benches/durable_ab.sh`, one short round of one build against itself: all four runs
/// answer claims and report the gateway's threads and Redis's commands.
#[test]
fn the_durable_a_b_script_runs_both_modes_of_both_builds() {
    let bin = env!("CARGO_BIN_EXE_kamigate");
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/durable_ab.sh"
        ))
        .args([bin, bin, "1", "redis"])
        .env("SECS", "1")
        .env("CONNS", "4")
        .env("COMMANDS", "1")
        .output()
        .expect("the script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for side in ["A", "B"] {
        for mode in ["engine", "ledger"] {
            let row = stdout
                .lines()
                .find(|l| {
                    let mut f = l.split_whitespace();
                    f.next() == Some(side) && f.next() == Some(mode)
                })
                .unwrap_or_else(|| panic!("no {side} {mode} row: {stdout}"));
            let claims: f64 = row
                .split_whitespace()
                .nth(3)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no claims/s: {row}"));
            assert!(claims > 0.0, "{side} {mode} answered nothing: {row}");
        }
    }
    assert!(
        stdout.contains("tokio-rt-worker"),
        "per-thread figures: {stdout}"
    );
    let scripts = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("fcall ") && l.contains("calls/claim"))
        .count();
    assert_eq!(
        scripts, 4,
        "Redis's script calls per claim in each run: {stdout}"
    );
}
