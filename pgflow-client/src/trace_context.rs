//! The W3C trace context a run carries (feature `otel`): taken from the code that starts the run,
//! stored with the run in the same statement (`pgflow.set_run_trace_context`, migration 0012),
//! and read back by the worker, whose task spans become its children.
//!
//! The headers are written and read by OpenTelemetry's own W3C propagator, so the format is the
//! one every other OpenTelemetry service reads; the database holds them to the same format with
//! CHECK constraints, and what the propagator cannot read is ignored (the task span is then a
//! root), never an error. Without the feature, [`caller`] finds no context and nothing else here
//! runs.

#[cfg(feature = "otel")]
use std::collections::HashMap;

#[cfg(feature = "otel")]
use opentelemetry::Context;
#[cfg(feature = "otel")]
use opentelemetry::propagation::TextMapPropagator;
#[cfg(feature = "otel")]
use opentelemetry::trace::TraceContextExt;
#[cfg(feature = "otel")]
use opentelemetry_sdk::propagation::TraceContextPropagator;
#[cfg(feature = "otel")]
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header names, as the W3C recommendation and the propagator spell them.
#[cfg(feature = "otel")]
const TRACEPARENT: &str = "traceparent";
#[cfg(feature = "otel")]
const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` stored: the bound of the table's CHECK constraint (migration 0012).
/// A longer one (more than tracers propagate) is left out; the trace still links up.
#[cfg(feature = "otel")]
pub(crate) const MAX_TRACESTATE: usize = 8192;

/// A run's trace context, as stored in `pgflow_ext.run_trace_context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceHeaders {
    pub(crate) traceparent: String,
    pub(crate) tracestate: Option<String>,
}

/// The trace context of the code calling the client, as headers: that of the current `tracing`
/// span (through `tracing-opentelemetry`), else the current OpenTelemetry context (an
/// application using the OpenTelemetry API directly); `None` when neither carries a valid span
/// context (no OpenTelemetry layer, no span, a span this process does not trace), and always
/// without feature `otel`.
///
/// Called by the client's start functions before they enter spans of their own: a run started
/// outside any trace must not carry a trace the client's own span started.
pub(crate) fn caller() -> Option<TraceHeaders> {
    #[cfg(feature = "otel")]
    {
        let from_span = tracing::Span::current().context();
        let cx = if from_span.span().span_context().is_valid() {
            from_span
        } else {
            Context::current()
        };
        headers(&cx)
    }
    #[cfg(not(feature = "otel"))]
    None
}

/// `cx` as headers, when it carries a valid span context.
#[cfg(feature = "otel")]
pub(crate) fn headers(cx: &Context) -> Option<TraceHeaders> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    let traceparent = carrier.remove(TRACEPARENT)?;
    let tracestate = carrier
        .remove(TRACESTATE)
        .filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE);
    Some(TraceHeaders {
        traceparent,
        tracestate,
    })
}

/// The remote parent context the headers name; `None` when the propagator cannot read a valid
/// span context from them (a malformed row is ignored, never an error). A `tracestate` it
/// cannot read is dropped by the propagator, the parent kept.
#[cfg(feature = "otel")]
pub(crate) fn parent(traceparent: &str, tracestate: Option<&str>) -> Option<Context> {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(TRACEPARENT.to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert(TRACESTATE.to_owned(), state.to_owned());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// `sql`, a statement whose first column is the id of the run it starts and that takes
/// `params` parameters, made to store `trace` with the run in the same statement (so in the same
/// transaction: no worker can start a task of the run before its context is there); the headers
/// are bound as the next two parameters. The engine's function scan is read to its end before
/// the outer select list is computed, and set_run_trace_context (volatile) sees the run the
/// start just wrote.
pub(crate) fn storing(sql: &str, params: usize) -> String {
    format!(
        "SELECT s.run_id, pgflow.set_run_trace_context(s.run_id, ${}, ${}) FROM ({sql}) s",
        params + 1,
        params + 2
    )
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn context(state: TraceState) -> Context {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            state,
        );
        Context::new().with_remote_span_context(span)
    }

    #[test]
    fn headers_go_out_and_come_back() {
        let state = TraceState::from_key_value([("vendor", "value")]).unwrap();
        let headers = headers(&context(state)).expect("a valid context");
        assert_eq!(
            headers.traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(headers.tracestate.as_deref(), Some("vendor=value"));
        let back = parent(&headers.traceparent, headers.tracestate.as_deref()).expect("parent");
        let span = back.span();
        let span = span.span_context();
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_remote());
        assert!(span.is_sampled());
        assert_eq!(span.trace_state().header(), "vendor=value");
    }

    #[test]
    fn an_empty_tracestate_is_not_stored() {
        let headers = headers(&context(TraceState::default())).unwrap();
        assert_eq!(headers.tracestate, None);
    }

    #[test]
    fn no_valid_context_no_headers() {
        assert_eq!(headers(&Context::new()), None);
        // Outside any span and any attached context.
        assert_eq!(caller(), None);
    }

    /// (The propagator is lenient where it is harmless, e.g. with a trace id one digit short;
    /// the table's CHECK constraint is the strict gate.)
    #[test]
    fn what_the_propagator_cannot_read_is_no_parent() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "\u{0}\u{0}",
        ] {
            assert!(parent(bad, None).is_none(), "{bad:?}");
        }
        // A tracestate it cannot read is dropped, the parent kept.
        let kept = parent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("%%%,===,\u{7f}"),
        )
        .expect("the parent stays");
        assert_eq!(kept.span().span_context().trace_state().header(), "");
    }

    #[test]
    fn the_traced_statement_binds_the_next_parameters() {
        let cx = context(TraceState::default());
        let _attached = cx.attach();
        let headers = caller().expect("the attached context");
        assert!(headers.traceparent.starts_with("00-4bf92f35"));
        assert_eq!(
            storing("SELECT run_id FROM pgflow.start_flow($1, $2, $3)", 3),
            "SELECT s.run_id, pgflow.set_run_trace_context(s.run_id, $4, $5) \
             FROM (SELECT run_id FROM pgflow.start_flow($1, $2, $3)) s"
        );
    }
}
