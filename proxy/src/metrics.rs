//! Prometheus metrics: requests by route and status, upstream latency by route, reloads, and
//! audit records lost.
//!
//! The per-route handles are resolved when a configuration is compiled, so the hot path does
//! one label lookup (the status) per request and none for the latency histogram.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    upstream_duration: HistogramVec,
    reloads: IntCounterVec,
    audit_lost: IntCounterVec,
}

static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "portcullis_requests_total",
            "Requests, by route and the status answered (0: the client left before any answer).",
        ),
        &["route", "status"],
    )
    .ok()?;
    let upstream_duration = HistogramVec::new(
        HistogramOpts::new(
            "portcullis_upstream_duration_seconds",
            "Time from choosing an upstream to its response header, by route.",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["route"],
    )
    .ok()?;
    let reloads = IntCounterVec::new(
        Opts::new(
            "portcullis_config_reloads_total",
            "Configuration reloads, by result.",
        ),
        &["result"],
    )
    .ok()?;
    registry.register(Box::new(requests.clone())).ok()?;
    registry
        .register(Box::new(upstream_duration.clone()))
        .ok()?;
    let audit_lost = IntCounterVec::new(
        Opts::new(
            "portcullis_audit_records_lost_total",
            "Audit records not written, by why: the queue was full (queue_full), the writer \
             had stopped (writer_stopped), or the writes kept failing (write_failed). SCIM \
             changes among them are appended again at the next start.",
        ),
        &["why"],
    )
    .ok()?;
    registry.register(Box::new(reloads.clone())).ok()?;
    registry.register(Box::new(audit_lost.clone())).ok()?;
    Some(Metrics {
        registry,
        requests,
        upstream_duration,
        reloads,
        audit_lost,
    })
});

/// The statuses whose request counters a route holds ready (the label lookup is a hash and a
/// lock per request); others are looked up.
const COMMON_STATUSES: [u16; 8] = [200, 204, 302, 304, 401, 403, 404, 503];

/// The metric handles of one route. Requests that match no route use the `""` route.
pub struct RouteMetrics {
    name: String,
    upstream_duration: Option<prometheus::Histogram>,
    /// The request counters of [`COMMON_STATUSES`], in that order.
    common: Vec<IntCounter>,
}

impl RouteMetrics {
    pub fn new(name: &str) -> Self {
        let upstream_duration = METRICS.as_ref().and_then(|m| {
            m.upstream_duration
                .get_metric_with_label_values(&[name])
                .ok()
        });
        let common = METRICS.as_ref().map_or_else(Vec::new, |m| {
            let mut buf = itoa::Buffer::new();
            COMMON_STATUSES
                .iter()
                .filter_map(|status| {
                    m.requests
                        .get_metric_with_label_values(&[name, buf.format(*status)])
                        .ok()
                })
                .collect()
        });
        Self {
            name: name.to_owned(),
            upstream_duration,
            // All or none: the positions must match COMMON_STATUSES.
            common: if common.len() == COMMON_STATUSES.len() {
                common
            } else {
                Vec::new()
            },
        }
    }

    pub fn observe_upstream(&self, seconds: f64) {
        if let Some(histogram) = &self.upstream_duration {
            histogram.observe(seconds);
        }
    }

    pub fn count_request(&self, status: u16) {
        let ready = COMMON_STATUSES.iter().position(|s| *s == status);
        match ready.and_then(|i| self.common.get(i)) {
            Some(counter) => counter.inc(),
            None => count_request(&self.name, status),
        }
    }
}

pub fn count_request(route: &str, status: u16) {
    if let Some(m) = METRICS.as_ref() {
        let mut buf = itoa::Buffer::new();
        if let Ok(counter) = m
            .requests
            .get_metric_with_label_values(&[route, buf.format(status)])
        {
            counter.inc();
        }
    }
}

pub fn count_reload(ok: bool) {
    if let Some(m) = METRICS.as_ref() {
        let result = if ok { "ok" } else { "error" };
        if let Ok(counter) = m.reloads.get_metric_with_label_values(&[result]) {
            IntCounter::inc(&counter);
        }
    }
}

/// Counts `n` audit records lost, for `why` (see `portcullis_audit_records_lost_total`).
pub fn count_audit_lost(why: &str, n: u64) {
    if let Some(m) = METRICS.as_ref() {
        if let Ok(counter) = m.audit_lost.get_metric_with_label_values(&[why]) {
            counter.inc_by(n);
        }
    }
}

/// The whole registry in the Prometheus text exposition format.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(m) = METRICS.as_ref() {
        // Encoding into a Vec cannot fail on I/O; a metric family that cannot be encoded is
        // dropped from the page rather than failing the scrape.
        let _ = TextEncoder::new().encode(&m.registry.gather(), &mut out);
    }
    out
}
