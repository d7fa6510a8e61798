//! A metrics recorder for unit tests: it keeps every counter and gauge by name and labels,
//! so tests can assert what the limiters recorded. Install it with
//! `metrics::with_local_recorder`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Values by `name{label=value,…}`, labels sorted by name.
#[derive(Debug, Default)]
pub struct TestRecorder {
    values: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    /// A counter's value (0 if never registered).
    pub fn counter(&self, series: &str) -> u64 {
        self.value(series).unwrap_or(0)
    }

    /// A gauge's value, if registered.
    pub fn gauge(&self, series: &str) -> Option<f64> {
        self.value(series).map(f64::from_bits)
    }

    /// Every series registered, sorted.
    pub fn series(&self) -> Vec<String> {
        let mut names: Vec<String> = self.values().keys().cloned().collect();
        names.sort();
        names
    }

    fn value(&self, series: &str) -> Option<u64> {
        self.values().get(series).map(|v| v.load(Ordering::Acquire))
    }

    fn values(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicU64>>> {
        self.values
            .lock()
            .expect("no test panicked while holding it")
    }

    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let series = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.values().entry(series).or_default())
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
