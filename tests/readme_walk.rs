//! The README's five-minute walk, run as written.
//!
//! Every fenced `sh` block of the README section "A five-minute walk" is read as a series of
//! commands (a line ending in `\` continues on the next), each followed by what it prints,
//! shown as comment lines (`# …`) so that the block can be pasted into a shell as it is. The
//! commands run one after the other in one `bash`, in a fresh temp directory (so
//! `kamigate-data/` and `codes.txt` land there), and what each prints on stdout must be what
//! the README shows; a command shown without output must print nothing.
//!
//! The only changes to the commands, so that the walk can run beside other tests:
//! - `cargo run --release --` becomes the `kamigate` binary this test run built;
//! - ports 8080 and 8081 become free ones, given to the gateway through `KAMIGATE_LISTEN`
//!   and `KAMIGATE_ADMIN_LISTEN`, and replaced in `localhost:8080` / `localhost:8081`;
//! - a trap stops the gateway the walk started in the background when the shell exits.
//!
//! Compared as they are, except values that change on every run, the same way on both
//! sides: RFC 3339 timestamps (`<time>`), millisecond timestamps (`<ms>`) and grouped codes
//! (`<code 1>`, `<code 2>`, … numbered by first appearance, so the code a claim returns must
//! be the one `gen` printed in that position and in that form).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use regex::Regex;

mod support;

use support::gateway::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_kamigate");

/// The walk's section of the README.
const SECTION: &str = "## A five-minute walk";

/// One command of the walk and the output the README shows for it.
#[derive(Debug)]
struct Step {
    /// 1-based line of the README the command starts on.
    line: usize,
    command: String,
    shown: String,
}

/// The commands of the walk, in order, with their shown outputs.
fn walk(readme: &str) -> Vec<Step> {
    let lines: Vec<&str> = readme.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == SECTION)
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |n| start + 1 + n);
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut continued = false;
    for (i, line) in lines.iter().enumerate().take(end).skip(start + 1) {
        if !in_block {
            if line.starts_with("```") {
                assert_eq!(
                    line.trim_end(),
                    "```sh",
                    "README.md:{}: the walk's code blocks are sh",
                    i + 1
                );
                in_block = true;
            }
            continue;
        }
        if line.starts_with("```") {
            assert!(!continued, "README.md:{}: a command ends in \\", i + 1);
            in_block = false;
            continue;
        }
        if continued {
            let step = steps.last_mut().expect("a command continues");
            step.command.push('\n');
            step.command.push_str(line);
            continued = line.ends_with('\\');
        } else if let Some(output) = line.strip_prefix('#') {
            let step = steps
                .last_mut()
                .unwrap_or_else(|| panic!("README.md:{}: output before any command", i + 1));
            if !step.shown.is_empty() {
                step.shown.push('\n');
            }
            step.shown
                .push_str(output.strip_prefix(' ').unwrap_or(output));
        } else if !line.trim().is_empty() {
            steps.push(Step {
                line: i + 1,
                command: (*line).to_owned(),
                shown: String::new(),
            });
            continued = line.ends_with('\\');
        }
    }
    assert!(
        !in_block,
        "README.md: the walk's last code block is not closed"
    );
    steps
}

/// The command as the test runs it (see the module doc).
fn adapt(command: &str, public: u16, admin: u16) -> String {
    command
        .replace("cargo run --release --", &format!("'{BIN}'"))
        .replace("localhost:8080", &format!("localhost:{public}"))
        .replace("localhost:8081", &format!("localhost:{admin}"))
}

/// Replaces what changes on every run by placeholders; codes are numbered by first
/// appearance, across the whole walk.
struct Normaliser {
    rfc3339: Regex,
    millis: Regex,
    code: Regex,
    codes: HashMap<String, usize>,
}

impl Normaliser {
    fn new() -> Normaliser {
        Normaliser {
            rfc3339: Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z").expect("regex"),
            millis: Regex::new(r"\b\d{13}\b").expect("regex"),
            code: Regex::new(r"\b[0-9A-Z]{4}(-[0-9A-Z]{4})+\b").expect("regex"),
            codes: HashMap::new(),
        }
    }

    fn apply(&mut self, text: &str) -> String {
        let text = self.rfc3339.replace_all(text, "<time>");
        let text = self.millis.replace_all(&text, "<ms>");
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for m in self.code.find_iter(&text) {
            out.push_str(&text[last..m.start()]);
            let next = self.codes.len() + 1;
            let n = *self.codes.entry(m.as_str().to_owned()).or_insert(next);
            out.push_str(&format!("<code {n}>"));
            last = m.end();
        }
        out.push_str(&text[last..]);
        out
    }
}

