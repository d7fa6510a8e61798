//! Script-call metrics, recorded in one place for every caller.
//!
//! [`Measured`] wraps any engine and records each script call's latency
//! ([`m::SCRIPT_DURATION`], by `script` and `engine`) and each failure ([`m::SCRIPT_ERRORS`],
//! by `script` and `kind`), whoever made the call: the inventory, the event writer or the
//! edge's sliding windows. Each of them wraps the engine it is given with [`measured`], which
//! hands an engine that is already measured back as it is, so an engine shared among them
//! counts each call once.
//!
//! Plain reads ([`ScriptEngine::hexists`], [`ScriptEngine::hget`]) and pings pass through unmeasured: they stand in
//! for a script call where that would cost too much, and are not one.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::{EngineError, EngineKind, Reply, Script, ScriptEngine, SCRIPTS};
use crate::metrics as m;

/// An engine whose script calls are measured. See the module documentation.
pub struct Measured {
    inner: Arc<dyn ScriptEngine>,
}

/// `engine`, measured: wrapped in [`Measured`] unless it is one already.
pub fn measured(engine: Arc<dyn ScriptEngine>) -> Arc<dyn ScriptEngine> {
    let any: &dyn Any = engine.as_ref();
    if any.is::<Measured>() {
        engine
    } else {
        Arc::new(Measured { inner: engine })
    }
}

impl ScriptEngine for Measured {
    fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        self.measure(script, self.inner.eval(script, keys, args))
    }

    fn read_new_entries(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<Reply, EngineError>> {
        self.measure(&SCRIPTS.stream, self.inner.read_new_entries(keys, args))
    }

    fn hexists(&self, key: String, field: String) -> BoxFuture<'_, Result<bool, EngineError>> {
        self.inner.hexists(key, field)
    }

    fn hget(
        &self,
        key: String,
        field: String,
    ) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        self.inner.hget(key, field)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        self.inner.ping()
    }

    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
}

impl Measured {
    /// Runs `call`, a call of `script`, recording its latency and any failure.
    fn measure<'a>(
        &'a self,
        script: &'static Script,
        call: BoxFuture<'a, Result<Reply, EngineError>>,
    ) -> BoxFuture<'a, Result<Reply, EngineError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = call.await;
            let engine = self.inner.kind().as_str();
            metrics::histogram!(m::SCRIPT_DURATION, "script" => script.name(), "engine" => engine)
                .record(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                let kind = match e {
                    EngineError::Unavailable(_) => "unavailable",
                    EngineError::Script { .. } => "script",
                };
                metrics::counter!(m::SCRIPT_ERRORS, "script" => script.name(), "kind" => kind)
                    .increment(1);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::embedded::EmbeddedEngine;

    #[tokio::test]
    async fn an_engine_is_measured_once_however_often_it_is_wrapped() {
        let engine: Arc<dyn ScriptEngine> = Arc::new(EmbeddedEngine::start().expect("engine"));
        let once = measured(engine.clone());
        assert!(!Arc::ptr_eq(&once, &engine), "a plain engine is wrapped");
        let twice = measured(once.clone());
        assert!(
            Arc::ptr_eq(&twice, &once),
            "a measured engine is not wrapped again"
        );
        assert_eq!(twice.kind(), EngineKind::Embedded);
    }
}
