//! The on-call kit against the metric catalogue, without a running Prometheus: every rule
//! (`prometheus/rules/`) and dashboard (`grafana/dashboards/`) expression parses once
//! Grafana's template variables are substituted, queries only metrics the gateway exports
//! ([`kamigate::metrics::CATALOGUE`]) with labels they have, and every catalogue metric is
//! on a dashboard or in a rule. Alerts carry what on-call needs (severity, summary,
//! description, a runbook section that exists) and each has a promtool test where it fires
//! and one where it does not. `prometheus/live-check` runs the same files against a live
//! gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kamigate::metrics::{Kind, Metric, CATALOGUE, LATENCY_BUCKETS, LATENCY_SLO_SECONDS};
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Series Prometheus makes itself, which expressions may use besides the catalogue.
const PROMETHEUS_SERIES: &[&str] = &["up", "ALERTS"];
/// Labels every scraped series has.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no .{ext} files in {dir}");
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Yaml {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A rule of `prometheus/rules/`.
struct Rule {
    file: String,
    /// The alert's or the recording rule's name.
    name: String,
    alert: bool,
    expr: String,
    rule: Yaml,
}

fn rules() -> Vec<Rule> {
    let mut rules = Vec::new();
    for path in files("prometheus/rules", "yml") {
        let file = path
            .file_name()
            .expect("file")
            .to_string_lossy()
            .into_owned();
        let doc = yaml(&path);
        let groups = doc["groups"].as_sequence().expect("groups");
        for group in groups {
            for rule in group["rules"].as_sequence().expect("rules") {
                let (name, alert) = match (rule["alert"].as_str(), rule["record"].as_str()) {
                    (Some(a), None) => (a.to_owned(), true),
                    (None, Some(r)) => (r.to_owned(), false),
                    _ => panic!("{file}: a rule is an alert or a recording: {rule:?}"),
                };
                let expr = rule["expr"].as_str().expect("expr").to_owned();
                rules.push(Rule {
                    file: file.clone(),
                    name,
                    alert,
                    expr,
                    rule: rule.clone(),
                });
            }
        }
    }
    rules
}

/// A query of a dashboard: where it is, and its expression as written.
struct Query {
    place: String,
    expr: String,
}

fn dashboards() -> Vec<(PathBuf, Json)> {
    files("grafana/dashboards", "json")
        .into_iter()
        .map(|path| {
            let doc = serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, doc)
        })
        .collect()
}

/// Every panel of a dashboard, those inside collapsed rows too.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

/// Panel targets, annotation queries and the selectors of `label_values(…)` variables.
fn dashboard_queries(name: &str, dashboard: &Json) -> Vec<Query> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(Query {
                place: format!("{name}: panel {:?}", panel["title"]),
                expr: target["expr"].as_str().expect("target expr").to_owned(),
            });
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().expect("list") {
        if let Some(expr) = annotation["expr"].as_str() {
            queries.push(Query {
                place: format!("{name}: annotation {:?}", annotation["name"]),
                expr: expr.to_owned(),
            });
        }
    }
    for var in dashboard["templating"]["list"].as_array().expect("list") {
        if var["type"] != "query" {
            continue;
        }
        let def = var["definition"].as_str().expect("definition");
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|d| d.rsplit_once(','))
            .map(|(selector, _)| selector.trim())
            .unwrap_or_else(|| panic!("variable {:?}: label_values(selector, label)", var["name"]));
        queries.push(Query {
            place: format!("{name}: variable {:?}", var["name"]),
            expr: inner.to_owned(),
        });
    }
    queries
}