/// Stops the walk's shell and everything it started (its process group) unless the shell
/// finished: then its trap has stopped the gateway already, and the group is gone.
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the process group; it touches no
            // memory. The group is the walk's own shell and its children.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// The marker printed after each command, to split stdout into the commands' outputs.
fn marker(n: usize) -> String {
    format!("@@walk step {n} done@@")
}

#[tokio::test]
async fn the_five_minute_walk_prints_what_the_readme_shows() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let steps = walk(&readme);
    assert!(
        steps.iter().filter(|s| !s.shown.is_empty()).count() >= 5,
        "the walk shows what its commands print: {steps:#?}"
    );

    let (public, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("temp dir");
    // Stops the gateway the walk put in the background once the walk is over.
    let mut script = String::from("trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n");
    for (n, step) in steps.iter().enumerate() {
        script.push_str(&adapt(&step.command, public, admin));
        script.push_str(&format!("\nprintf '\\n%s\\n' '{}'\n", marker(n)));
    }
    let stdout_path = dir.path().join("walk.stdout");
    let stderr_path = dir.path().join("walk.stderr");
    let stdout = std::fs::File::create(&stdout_path).expect("stdout file");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("KAMIGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("KAMIGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs the walk");
    let mut group = Group(child.id().map(|pid| pid as i32));
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
    if matches!(status, Ok(Ok(_))) {
        group.0 = None;
    }
    drop(group);
    let printed = std::fs::read_to_string(&stdout_path).expect("the walk's stdout");
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let status = status.unwrap_or_else(|_| {
        panic!("the walk did not finish within 120 s\nstdout:\n{printed}\nstderr:\n{log}")
    });
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "the walk's shell failed: {status:?}\nstdout:\n{printed}\nstderr:\n{log}"
    );

    let mut outputs = Vec::with_capacity(steps.len());
    let mut rest = printed.as_str();
    for n in 0..steps.len() {
        let end = format!("\n{}\n", marker(n));
        let (output, after) = rest.split_once(&end).unwrap_or_else(|| {
            panic!("the walk stopped before step {n}\nstdout:\n{printed}\nstderr:\n{log}")
        });
        outputs.push(output.trim_end_matches('\n'));
        rest = after;
    }
    assert_eq!(rest, "", "nothing is printed after the walk");

    let (mut shown, mut actual) = (Normaliser::new(), Normaliser::new());
    let mut drifts = Vec::new();
    for (step, output) in steps.iter().zip(&outputs) {
        let (expected, got) = (shown.apply(&step.shown), actual.apply(output));
        if expected != got {
            drifts.push(format!(
                "README.md:{}: {}\n  shown:   {expected:?}\n  printed: {got:?}\n  (as printed: {output:?})",
                step.line, step.command
            ));
        }
    }
    assert!(
        drifts.is_empty(),
        "the README's walk drifted from the binary:\n{}\nstderr:\n{log}",
        drifts.join("\n")
    );
}

/// The parser reads what the walk shows: commands, continuations and shown output.
#[test]
fn the_walk_parser_reads_commands_and_their_shown_output() {
    let readme = "intro\n## A five-minute walk\ntext\n```sh\nfirst &\nsecond -d x \\\n     -H y\n# {\"a\":1}\n#   two\n\nthird\n```\n## Next\n```sh\nnot read\n```\n";
    let steps = walk(readme);
    let got: Vec<(usize, &str, &str)> = steps
        .iter()
        .map(|s| (s.line, s.command.as_str(), s.shown.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (5, "first &", ""),
            (6, "second -d x \\\n     -H y", "{\"a\":1}\n  two"),
            (11, "third", ""),
        ]
    );
}

/// Codes are told apart, so a claim returning another code than shown is a drift.
#[test]
fn normalising_numbers_codes_by_first_appearance() {
    let mut n = Normaliser::new();
    assert_eq!(
        n.apply("PFD5-DDBZ-3N8Q-7HJT\nABCD-EFGH-JKMN-PQRS\n"),
        "<code 1>\n<code 2>\n"
    );
    assert_eq!(
        n.apply(
            r#"{"code":"ABCD-EFGH-JKMN-PQRS","at":"2026-12-03T01:02:03.456Z","ms":1764723723456}"#
        ),
        r#"{"code":"<code 2>","at":"<time>","ms":<ms>}"#
    );
    // The ungrouped form is not a grouped code: shown grouped, printed ungrouped is a drift.
    assert_eq!(n.apply("PFD5DDBZ3N8Q7HJT"), "PFD5DDBZ3N8Q7HJT");
}