/// Grafana's variables as the live check substitutes them: intervals, and `All` (`.*`)
/// for the multi-value variables.
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').expect("closed ${…}");
                (&braced[..end], end + 2)
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        out.push_str(match name {
            "__rate_interval" | "__interval" => "1m",
            "__range" => "1h",
            "instance" | "sku" | "channel" => ".*",
            other => panic!("unknown template variable ${other} in {expr}"),
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The vector selectors of an expression.
fn selectors(expr: &Expr) -> Vec<VectorSelector> {
    struct Collect(Vec<VectorSelector>);
    impl ExprVisitor for Collect {
        type Error = ();
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
            match e {
                Expr::VectorSelector(vs) => self.0.push(vs.clone()),
                Expr::MatrixSelector(ms) => self.0.push(ms.vs.clone()),
                _ => {}
            }
            Ok(true)
        }
    }
    let mut c = Collect(Vec::new());
    walk_expr(&mut c, expr).expect("infallible");
    c.0
}

fn selector_name(vs: &VectorSelector) -> String {
    vs.name.clone().unwrap_or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__" && m.op == MatchOp::Equal)
            .map(|m| m.value.clone())
            .unwrap_or_else(|| panic!("a selector without a metric name: {vs}"))
    })
}

/// The catalogue metric a series name belongs to, and whether it is a histogram's bucket.
fn catalogued(series: &str) -> Option<(&'static Metric, bool)> {
    CATALOGUE.iter().find_map(|m| match m.kind {
        Kind::Histogram => {
            let suffix = series.strip_prefix(m.name)?;
            match suffix {
                "_bucket" => Some((m, true)),
                "_sum" | "_count" => Some((m, false)),
                _ => None,
            }
        }
        _ => (series == m.name).then_some((m, false)),
    })
}

/// Checks every selector of `expr` against the catalogue and the recorded names; returns the
/// catalogue metrics it uses.
fn check_expr(place: &str, expr: &str, recorded: &BTreeSet<String>) -> BTreeSet<&'static str> {
    let text = substitute(expr);
    let ast = parser::parse(&text).unwrap_or_else(|e| panic!("{place}: {e}\n{text}"));
    let mut used = BTreeSet::new();
    for vs in selectors(&ast) {
        let name = selector_name(&vs);
        if let Some((metric, bucket)) = catalogued(&name) {
            used.insert(metric.name);
            for m in &vs.matchers.matchers {
                let known = m.name == "__name__"
                    || metric.labels.contains(&m.name.as_str())
                    || TARGET_LABELS.contains(&m.name.as_str())
                    || (bucket && m.name == "le");
                assert!(known, "{place}: {name} has no label {}", m.name);
            }
        } else {
            assert!(
                recorded.contains(&name) || PROMETHEUS_SERIES.contains(&name.as_str()),
                "{place}: {name} is neither in the catalogue (src/metrics.rs) nor recorded by a rule"
            );
        }
    }
    used
}

#[test]
fn every_expression_parses_and_uses_catalogued_metrics_and_every_metric_is_used() {
    let rules = rules();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter(|r| !r.alert)
        .map(|r| r.name.clone())
        .collect();
    let mut used: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut count = 0;
    for rule in &rules {
        let place = format!("{}: {}", rule.file, rule.name);
        for metric in check_expr(&place, &rule.expr, &recorded) {
            used.entry(metric).or_default().push(place.clone());
        }
        count += 1;
    }
    for (path, dashboard) in dashboards() {
        let name = path
            .file_name()
            .expect("file")
            .to_string_lossy()
            .into_owned();
        for q in dashboard_queries(&name, &dashboard) {
            for metric in check_expr(&q.place, &q.expr, &recorded) {
                used.entry(metric).or_default().push(q.place.clone());
            }
            count += 1;
        }
    }
    assert!(count > 50, "only {count} expressions found");
    let unused: Vec<&str> = CATALOGUE
        .iter()
        .map(|m| m.name)
        .filter(|n| !used.contains_key(n))
        .collect();
    assert!(
        unused.is_empty(),
        "catalogue metrics on no dashboard and in no rule: {unused:?}"
    );
}

#[test]
fn the_latency_sli_counts_the_bucket_at_the_objective() {
    let le = format!("le=\"{LATENCY_SLO_SECONDS}\"");
    assert!(LATENCY_BUCKETS.contains(&LATENCY_SLO_SECONDS));
    let latency: Vec<Rule> = rules()
        .into_iter()
        .filter(|r| {
            r.rule["labels"]["slo"]
                .as_str()
                .is_some_and(|s| s.ends_with("_latency"))
        })
        .collect();
    assert!(!latency.is_empty());
    for rule in latency {
        assert!(
            rule.expr.contains(&le),
            "{}: {} lacks {le}",
            rule.file,
            rule.name
        );
    }
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook_section() {
    let runbook = read(&root().join("prometheus/RUNBOOK.md"));
    let sections: BTreeMap<String, String> = {
        let mut sections = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        for line in runbook.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                if let Some((a, body)) = current.take() {
                    sections.insert(a, body);
                }
                current = Some((anchor(h), String::new()));
            } else if let Some((_, body)) = current.as_mut() {
                body.push_str(line);
                body.push('\n');
            }
        }
        sections.extend(current);
        sections
    };
    let alerts: Vec<Rule> = rules().into_iter().filter(|r| r.alert).collect();
    assert!(alerts.len() >= 19, "{} alerts", alerts.len());
    for alert in alerts {
        let at = format!("{}: {}", alert.file, alert.name);
        let severity = alert.rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("page" | "ticket")),
            "{at}: severity page or ticket"
        );
        for field in ["summary", "description", "runbook_url"] {
            assert!(
                alert.rule["annotations"][field]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{at}: no {field}"
            );
        }
        let url = alert.rule["annotations"]["runbook_url"]
            .as_str()
            .expect("url");
        let section = url
            .strip_prefix("prometheus/RUNBOOK.md#")
            .unwrap_or_else(|| panic!("{at}: runbook_url {url} is not a RUNBOOK.md section"));
        let body = sections
            .get(section)
            .unwrap_or_else(|| panic!("{at}: RUNBOOK.md has no section #{section}"));
        for part in ["What it means", "Look first", "What to do"] {
            assert!(
                body.contains(part),
                "{at}: RUNBOOK.md#{section} lacks {part:?}"
            );
        }
    }
}

#[test]
fn every_alert_has_a_promtool_case_where_it_fires_and_one_where_it_does_not() {
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for path in files("prometheus/tests", "yml") {
        let doc = yaml(&path);
        for test in doc["tests"].as_sequence().expect("tests") {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_owned();
                let expected = case["exp_alerts"].as_sequence().map_or(0, |a| a.len());
                if expected > 0 {
                    fires.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    for alert in rules().into_iter().filter(|r| r.alert) {
        assert!(
            fires.contains(&alert.name),
            "{}: no case where it fires",
            alert.name
        );
        assert!(
            quiet.contains(&alert.name),
            "{}: no case where it stays quiet",
            alert.name
        );
    }
}

#[test]
fn every_panel_has_a_unit_a_description_and_the_dashboard_a_stable_uid() {
    let mut uids = BTreeSet::new();
    for (path, dashboard) in dashboards() {
        let name = path.display().to_string();
        let uid = dashboard["uid"].as_str().expect("uid");
        assert!(
            !uid.is_empty() && uids.insert(uid.to_owned()),
            "{name}: uid {uid}"
        );
        let mut ids = BTreeSet::new();
        for panel in panels(&dashboard) {
            let title = panel["title"].as_str().expect("title");
            assert!(
                ids.insert(panel["id"].as_i64().expect("id")),
                "{name}: {title}: id"
            );
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{name}: {title}: no description"
            );
            assert!(
                panel["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty()),
                "{name}: {title}: no unit"
            );
            assert!(
                panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{name}: {title}: no query"
            );
        }
        let variables: BTreeSet<&str> = dashboard["templating"]["list"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for v in ["datasource", "instance", "sku"] {
            assert!(variables.contains(v), "{name}: no ${v} variable");
        }
        let annotations = dashboard["annotations"]["list"].as_array().expect("list");
        assert!(
            annotations
                .iter()
                .any(|a| a["expr"].as_str().is_some_and(|e| e.contains("ALERTS{"))),
            "{name}: firing alerts are not shown as annotations"
        );
    }
}
